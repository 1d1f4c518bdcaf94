"""Per-device figures of compiled programs and of abstract sharded arrays, for the plan.

    program_figures(compiled)      # FLOPs, HBM bytes, collectives, loops (`hlo`, loops per iteration)
    per_device_bytes(tree)         # bytes one device holds of a tree of sharded arrays
    computed_bytes(params)         # bytes of the weights one device computes with (its model-parallel share)

`measure` (the phases) and `steps` (the decode loops' steps compiled alone) read their figures here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from topd_jax.hardware import hlo
from topd_jax.hardware.hlo import KINDS
from topd_jax.models.sharding import mesh_axes


@dataclasses.dataclass(frozen=True)
class ProgramFigures:
    """The FLOPs, bytes and loops of one compiled program, per device (`measure`'s docstring)."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    xla_flops: float = 0.0
    xla_hbm_bytes: float = 0.0
    loops: tuple[int | None, ...] = ()
    uncounted: dict[str, int] = dataclasses.field(default_factory=dict)


def program_figures(compiled: Any, module: hlo.Module | None = None) -> ProgramFigures:
    """`ProgramFigures` of a compiled program (`module`: its parsed `as_text()`, when at hand)."""
    module = module if module is not None else hlo.parse(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return ProgramFigures(
        flops=hlo.flops(module), hbm_bytes=hlo.hbm_bytes(module),
        collectives={k: float(v) for k, v in hlo.collective_bytes(module).items()},
        xla_flops=float(cost.get("flops", 0.0)), xla_hbm_bytes=float(cost.get("bytes accessed", 0.0)),
        loops=tuple(n for _, _, n in module.trip_counts), uncounted=hlo.uncounted_kernels(module))


def per_device_bytes(tree: Any) -> float:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (its largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return float(total)


def computed_bytes(params: Any) -> float:
    """Bytes of the weights one device computes with: its share under the model-parallel axes
    (`tensor`, `expert`) only. Weights split over `fsdp` or `data` are gathered before use, so a
    decode step must read (receive) all of them; this is the weights term of its bound."""

    def one(x):
        share = math.prod(x.sharding.mesh.shape[a] for entry in x.sharding.spec for a in mesh_axes(entry)
                          if a in ("tensor", "expert"))
        return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize / share

    return float(sum(one(x) for x in jax.tree.leaves(params)))


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves placed on the matching leaves of `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


__all__ = ["ProgramFigures", "computed_bytes", "per_device_bytes", "program_figures", "with_shardings"]
