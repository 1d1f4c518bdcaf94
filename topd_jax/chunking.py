"""Row-chunked, rematerialised maps: how vocabulary-sized work stays one chunk wide in memory.

Shared by the losses (analytic reverse KL over [B*T, V] logits) and scoring (log-probs of the
sampled tokens): both flatten rows and never hold more than a [chunk_size, V] slab at once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunked_rows(fn: Callable, *arrays, chunk_size: int):
    """map fn over row chunks of [R, ...] arrays -> fn's outputs (any pytree) stacked as [R, ...].

    fn takes and returns arrays whose leading axis is a chunk of rows. The rows are padded to a
    multiple of chunk_size (padding rows are computed and dropped) and mapped with `lax.map`, so
    only one chunk's intermediates (e.g. [chunk_size, V] logits) are live at a time. fn is
    rematerialised (`jax.checkpoint`): the backward pass recomputes each chunk instead of storing
    [R, V] residuals. fn may close over traced arrays (model parameters); they get gradients.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"chunked_rows needs arrays with one row count, got {[a.shape for a in arrays]}")
    if n == 0:  # nothing to map (e.g. one-token sequences): empty outputs of fn's row shapes
        rows = jax.eval_shape(fn, *[jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype) for a in arrays])
        return jax.tree.map(lambda s: jnp.zeros((0,) + s.shape[1:], s.dtype), rows)
    chunk_size = min(chunk_size, n)
    pad = (-n) % chunk_size
    chunks = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((-1, chunk_size) + a.shape[1:])
              for a in arrays]
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(chunks))
    return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)
