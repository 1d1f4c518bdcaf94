"""Step timing and model FLOPs utilisation (MFU): how much of the chips' peak a step uses.

    MFU = FLOPs of one step / (step seconds * peak FLOP/s per device * devices)

FLOPs come from the compiled step's HLO, loops counted per iteration (`compiled_flops`), or else from the
6 N T rule of thumb (`transformer_train_flops`); the peak from the chip table's dense bf16 figures
(`device_peak_flops`, `topd_jax.hardware.chips`), or where the chip is unknown, a measured matmul
(`measure_matmul_peak`).
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from topd_jax.hardware import chips, hlo


class PhaseTimer:
    """Wall time per phase within a step: e.g. sample / score / branch / train.

    JAX dispatch is asynchronous: a jitted call returns before the device has finished, so the
    caller must block on the phase's outputs inside the block (`jax.block_until_ready(out)`),
    or the time lands in whichever later phase first waits on them.

        with timer.phase("sample"):
            rollouts = jax.block_until_ready(sample(...))
        metrics.update(timer.split())   # {"time_sample": s, ..., "time_step": s}
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._seconds: dict[str, float] = collections.defaultdict(float)
        self._start = clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name`; a phase entered twice in a step adds up."""
        begin = self._clock()
        try:
            yield
        finally:
            self._seconds[name] += self._clock() - begin

    def split(self) -> dict[str, float]:
        """Seconds per phase since the last split (or construction), then reset.

        Keys `time_<name>` per phase and `time_step`: the wall time of the whole interval, so it
        also counts the work outside any phase (time_step >= sum of the phases).
        """
        now = self._clock()
        times = {f"time_{name}": seconds for name, seconds in self._seconds.items()}
        times["time_step"] = now - self._start
        self._seconds.clear()
        self._start = now
        return times


def measure_matmul_peak(*, size: int = 1024, dtype: Any = jnp.float32, repeats: int = 5, device: jax.Device | None = None) -> float:
    """The measured matmul peak of one device: FLOP/s of a jitted [size, size] x [size, size]
    matmul, 2 size^3 FLOPs over the best of `repeats` timed runs (after a compiling warm-up).
    A stand-in peak for chips missing from the chip table (e.g. CPUs)."""
    if size < 1 or repeats < 1:
        raise ValueError(f"size ({size}) and repeats ({repeats}) must be positive")
    device = jax.devices()[0] if device is None else device
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = math.inf
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - begin)
    return 2.0 * size**3 / max(best, 1e-9)


def device_peak_flops(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one chip, looked up by `device.device_kind` in the chip table
    (`topd_jax.hardware.chips.chip_of_device`); None for an unknown kind (e.g. CPU)."""
    chip = chips.chip_of_device(device)
    return None if chip is None else chip.peak_flops


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of a compiled JAX executable (`jax.jit(f).lower(...).compile()`),
    per device, with every fixed-length loop counted once per iteration: `hardware.hlo.flops` of its
    optimised HLO (matmuls and convolutions; the scanned layers are a loop, which XLA's own
    `cost_analysis()` counts once). None where the program has no matmul FLOPs or no HLO text."""
    try:
        total = hlo.flops(compiled.as_text())
    except Exception:  # a backend or executable without HLO text
        return None
    return total if total > 0 else None


def mfu(flops: float, seconds: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOPs utilisation: flops / seconds / (peak_flops_per_device * num_devices)."""
    if seconds <= 0 or peak_flops_per_device <= 0 or num_devices < 1:
        raise ValueError(f"mfu needs seconds > 0, peak > 0 and devices >= 1, got {seconds}, {peak_flops_per_device}, {num_devices}")
    return flops / seconds / (peak_flops_per_device * num_devices)


def transformer_train_flops(num_params: int, tokens: int) -> float:
    """Training FLOPs of a decoder, 6 N T: forward 2 N T plus backward 4 N T for N parameters
    over T tokens. Ignores attention's score and value matmuls (12 L d T^2-ish per sequence),
    so it undercounts long sequences; the fallback when `compiled_flops` is unavailable."""
    return 6.0 * num_params * tokens
