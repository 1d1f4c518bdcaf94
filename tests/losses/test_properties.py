"""Hypothesis properties of topd_loss: padding and permutation invariance, preset reductions,
finiteness on every finite input (TOPD.md sections 1-6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from topd_jax.losses import TopdConfig, TopdInputs, topd_loss
from topd_jax.losses.topd import FIELD_AXES

TOPK = 2


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(["reference", "quantile", "absolute"]))
    return TopdConfig.preset(
        draw(st.sampled_from(["topd", "opd_suppress"])),
        locator=draw(st.sampled_from(["ot", "window_kl"])),
        threshold_mode=mode,
        tau=0.5 if mode == "absolute" else None,
        suppress_weight=draw(st.sampled_from([0.0, 0.3])),
        guidance_options={"step_loss": draw(st.sampled_from(["sampled", "topk_fkl"])),
                          "gamma": draw(st.sampled_from([1.0, 0.7]))},
        agg=draw(st.sampled_from(["token_mean", "sequence_mean"])),
        clip_eps=draw(st.sampled_from([None, 0.2])),
        window=draw(st.sampled_from([1, 3])),
    )


@st.composite
def rollouts(draw):
    """Random finite inputs of small shapes; masks may be empty, logprobs large."""
    b = draw(st.sampled_from([1, 2, 3]))
    t = draw(st.sampled_from([1, 4, 9]))
    m = draw(st.sampled_from([0, 1, 3]))
    k = draw(st.sampled_from([1, 4]))
    r = draw(st.sampled_from([1, 2]))
    scale = draw(st.sampled_from([1.0, 30.0, 1e3]))
    keep = draw(st.sampled_from([0.0, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def lp(*shape):
        return jnp.asarray(-rng.random(shape) * scale, jnp.float32)

    def mask(*shape):
        return jnp.asarray(rng.random(shape) < keep)

    behaviour = lp(b, t)
    window_len = rng.integers(0, k + 1, (b, m))
    return TopdInputs(
        student_logprobs=behaviour + jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
        behaviour_logprobs=behaviour,
        teacher_logprobs=lp(b, t),
        mask=mask(b, t),
        positions=jnp.asarray(rng.integers(0, t, (b, m)), jnp.int32),
        valid=mask(b, m),
        ot=jnp.asarray(rng.random((b, m)) * 2, jnp.float32),
        reference_ot=jnp.asarray(rng.random((b, r)) * 2, jnp.float32),
        reference_valid=mask(b, r),
        reference_positions=jnp.asarray(rng.integers(0, t, (b, r)), jnp.int32),
        window_logprobs=lp(b, m, k),
        window_mask=jnp.asarray(np.arange(k) < window_len[..., None]),
        window_student_topk_logprobs=lp(b, m, k, TOPK),
        window_teacher_topk_logprobs=lp(b, m, k, TOPK),
        teacher_agrees=mask(b, t),
        finished=mask(b),
    )


MASK_FIELDS = {"mask", "valid", "reference_valid", "window_mask"}


def pad(inputs, amount, rng):
    """Append `amount[axis]` entries along each named axis: junk values, masks and validity 0."""
    padded = {}
    for name, axes in FIELD_AXES.items():
        if getattr(inputs, name) is None:  # a field this case does not give (e.g. candidate_labels)
            padded[name] = None
            continue
        x = np.asarray(getattr(inputs, name))
        for i, axis in enumerate(axes):
            extra = list(x.shape)
            extra[i] = amount.get(axis, 0)
            if name in MASK_FIELDS or name == "positions" or name == "reference_positions":
                junk = np.zeros(extra, x.dtype)
            else:
                junk = rng.normal(size=extra).astype(x.dtype) * 5 - 5
            x = np.concatenate([x, junk], axis=i)
        padded[name] = jnp.asarray(x)
    return TopdInputs(**padded)


def assert_same(a, b):
    loss_a, metrics_a = a
    loss_b, metrics_b = b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-4, atol=1e-4)
    assert metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], rtol=1e-4, atol=1e-4, err_msg=name)


@given(rollouts(), configs(), st.sampled_from([{"T": 3}, {"M": 2, "K": 2}, {"B": 1, "R": 1}, {"B": 2, "T": 1, "M": 1, "K": 1, "R": 1}]))
def test_padding_invariance(inputs, config, amount):
    padded = pad(inputs, amount, np.random.default_rng(0))
    assert_same(topd_loss(inputs, config), topd_loss(padded, config))


@given(rollouts(), configs(), st.randoms(use_true_random=False))
def test_batch_permutation_invariance(inputs, config, random):
    order = list(range(inputs.mask.shape[0]))
    random.shuffle(order)
    permuted = jax.tree.map(lambda x: x[jnp.asarray(order)], inputs)
    assert_same(topd_loss(inputs, config), topd_loss(permuted, config))


@given(rollouts(), configs())
def test_topd_without_valid_candidates_equals_opd(inputs, config):
    inputs = dataclasses.replace(inputs, valid=jnp.zeros_like(inputs.valid))
    opd = dataclasses.replace(config, suppress_weight=1.0, traj_weight=0.0)
    np.testing.assert_allclose(topd_loss(inputs, config)[0], topd_loss(inputs, opd)[0], rtol=1e-6, atol=1e-7)


@given(rollouts(), configs())
def test_opd_suppress_with_alpha_one_equals_opd(inputs, config):
    suppress = dataclasses.replace(config, suppress_weight=1.0, traj_weight=0.0)
    opd = TopdConfig.preset("opd", agg=config.agg, clip_eps=config.clip_eps)
    np.testing.assert_array_equal(topd_loss(inputs, suppress)[0], topd_loss(inputs, opd)[0])


@given(rollouts(), configs())
def test_finite_loss_metrics_and_gradients(inputs, config):
    def loss_of(s, w, ws):
        replaced = dataclasses.replace(inputs, student_logprobs=s, window_logprobs=w, window_student_topk_logprobs=ws)
        return topd_loss(replaced, config)

    (loss, metrics), grads = jax.value_and_grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
        inputs.student_logprobs, inputs.window_logprobs, inputs.window_student_topk_logprobs
    )
    assert np.isfinite(float(loss))
    for name, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
