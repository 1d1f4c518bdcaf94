"""On-policy distillation: the token-level reverse-KL objective (TOPD.md section 1).

Shapes: B rollouts, T completion tokens, V vocabulary, k teacher top-k support.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from topd_jax.chunking import chunked_rows

Array = jax.Array
Aggregation = Literal["token_mean", "sequence_mean"]
AGGREGATIONS = ("token_mean", "sequence_mean")
_MAX_LOG_RATIO = 20.0


def aggregate(per_token: Array, mask: Array, agg: Aggregation = "token_mean") -> Array:
    """Masked mean of a per-token quantity [B, T] -> scalar.

    token_mean:    sum_{b,t} m_bt x_bt / max(1, sum_{b,t} m_bt)
    sequence_mean: mean over rollouts with at least one valid token of
                   sum_t m_bt x_bt / sum_t m_bt

    Both ignore padding (rows, columns or whole rollouts with m = 0), and both are 0 when
    nothing is valid.
    """
    mask = mask.astype(per_token.dtype)
    per_token = jnp.where(mask > 0, per_token, 0.0)
    if agg == "token_mean":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if agg == "sequence_mean":
        tokens = jnp.sum(mask, axis=-1)
        per_seq = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(tokens, 1.0)
        has_tokens = (tokens > 0).astype(per_token.dtype)
        return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def _check_opd_args(student_logprobs: Array, **others: Array | None) -> None:
    """One-line error unless every given per-token array has student_logprobs' [B, T] shape."""
    shape = tuple(jnp.shape(student_logprobs))
    if len(shape) != 2:
        raise ValueError(f"opd_loss: student_logprobs must be [B, T], got shape {shape}")
    for name, value in others.items():
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise ValueError(f"opd_loss: {name} has shape {tuple(jnp.shape(value))}, but student_logprobs "
                             f"has {shape}; every per-token input must be [B, T]")


def opd_loss(
    student_logprobs: Array,
    behaviour_logprobs: Array,
    teacher_logprobs: Array,
    mask: Array,
    *,
    weights: Array | None = None,
    advantage: Array | None = None,
    clip_eps: float | None = None,
    agg: Aggregation = "token_mean",
) -> tuple[Array, dict[str, Array]]:
    """OPD loss: a policy gradient whose per-token reward is the negative sampled reverse KL.

    With s_t the student log-prob (differentiated), b_t the behaviour (sampler) log-prob and q_t
    the teacher log-prob of the sampled token y_t, all [B, T]:

        d_t   = b_t - q_t                          sampled reverse-KL estimate
        A_t   = -sg(d_t)                           advantage, no gradient
        rho_t = exp(s_t - sg(b_t))                 importance ratio, 1 on-policy
        l_t   = -w_t * A_t * rho_t                 or, with clip_eps = e (PPO-style),
        l_t   = -w_t * min(A_t rho_t, A_t clip(rho_t, 1 - e, 1 + e))
        L     = agg_t(m_t * l_t)

    b_t is the log-prob the sampler reports; `topd_jax.sampling` reports the temperature-1,
    untruncated log-prob, so with another temperature or top-k/top-p, rho is the ratio to the
    untempered policy rather than to the sampling distribution. |s_t - b_t| is clamped at 20
    (no gradient beyond). On-policy (s = b) with token_mean aggregation,
    dL/ds_t = -m_t w_t A_t / N, N = sum_t m_t.
    Weights w_t (default 1, no gradient) are how TOPD suppresses tokens; they do not change N.
    `advantage` [B, T] (no gradient) replaces A_t = -d_t where given: TOPD's near-future return
    (`topd.near_future_return`) credits a divergent state with the drift that follows it.
    The teacher never receives a gradient.

    Returns (loss, metrics) with metrics `loss_opd`, `reverse_kl_sampled` (mean d over valid
    tokens), `importance_ratio` (mean rho) and `clip_fraction`.

    Raises a one-line ValueError naming the argument when the [B, T] inputs differ in shape
    (broadcasting would silently mix rollouts) or clip_eps is not None and not in (0, inf).
    """
    _check_opd_args(student_logprobs, behaviour_logprobs=behaviour_logprobs, teacher_logprobs=teacher_logprobs,
                    mask=mask, weights=weights, advantage=advantage)
    if clip_eps is not None and not (0 < clip_eps < float("inf")):
        raise ValueError(f"opd_loss: clip_eps must be None (no clipping) or a finite value > 0, got {clip_eps!r}")
    dtype = student_logprobs.dtype
    mask = mask.astype(dtype)
    behaviour = jax.lax.stop_gradient(behaviour_logprobs)
    divergence = behaviour - jax.lax.stop_gradient(teacher_logprobs)
    advantage = -divergence if advantage is None else jax.lax.stop_gradient(advantage.astype(dtype))
    weights = jnp.ones_like(student_logprobs) if weights is None else weights
    weights = jax.lax.stop_gradient(weights.astype(dtype))

    # Masked entries may hold anything finite (padding); keep exp() away from them. The clamp
    # (|log rho| <= 20, so rho in [2e-9, 4.9e8]) only bites far off-policy, keeps rho finite,
    # and gives such tokens no gradient.
    log_ratio = jnp.where(mask > 0, student_logprobs - behaviour, 0.0)
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    surrogate = advantage * ratio
    clipped = jnp.zeros_like(ratio)
    if clip_eps is not None:
        clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        clipped_surrogate = advantage * clipped_ratio
        clipped = (clipped_surrogate < surrogate).astype(dtype)
        surrogate = jnp.minimum(surrogate, clipped_surrogate)
    loss = aggregate(-weights * surrogate, mask, agg)
    metrics = {
        "loss_opd": loss,
        "reverse_kl_sampled": aggregate(divergence, mask, "token_mean"),
        "importance_ratio": aggregate(ratio, mask, "token_mean"),
        "clip_fraction": aggregate(clipped, mask, "token_mean"),
    }
    return loss, metrics


def _support_reverse_kl(student_logits: Array, support_ids: Array, support_logprobs: Array) -> Array:
    """Reverse KL on a support S, both distributions renormalised over S. [N, V], [N, k] -> [N]."""
    student_logprobs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    s = jnp.take_along_axis(student_logprobs, support_ids, axis=-1)
    s = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
    t = support_logprobs.astype(jnp.float32)
    t = t - jax.nn.logsumexp(t, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(s) * (s - t), axis=-1)


def _full_reverse_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """KL(pi_s || pi_T) over the whole vocabulary. [N, V], [N, V] -> [N]."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(s) * (s - t), axis=-1)


def reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    mask: Array,
    *,
    top_k: int = 0,
    chunk_size: int = 1024,
) -> Array:
    """Analytic per-token reverse KL from logits [B, T, V] -> [B, T] (0 where mask is 0).

    Full vocabulary (top_k = 0):
        KL_t = sum_v pi_s(v) (log pi_s(v) - log pi_T(v))
    Teacher top-k support S_t (top_k = k > 0), both distributions renormalised over S_t:
        KL_t = sum_{v in S_t} p~_s(v) (log p~_s(v) - log p~_T(v)),  p~(v) = p(v) / sum_{S_t} p

    The B*T rows are processed in chunks of `chunk_size`: only [chunk_size, V] log-softmax slabs
    are ever live, forward and backward. Differentiable with respect to the student logits; the
    teacher logits get no gradient. Use `reverse_kl_on_support` when the teacher's top-k was
    stored at scoring time instead of its full logits.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    b, t, v = student_logits.shape
    flat_s = student_logits.reshape(b * t, v)
    flat_t = teacher_logits.reshape(b * t, v)
    if top_k:

        def per_chunk(s, te):
            te_logprobs = jax.nn.log_softmax(te.astype(jnp.float32), axis=-1)
            support_logprobs, support_ids = jax.lax.top_k(te_logprobs, top_k)
            return _support_reverse_kl(s, support_ids, support_logprobs)

        kl = chunked_rows(per_chunk, flat_s, flat_t, chunk_size=chunk_size)
    else:
        kl = chunked_rows(_full_reverse_kl, flat_s, flat_t, chunk_size=chunk_size)
    return jnp.where(mask > 0, kl.reshape(b, t), 0.0)


def reverse_kl_on_support(
    student_logits: Array,
    teacher_topk_logprobs: Array,
    teacher_topk_ids: Array,
    mask: Array,
    *,
    chunk_size: int = 1024,
) -> Array:
    """Reverse KL on the teacher's stored top-k support: [B, T, V], [B, T, k], [B, T, k] -> [B, T].

    Same equation as `reverse_kl(..., top_k=k)`, for when scoring kept only the teacher's top-k
    log-probs and token ids.
    """
    b, t, v = student_logits.shape
    k = teacher_topk_ids.shape[-1]
    kl = chunked_rows(
        _support_reverse_kl,
        student_logits.reshape(b * t, v),
        teacher_topk_ids.reshape(b * t, k),
        jax.lax.stop_gradient(teacher_topk_logprobs).reshape(b * t, k),
        chunk_size=chunk_size,
    )
    return jnp.where(mask > 0, kl.reshape(b, t), 0.0)
