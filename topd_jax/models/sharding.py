"""Logical-axis sharding: parameters name their axes, a rules table maps names to mesh axes.

Mesh axes (always all four; unused ones have size 1):
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters sharded along their `embed` axis (ZeRO-3 / FSDP)
  tensor  tensor parallelism: heads, MLP width and vocabulary split across devices
  expert  expert parallelism: MoE experts split across devices

A rule maps one logical axis to a mesh axis, a tuple of mesh axes, or None (replicated); the
`rules` argument of every function here overrides entries of DEFAULT_RULES. A
dimension whose size is not divisible by the mesh axes it maps to is replicated instead (e.g.
2 kv heads on tensor=4), and a mesh axis is used at most once per array, so the same rules fit
any mesh shape. Sharding is data: change the table, not the model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations and caches
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("cache_seq", None),
    # parameters (and caches: `layers` is the leading axis of the scanned layers' stacked
    # parameters and of the KV caches, unsharded by default)
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
)
CACHE_AXES = ("batch", "layers", "cache_seq", "kv_heads", "head_dim")  # KVCache keys/values [B, L, S, K, H]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh over `devices` (default: all), axes in Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor, expert)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor} expert={expert} needs "
                         f"{math.prod(shape)} devices, {len(devices)} given")
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)
    except NotImplementedError:  # a shape JAX cannot lay out along whole torus axes (e.g. 1x1x4x16 on 8x8)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _rules_dict(rules: Rules | Mapping[str, MeshAxes] | None) -> dict[str, MeshAxes]:
    """DEFAULT_RULES with the entries of `rules` overriding (or adding) logical axes."""
    given = {} if rules is None else dict(rules.items() if isinstance(rules, Mapping) else rules)
    return {**dict(DEFAULT_RULES), **given}


def mesh_axes(entry: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one rule target or PartitionSpec entry (a name, a tuple of names or None)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules | Mapping[str, MeshAxes] | None = None) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims are named `axes` (module docstring)."""
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {', '.join(sorted(table))}")
        target = table.get(name) if name is not None else None
        wanted = mesh_axes(target)
        chosen: list[str] = []
        for axis in wanted:
            if axis not in mesh.shape:
                raise ValueError(f"rule for {name!r} names mesh axis {axis!r}; mesh axes: {', '.join(mesh.axis_names)}")
            if axis in used or mesh.shape[axis] == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules | Mapping[str, MeshAxes] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def param_shardings(tree: Any, mesh: Mesh, rules: Rules | Mapping[str, MeshAxes] | None = None) -> Any:
    """NamedSharding for every Param of a module or state (abstract ones included)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)

    def one(var):
        axes = var.get_metadata().get("out_sharding")
        if axes is None:
            raise ValueError(f"parameter of shape {var.shape} names no logical axes (out_sharding)")
        return logical_sharding(axes, var.shape, mesh, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | Mapping[str, MeshAxes] | None = None) -> nnx.Module:
    """Move every parameter of `model` onto its sharding (in place; returns the model)."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s)), state, shardings,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


def batch_sharding(mesh: Mesh, shape: Sequence[int],
                   rules: Rules | Mapping[str, MeshAxes] | None = None) -> NamedSharding:
    """Sharding of a [B, ...] input (tokens, masks, positions): batch split, the rest replicated."""
    return logical_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules)


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules | Mapping[str, MeshAxes] | None = None) -> Any:
    """Shardings for a KVCache: keys/values by CACHE_AXES, valid by batch, index replicated."""
    kv = logical_sharding(CACHE_AXES, cache.keys.shape, mesh, rules)
    return type(cache)(kv, kv, batch_sharding(mesh, cache.valid.shape, rules),
                       NamedSharding(mesh, PartitionSpec()))


def context_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh` when it has this module's axes (MESH_AXES), else None:
    what code inside a traced function partitions by (batch constraints, MoE routing, kernels
    run per device in shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def constrain_batch(tree: Any, rules: Rules | Mapping[str, MeshAxes] | None = None) -> Any:
    """Inside `jax.set_mesh(mesh)`: split the leading B axis of every array of `tree` by the
    batch rule, other axes left to the partitioner (`PartitionSpec.UNCONSTRAINED`: a KV cache keeps
    its kv heads split over `tensor`); without a context mesh, `tree` unchanged.

    Decode loops start from zero-filled carries (caches, token buffers) that carry no sharding,
    so without this the partitioner may replicate a whole loop on every device.
    """
    mesh = context_mesh()
    if mesh is None:
        return tree

    def one(x):
        if not hasattr(x, "ndim") or x.ndim == 0:
            return x
        batch = logical_to_spec(("batch",), x.shape[:1], mesh, rules)[0]
        spec = PartitionSpec(batch, *(PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(one, tree)


def host_global(tree: Any) -> Any:
    """The global value of each array of `tree` (sharded, possibly over several hosts) as numpy,
    on every process: `jax.device_get` on one process, an all-gather across processes otherwise
    (every process then holds the same values, so host logic that reads them stays in step)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
