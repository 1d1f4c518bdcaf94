"""opd_loss, aggregate, reverse_kl and reverse_kl_on_support (TOPD.md section 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.losses import aggregate, opd_loss, reverse_kl, reverse_kl_on_support

B_LP = jnp.array([[-1.0, -2.0, -0.5]])
Q_LP = jnp.array([[-1.5, -1.0, -0.5]])
MASK = jnp.array([[1.0, 1.0, 0.0]])


def test_hand_computed_on_policy_loss_and_metrics():
    # d = b - q = [0.5, -1, 0]; A = -d; rho = 1; l = -A = [0.5, -1]; token mean over 2.
    loss, metrics = opd_loss(B_LP, B_LP, Q_LP, MASK)
    np.testing.assert_allclose(loss, -0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["reverse_kl_sampled"], -0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["importance_ratio"], 1.0, rtol=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0


def test_weights_scale_tokens_but_not_the_normaliser():
    loss, _ = opd_loss(B_LP, B_LP, Q_LP, MASK, weights=jnp.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(loss, -0.5, rtol=1e-6)  # (0 * 0.5 + 1 * -1) / 2


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_on_policy_gradient_is_minus_mask_weight_advantage_over_n(clip_eps):
    key = jax.random.split(jax.random.key(0), 4)
    b = -jax.random.uniform(key[0], (3, 7)) * 3
    q = -jax.random.uniform(key[1], (3, 7)) * 3
    m = (jax.random.uniform(key[2], (3, 7)) > 0.3).astype(jnp.float32)
    w = jax.random.uniform(key[3], (3, 7))
    grad = jax.grad(lambda s: opd_loss(s, b, q, m, weights=w, clip_eps=clip_eps)[0])(b)
    expected = -m * w * (q - b) / m.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_teacher_and_behaviour_get_no_gradient():
    grads = jax.grad(lambda b, q: opd_loss(b, b, q, MASK)[0], argnums=(0, 1))(B_LP, Q_LP)
    # s is b here, so only the ratio path reaches b: d rho / d s at rho = 1 gives -A/N.
    np.testing.assert_allclose(grads[0], -MASK * (Q_LP - B_LP) / 2, rtol=1e-6)
    np.testing.assert_array_equal(grads[1], 0.0)


def test_hand_computed_clipping_off_policy():
    # Token 0: A = -0.5, rho = 0.5 -> min(-0.25, 0.8 * -0.5 = -0.4) = -0.4 (clipped).
    # Token 1: A = +1, rho = 0.9 -> min(0.9, 0.9) = 0.9 (inside the clip range).
    b = jnp.array([[-1.0, -2.0]])
    q = jnp.array([[-1.5, -1.0]])
    s = b + jnp.log(jnp.array([[0.5, 0.9]]))
    m = jnp.ones((1, 2))
    loss, metrics = opd_loss(s, b, q, m, clip_eps=0.2)
    np.testing.assert_allclose(loss, -(-0.4 + 0.9) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 0.5)
    grad = jax.grad(lambda s: opd_loss(s, b, q, m, clip_eps=0.2)[0])(s)
    # Clipped token: no gradient. Unclipped: -A * rho / N.
    np.testing.assert_allclose(grad, [[0.0, -1.0 * 0.9 / 2]], rtol=1e-5)


def test_hand_computed_sequence_mean_ignores_empty_rollouts():
    per_token = jnp.array([[1.0, 3.0, 9.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(aggregate(per_token, mask, "sequence_mean"), (2.0 + 4.0) / 2)
    np.testing.assert_allclose(aggregate(per_token, mask, "token_mean"), 8.0 / 3)
    assert float(aggregate(per_token, jnp.zeros_like(mask), "sequence_mean")) == 0.0


def test_unknown_aggregation_is_a_clear_error():
    with pytest.raises(ValueError, match="agg must be one of"):
        opd_loss(B_LP, B_LP, Q_LP, MASK, agg="mean")


def test_far_off_policy_ratio_stays_finite():
    loss, metrics = opd_loss(jnp.array([[0.0]]), jnp.array([[-1e4]]), jnp.array([[-1.0]]), jnp.ones((1, 1)))
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["importance_ratio"]))


def _numpy_reverse_kl(s_logits, t_logits, top_k=0):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    s, t = log_softmax(s_logits), log_softmax(t_logits)
    if top_k:
        idx = np.argsort(-t, axis=-1, kind="stable")[..., :top_k]
        s = np.take_along_axis(s, idx, -1)
        t = np.take_along_axis(t, idx, -1)
        s, t = log_softmax(s), log_softmax(t)
    return (np.exp(s) * (s - t)).sum(-1)


def test_reverse_kl_hand_computed_two_token_vocab():
    # pi_s = (0.5, 0.5), pi_T = (0.8, 0.2): KL = 0.5 log(0.5/0.8) + 0.5 log(0.5/0.2).
    s = jnp.zeros((1, 1, 2))
    t = jnp.log(jnp.array([[[0.8, 0.2]]]))
    expected = 0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2)
    np.testing.assert_allclose(reverse_kl(s, t, jnp.ones((1, 1))), [[expected]], rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_reverse_kl_matches_numpy_for_any_chunking(top_k, chunk_size):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
    t = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0
    got = reverse_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), top_k=top_k, chunk_size=chunk_size)
    np.testing.assert_allclose(got, _numpy_reverse_kl(s, t, top_k) * mask, rtol=1e-5, atol=1e-6)


def test_reverse_kl_top_k_of_whole_vocab_equals_full():
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.normal(size=(1, 3, 6)), jnp.float32) for _ in range(2))
    m = jnp.ones((1, 3))
    np.testing.assert_allclose(reverse_kl(s, t, m, top_k=6), reverse_kl(s, t, m), rtol=1e-5, atol=1e-6)


def test_reverse_kl_chunked_gradient_equals_direct_gradient():
    rng = np.random.default_rng(2)
    s, t = (jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32) for _ in range(2))
    m = jnp.ones((2, 3))

    def direct(s):
        ls, lt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
        return jnp.sum(jnp.exp(ls) * (ls - lt))

    got = jax.grad(lambda s: jnp.sum(reverse_kl(s, t, m, chunk_size=2)))(s)
    np.testing.assert_allclose(got, jax.grad(direct)(s), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(jax.grad(lambda t: jnp.sum(reverse_kl(s, t, m)))(t)) == 0.0)


def test_reverse_kl_on_stored_support_equals_top_k_from_logits():
    rng = np.random.default_rng(3)
    s, t = (jnp.asarray(rng.normal(size=(2, 4, 9)), jnp.float32) for _ in range(2))
    m = jnp.ones((2, 4))
    top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(t), 3)
    np.testing.assert_allclose(
        reverse_kl_on_support(s, top_lp, top_ids, m, chunk_size=3),
        reverse_kl(s, t, m, top_k=3),
        rtol=1e-5,
        atol=1e-6,
    )


def test_reverse_kl_memory_scales_with_the_chunk_not_with_b_t_v():
    # Forward and backward temporaries stay within a few [chunk, V] slabs, far below B*T*V.
    b, t, v, chunk = 4, 256, 4096, 64
    s = jax.ShapeDtypeStruct((b, t, v), jnp.float32)
    m = jax.ShapeDtypeStruct((b, t), jnp.float32)
    slab = chunk * v * 4
    forward = jax.jit(lambda s, te, m: reverse_kl(s, te, m, chunk_size=chunk))
    backward = jax.jit(jax.grad(lambda s, te, m: jnp.sum(reverse_kl(s, te, m, chunk_size=chunk))))
    for fn in (forward, backward):
        temp = fn.lower(s, s, m).compile().memory_analysis().temp_size_in_bytes
        assert temp <= 4 * slab, (temp, slab, b * t * v * 4)


@pytest.mark.parametrize("name", ["behaviour_logprobs", "teacher_logprobs", "mask", "weights"])
def test_mismatched_shapes_are_a_one_line_error_naming_the_argument(name):
    args = {"behaviour_logprobs": jnp.zeros((2, 3)), "teacher_logprobs": jnp.zeros((2, 3)),
            "mask": jnp.ones((2, 3)), "weights": jnp.ones((2, 3))}
    args[name] = jnp.zeros((1, 3))  # would broadcast silently
    with pytest.raises(ValueError, match=f"^opd_loss: {name} has shape \\(1, 3\\)") as info:
        opd_loss(jnp.zeros((2, 3)), args["behaviour_logprobs"], args["teacher_logprobs"], args["mask"],
                 weights=args["weights"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("clip_eps", [-1.0, 0.0, float("inf"), float("nan")])
def test_a_clip_eps_that_is_not_positive_and_finite_is_refused(clip_eps):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="clip_eps must be None"):
        opd_loss(x, x, x, jnp.ones((2, 3)), clip_eps=clip_eps)
