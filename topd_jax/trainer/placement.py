"""Where every array of a step lives on the mesh, and the jitted (pjit) update functions.

Parameters follow the logical-axis rules (`models.sharding`); optimizer moments follow the
parameter they belong to; scalars (counts, step, key) are replicated; every per-rollout array is
split along its leading B axis over the batch mesh axes. `jit_update` / `jit_sft_update` are
`jax.jit` with these shardings as in_shardings/out_shardings and the state donated, so the
compiled step never reshards or copies its state. Host data enters through `put_global`, which
is multi-host safe: every process holds the whole (small) host batch and contributes its shards.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from topd_jax.losses.topd import TopdConfig
from topd_jax.models.decoder import KVCache
from topd_jax.models.sharding import (DEFAULT_RULES, Rules, batch_sharding, cache_shardings, logical_sharding,
                                     make_mesh, mesh_axes)
from topd_jax.trainer.step import Experience, TrainState, sft_update, update



def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_mesh(devices) -> Mesh:
    """A pure data-parallel mesh over `devices` (one device: everything local)."""
    return make_mesh(data=len(devices), devices=devices)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A NamedSharding per leaf: nnx Variables (params and the optimizer moments that mirror them
    keep the param's metadata) by their logical axes, anything else replicated."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("out_sharding")
            if axes is not None:
                return leaf.replace(logical_sharding(axes, leaf.shape, mesh, rules))
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: TrainState, mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """Shardings of a (possibly abstract) TrainState."""
    return TrainState(step=replicated(mesh), params=tree_shardings(state.params, mesh, rules),
                      opt_state=tree_shardings(state.opt_state, mesh, rules), key=replicated(mesh))


def batch_size_divides(batch: int, mesh: Mesh, rules: Rules | None = None) -> None:
    """One-line error unless the B rollouts split evenly over the mesh axes of the batch rule."""
    table = {**dict(DEFAULT_RULES), **(dict(rules) if rules else {})}
    ways = math.prod(mesh.shape[a] for a in mesh_axes(table["batch"]))
    if batch % ways:
        raise ValueError(f"{batch} rollouts per step (prompts_per_step x num_samples) do not split over the "
                         f"{ways} batch shards of mesh {dict(mesh.shape)}; use a multiple of {ways}")


def experience_shardings(batch: Experience, mesh: Mesh, rules: Rules | None = None) -> Experience:
    """Every leaf of the nested experience (rollout, scores, located) split along its B axis."""
    return jax.tree.map(lambda x: batch_sharding(mesh, x.shape, rules), batch)


def phase_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Shardings of a phase's outputs (Rollout, Scores, Located) on `mesh`, for moving them to the
    next phase's mesh: KV caches by `CACHE_AXES` (batch and kv heads split), every other array along
    its leading B axis, scalars replicated."""

    def one(node):
        if isinstance(node, KVCache):
            return cache_shardings(node, mesh, rules)
        return batch_sharding(mesh, node.shape, rules) if node.ndim else replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=lambda node: isinstance(node, KVCache))


def put_global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from host data every process holds in full (multi-host safe)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def put_batch(arrays: tuple[np.ndarray, ...], mesh: Mesh, rules: Rules | None = None) -> tuple[jax.Array, ...]:
    """Host [B, ...] arrays onto the mesh, split along B."""
    return tuple(put_global(a, batch_sharding(mesh, np.shape(a), rules)) for a in arrays)


def put_local_batch(arrays: tuple[np.ndarray, ...], mesh: Mesh, rules: Rules | None = None) -> tuple[jax.Array, ...]:
    """This process's rows [B / processes, ...] of each array onto the mesh, split along B (the
    processes' rows concatenated in process order form the global batch)."""
    out = []
    for a in arrays:
        shape = (np.shape(a)[0] * jax.process_count(), *np.shape(a)[1:])
        out.append(jax.make_array_from_process_local_data(batch_sharding(mesh, shape, rules), np.asarray(a), shape))
    return tuple(out)


def place(tree: Any, shardings: Any) -> Any:
    """Move arrays onto the given shardings (a no-op where they already are)."""
    return jax.device_put(tree, shardings)


def jit_update(state: TrainState, batch: Experience, mesh: Mesh, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, loss: TopdConfig, chunk_size: int, rules: Rules | None = None):
    """`step.update` as pjit: explicit in/out shardings from `state` and `batch` (abstract is
    fine), the state donated; metrics come back replicated."""
    fn = functools.partial(update, graphdef=graphdef, optimizer=optimizer, loss=loss, chunk_size=chunk_size)
    shardings = state_shardings(state, mesh, rules)
    return jax.jit(fn, in_shardings=(shardings, experience_shardings(batch, mesh, rules)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_sft_update(state: TrainState, batch_shape: tuple[int, int], mesh: Mesh, *, graphdef: nnx.GraphDef,
                   optimizer: optax.GradientTransformation, chunk_size: int = 512, rules: Rules | None = None):
    """`step.sft_update` as pjit: (state, tokens, mask, loss_mask), each of `batch_shape` [B, L]."""
    fn = functools.partial(sft_update, graphdef=graphdef, optimizer=optimizer, chunk_size=chunk_size)
    shardings = state_shardings(state, mesh, rules)
    rows = batch_sharding(mesh, batch_shape, rules)
    return jax.jit(fn, in_shardings=(shardings, rows, rows, rows), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=0)


__all__ = ["batch_size_divides", "data_mesh", "experience_shardings", "jit_sft_update", "jit_update", "phase_shardings",
           "place", "put_batch", "put_global", "put_local_batch", "replicated", "state_shardings", "tree_shardings"]
