"""Candidates: the high-loss tokens of each rollout, and the zero-branch proxy locator.

TOPD.md sections 2 and 5 (the `window_kl` proxy). Shapes: B rollouts, T tokens, M candidates.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp

Array = jax.Array

def candidate_count(num_valid: Array, quantile: float) -> Array:
    """n_b valid tokens -> ceil((1 - quantile) * n_b), the size of the rollout's high-loss set.

    Exact integer arithmetic: 1 - quantile is taken as the nearest fraction a / c with c <= 10^4
    (0.2 -> 1/5), so float error can never add or drop a candidate, whatever n_b.
    """
    share = Fraction(1.0 - quantile).limit_denominator(10_000)
    a, c = share.numerator, share.denominator
    n = num_valid.astype(jnp.int32)
    return (n // c) * a + ((n % c) * a + c - 1) // c


def select_candidates(
    divergence: Array,
    mask: Array,
    *,
    quantile: float = 0.8,
    max_candidates: int = 8,
) -> tuple[Array, Array]:
    """High-loss positions of each rollout: [B, T] -> positions [B, M] int32, valid [B, M] bool.

    C_b = the ceil((1 - quantile) * n_b) valid positions of rollout b with the largest d_t
    (n_b = sum_t m_bt), truncated to the M = max_candidates largest, sorted by d_t descending;
    ties go to the earlier position. Slots past |C_b| are invalid and hold position 0.
    Padding never becomes a candidate, so appending masked tokens changes nothing.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if max_candidates < 0:
        raise ValueError(f"max_candidates must be >= 0, got {max_candidates}")
    b, t = divergence.shape
    valid_tokens = mask > 0
    scores = jnp.where(valid_tokens, divergence.astype(jnp.float32), -jnp.inf)
    k = min(max_candidates, t)
    # lax.top_k is stable: equal scores come out lowest index first.
    _, positions = jax.lax.top_k(scores, k)
    count = candidate_count(jnp.sum(valid_tokens, axis=-1), quantile)
    valid = jnp.arange(k)[None, :] < count[:, None]
    positions = jnp.where(valid, positions, 0).astype(jnp.int32)
    if k < max_candidates:
        positions = jnp.pad(positions, ((0, 0), (0, max_candidates - k)))
        valid = jnp.pad(valid, ((0, 0), (0, max_candidates - k)))
    return positions, valid


def window_kl_proxy(divergence: Array, mask: Array, *, window: int) -> Array:
    """Zero-branch locator: the mean of d over the rollout's own next `window` tokens. [B, T] -> [B, T].

        P_t = sum_{j=t+1}^{t+K} m_j d_j / max(1, sum_{j=t+1}^{t+K} m_j)

    The near future after t, not d_t itself: a candidate is high-loss at t by construction, and
    the question is whether the divergence persists (drift) or was an isolated spike. Computed
    as one windowed sum (no cumulative-sum cancellation), 0 where no valid token follows.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    m = mask.astype(jnp.float32)
    d = jnp.where(m > 0, divergence.astype(jnp.float32), 0.0)

    def future_sum(x):
        # Windows [t + 1, t + K]: pad K on the right, drop the first window (which starts at t).
        sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window), (1, 1), ((0, 0), (0, window)))
        return sums[:, 1:]

    return future_sum(d * m) / jnp.maximum(future_sum(m), 1.0)


def gather_tokens(values: Array, positions: Array) -> Array:
    """values [B, T, ...] at positions [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(
        values, positions.reshape(positions.shape + (1,) * (values.ndim - 2)), axis=1
    )


def reference_positions(key: Array, mask: Array, num_reference: int) -> tuple[Array, Array]:
    """R positions drawn uniformly without replacement from each rollout's valid tokens.

    [B, T] -> positions [B, R] int32, valid [B, R] bool (invalid where a rollout has fewer than
    R valid tokens). These are the reference branches of the `reference` threshold mode.
    """
    b, t = mask.shape
    r = min(num_reference, t)
    # Gumbel top-k over valid tokens = uniform sampling without replacement.
    noise = jax.random.gumbel(key, (b, t))
    scores = jnp.where(mask > 0, noise, -jnp.inf)
    _, positions = jax.lax.top_k(scores, r)
    valid = jnp.arange(r)[None, :] < jnp.sum(mask > 0, axis=-1, keepdims=True)
    positions = jnp.where(valid, positions, 0).astype(jnp.int32)
    pad = num_reference - r
    if pad:
        positions = jnp.pad(positions, ((0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    return positions, valid


def tokens_at(positions: Array, slots: Array, t: int) -> Array:
    """[B, M] positions and a [B, M] bool choice of slots -> [B, T] bool: the tokens the chosen
    slots point at. A [B, M, T] one-hot rather than a scatter: elementwise, so it shards along B
    as is."""
    return jnp.any((positions[..., None] == jnp.arange(t)) & slots[..., None], axis=1)


__all__ = [
    "candidate_count",
    "gather_tokens",
    "reference_positions",
    "select_candidates",
    "tokens_at",
    "window_kl_proxy",
]

