"""FLOPs, peaks and MFU: the compiled program's loop-aware FLOPs, the peak table, the phase timer."""

import math
import types

import jax
import jax.numpy as jnp
import pytest

from topd_jax.trainer.flops import (
    PhaseTimer,
    compiled_flops,
    device_peak_flops,
    measure_matmul_peak,
    mfu,
    transformer_train_flops,
)


def test_compiled_flops_of_a_matmul_is_2mnk():
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((64, 128)), jnp.ones((128, 32))).compile()
    assert compiled_flops(compiled) == pytest.approx(2 * 64 * 128 * 32, rel=0.1)


def test_compiled_flops_counts_a_scanned_layer_once_per_layer():
    # The decoder's layers are a lax.scan; XLA's cost analysis counts a loop body once.
    def layers(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    one = 2 * 16 * 64 * 64
    for n in (4, 16):
        compiled = jax.jit(layers).lower(jnp.ones((16, 64)), jnp.ones((n, 64, 64))).compile()
        assert compiled_flops(compiled) == pytest.approx(n * one, rel=0.01)


def test_compiled_flops_is_none_without_hlo_text_or_matmuls():
    def unsupported():
        raise NotImplementedError

    assert compiled_flops(types.SimpleNamespace(as_text=unsupported)) is None
    assert compiled_flops(jax.jit(jnp.tanh).lower(jnp.ones(8)).compile()) is None


def test_measured_matmul_peak_is_a_positive_rate():
    peak = measure_matmul_peak(size=64, repeats=2)
    assert math.isfinite(peak) and peak > 0


def test_phase_timer_splits_per_phase_and_resets():
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    with timer.phase("sample"):
        now[0] += 2.0
    now[0] += 0.5  # outside any phase: counted only in time_step
    with timer.phase("train"):
        now[0] += 1.0
    with timer.phase("sample"):
        now[0] += 1.0
    assert timer.split() == {"time_sample": 3.0, "time_train": 1.0, "time_step": 4.5}
    with timer.phase("score"):
        now[0] += 0.25
    assert timer.split() == {"time_score": 0.25, "time_step": 0.25}


def test_phase_timer_counts_a_phase_that_raises():
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    with pytest.raises(KeyError), timer.phase("branch"):
        now[0] += 1.5
        raise KeyError
    assert timer.split()["time_branch"] == 1.5


def test_phase_timer_with_the_real_clock_sums_below_the_step():
    timer = PhaseTimer()
    with timer.phase("train"):
        jax.block_until_ready(jnp.ones((8, 8)) @ jnp.ones((8, 8)))
    times = timer.split()
    assert 0 <= times["time_train"] <= times["time_step"]


def test_mfu_arithmetic_and_bad_inputs():
    assert mfu(6e12, 2.0, 1e12, 4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="seconds > 0"):
        mfu(1.0, 0.0, 1e12, 1)


def test_transformer_train_flops_matches_a_compiled_training_step():
    # 6 N T against what XLA counts for the gradient of a stack of L dense d x d layers over T
    # tokens: forward 2 N T, backward 4 N T, less the input gradient the first layer never
    # needs (2 T d^2), so the compiled count is 6 N T (1 - 1 / (3 L)).
    layers, d, t = 6, 64, 32
    weights = [jnp.full((d, d), 0.01) for _ in range(layers)]
    x = jnp.ones((t, d))

    def loss(ws, x):
        for w in ws:
            x = x @ w
        return jnp.sum(x * x)

    compiled = jax.jit(jax.grad(loss)).lower(weights, x).compile()
    n = layers * d * d
    estimate = transformer_train_flops(n, t)
    assert compiled_flops(compiled) == pytest.approx(estimate * (1 - 1 / (3 * layers)), rel=0.02)
    # ... and it is the training count: three times the forward pass alone.
    forward = jax.jit(loss).lower(weights, x).compile()
    assert estimate == pytest.approx(3 * compiled_flops(forward), rel=0.02)


def test_device_peak_flops_table():
    assert device_peak_flops(jax.devices()[0]) is None  # the tests run on CPU
    kind = lambda name: types.SimpleNamespace(device_kind=name)  # noqa: E731
    assert device_peak_flops(kind("TPU v5p")) == 459e12
    assert device_peak_flops(kind("TPU v5 lite")) == 197e12
    assert device_peak_flops(kind("TPU v6 lite")) == 918e12
    assert device_peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert device_peak_flops(kind("NVIDIA H100 PCIe")) == 756e12
    assert device_peak_flops(kind("NVIDIA L40S")) == 362e12
    assert device_peak_flops(kind("NVIDIA L4")) == 121e12
    assert device_peak_flops(kind("Some Accelerator")) is None
