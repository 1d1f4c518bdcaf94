"""Row-chunked, rematerialised maps: how vocabulary-sized work stays one chunk wide in memory.

Shared by the losses (analytic reverse KL over [B*T, V] logits) and scoring (log-probs of the
sampled tokens): both flatten rows and never hold more than a [chunk_size, V] slab at once.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from topd_jax.models.sharding import constrain_batch, context_mesh, logical_to_spec, mesh_axes


def row_shards(rows: int) -> int:
    """How many devices hold the rows of a [rows, ...] array split by the batch rule under the
    context mesh (`jax.set_mesh`): the product of the batch axes that divide `rows`; 1 without one."""
    mesh = context_mesh()
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in mesh_axes(logical_to_spec(("batch",), (rows,), mesh)[0]))


def chunked_rows(fn: Callable, *arrays, chunk_size: int):
    """map fn over row chunks of [R, ...] arrays -> fn's outputs (any pytree) stacked as [R, ...].

    fn takes and returns arrays whose leading axis is a chunk of rows. The rows are padded to a
    multiple of chunk_size (padding rows are computed and dropped) and mapped with `lax.map`, so
    only one chunk's intermediates (e.g. [chunk_size, V] logits) are live at a time. fn is
    rematerialised (`jax.checkpoint`): the backward pass recomputes each chunk instead of storing
    [R, V] residuals. fn may close over traced arrays (model parameters); they get gradients.

    Per-device chunks: under a context mesh whose batch axes split the R rows over d = `row_shards(R)`
    devices (each holding R / d consecutive rows, as a [B, ...] batch split along B flattens), the
    rows are laid out [d, R / d] and each iteration takes chunk_size rows of every device at once
    ([d x chunk_size] rows, split along d), so every device maps over its own rows: no chunk is
    computed on devices that do not hold it, and no [chunk, V] slab is reduced across devices.
    The results equal the global chunking's row by row (each row is computed alone either way).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"chunked_rows needs arrays with one row count, got {[a.shape for a in arrays]}")
    if n == 0:  # nothing to map (e.g. one-token sequences): empty outputs of fn's row shapes
        rows = jax.eval_shape(fn, *[jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype) for a in arrays])
        return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape[1:], s.dtype), rows)
    d = row_shards(n)
    per_device = n // d
    chunk_size = min(chunk_size, per_device)
    pad = (-per_device) % chunk_size

    def split(a):  # [R, ...] -> [count, d * chunk, ...]: iteration i holds chunk i of every device
        a = jnp.pad(a.reshape((d, per_device) + a.shape[1:]), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 1))
        a = jnp.swapaxes(a.reshape((d, -1, chunk_size) + a.shape[2:]), 0, 1)
        return a.reshape((a.shape[0], d * chunk_size) + a.shape[3:])

    def body(xs):
        return jax.checkpoint(fn)(*constrain_batch(xs))

    out = jax.lax.map(body, tuple(split(a) for a in arrays))

    def join(o):  # [count, d * chunk, ...] -> [R, ...]
        o = jnp.swapaxes(o.reshape((o.shape[0], d, chunk_size) + o.shape[2:]), 0, 1)
        return o.reshape((d, -1) + o.shape[3:])[:, :per_device].reshape((n,) + o.shape[3:])

    return jax.tree.map(join, out)
