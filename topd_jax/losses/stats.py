"""Masked order statistics used by the thresholds and diagnostics; all jittable, all finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array


def unsharded(*xs: Array) -> tuple[Array, ...]:
    """The arrays without explicit sharding. Order statistics over a whole batch (sort, ranks)
    need every element on every device; under an Explicit-axes mesh that must be said."""

    def unshard(x):
        if any(axis is not None for axis in jax.typeof(x).sharding.spec):
            return jax.sharding.reshard(x, PartitionSpec())
        return x

    return tuple(unshard(x) for x in xs)


def masked_quantile(values: Array, valid: Array, q: float) -> tuple[Array, Array]:
    """The q-quantile of values[valid] (NumPy's default linear interpolation), any shape -> scalar.

    Returns (quantile, defined); `defined` is False and the quantile 0 when nothing is valid.
    """
    values, valid = unsharded(values, valid)
    if values.size == 0:
        return jnp.zeros((), jnp.float32), jnp.asarray(False)
    x = values.reshape(-1).astype(jnp.float32)
    v = valid.reshape(-1)
    n = jnp.sum(v)
    ordered = jnp.sort(jnp.where(v, x, jnp.inf))  # valid values first, ascending
    rank = q * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(rank).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = rank - lo
    x_lo = ordered[lo]
    x_hi = ordered[hi]
    quantile = x_lo + frac * (x_hi - x_lo)
    defined = n > 0
    return jnp.where(defined, quantile, 0.0), defined


def average_ranks(values: Array, valid: Array) -> Array:
    """1-based ranks of values among valid entries, ties get their mean rank; [N] -> [N].

    rank_i = #{j valid: x_j < x_i} + (#{j valid: x_j = x_i} + 1) / 2. O(N^2), meant for the
    B * M candidates of a batch.
    """
    x = values.astype(jnp.float32)
    vj = valid[None, :]
    less = jnp.sum((x[None, :] < x[:, None]) & vj, axis=-1)
    equal = jnp.sum((x[None, :] == x[:, None]) & vj, axis=-1)
    return less + (equal + 1) / 2.0


def spearman(x: Array, y: Array, valid: Array) -> Array:
    """Spearman rank correlation of x and y over valid entries (any shape); 0 when undefined.

    rho = Pearson(rank(x), rank(y)) with average ranks for ties, as scipy.stats.spearmanr.
    """
    x, y, valid = unsharded(x, y, valid)
    x = x.reshape(-1)
    y = y.reshape(-1)
    v = valid.reshape(-1)
    w = v.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    rx = average_ranks(x, v)
    ry = average_ranks(y, v)
    rx = (rx - jnp.sum(rx * w) / n) * w
    ry = (ry - jnp.sum(ry * w) / n) * w
    denom = jnp.sqrt(jnp.sum(rx * rx) * jnp.sum(ry * ry))
    return jnp.where(denom > 0, jnp.sum(rx * ry) / jnp.where(denom > 0, denom, 1.0), 0.0)


def masked_histogram(values: Array, valid: Array, *, bins: int, low: float, high: float) -> Array:
    """Counts of values[valid] in `bins` equal bins over [low, high] (outliers clipped in). -> [bins]."""
    values, valid = unsharded(values, valid)
    x = values.reshape(-1).astype(jnp.float32)
    idx = jnp.clip(jnp.floor((x - low) / (high - low) * bins), 0, bins - 1).astype(jnp.int32)
    return jnp.zeros((bins,), jnp.float32).at[idx].add(valid.reshape(-1).astype(jnp.float32))


def mean_where(values: Array, where: Array) -> Array:
    """The mean of values over the entries `where` (0 when there is none)."""
    return jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(jnp.sum(where), 1)
