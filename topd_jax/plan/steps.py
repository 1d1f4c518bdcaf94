"""One step of each decode loop compiled alone: the figures the plan multiplies by the loop's steps.

    mid, first = sample_steps(rollout, graphdef, params, config, mesh, progress)
    windows = branch_steps(rollout, scores, located, ...)

The decode loops (`generate`'s one-token steps, `branch`'s K window steps) stop when every row has
sampled an EOS, so they have no trip count and the phase's program counts their body once. One
step is compiled here through the model's own step function (`CausalLM.__call__` on one token
against the cache, `CausalLM.branch_step`) with the cache filled to a static index (a Python int,
so the block loop of `attention.decode_attend` has a trip count and its reads are counted).

The sampling step is compiled at two filled lengths: the mean of a loop run to the cap,
x_mid = P + N / 2, and the first step, x_0 = P. A step's FLOPs, HBM bytes and collectives are
affine in the filled length x (the KV read and the attention scores grow with it, the weights do
not), so between those two points

    step(x) = step(x_0) + (x - x_0) (step(x_mid) - step(x_0)) / (x_mid - x_0)

gives a step at any mean filled length a rollout mode runs at (`plan.modes`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Format, Layout

from topd_jax.losses.locators import LOCATORS
from topd_jax.models.decoder import KVCache, init_branch_cache
from topd_jax.models.sharding import batch_sharding, logical_sharding
from topd_jax.plan.figures import computed_bytes, per_device_bytes, program_figures, with_shardings
from topd_jax.trainer import phases, placement


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """One step of a decode loop compiled alone: its model, FLOPs and HBM bytes per device
    (`ProgramFigures`: the step's scanned layers per iteration; xla_*: XLA's cost analysis), and
    the number of steps the phase runs at most (max_new_tokens or the window K). weight_bytes and
    cache_bytes: the device's share of the model's weights and of the KV cache slots the step
    attends to, the bytes it must read (the plan prints hbm_bytes / their sum). index: the cache
    slot it writes (it reads index + 1 slots of each row; the prefix end for a window step)."""

    model: str
    steps: int
    flops: float
    hbm_bytes: float
    collectives: dict[str, float]
    compile_s: float
    xla_flops: float = 0.0
    xla_hbm_bytes: float = 0.0
    uncounted: dict[str, int] = dataclasses.field(default_factory=dict)
    weight_bytes: float = 0.0
    cache_bytes: float = 0.0
    index: int = 0

    @property
    def loop_flops(self) -> float:
        return self.steps * self.flops

    @property
    def loop_hbm_bytes(self) -> float:
        return self.steps * self.hbm_bytes


def generate_step(graphdef, params, tokens, alive, keys, values, valid, *, index):
    """One sampling step with the cache filled to slot `index` (a Python int: the step's reads are
    static, so the plan counts them; `generate` runs the same code at a traced index)."""
    cache = KVCache(keys, values, valid, index)
    return nnx.merge(graphdef, params)(tokens[:, None], attention_mask=alive[:, None], cache=cache)


def branch_step(graphdef, params, fed, positions, cache, last, branch_kv, step, *, prefix_end):
    """One window step with every branch's prefix read up to `prefix_end` slots (static)."""
    return nnx.merge(graphdef, params).branch_step(fed, positions, cache, last, branch_kv, step, prefix_end)


def lower_step(step, graphdef, *args, carried: tuple[int, ...], invariant: tuple[int, ...] = ()):
    """Lower one loop step alone, for its FLOPs and bytes, as the loop runs it: the carried buffers
    (args[carried]: the cache, or the branches' cache) donated and in a layout the compiler picks,
    in and out, and the loop-invariant ones it only reads (args[invariant]: the prefix cache of the
    windows) in a layout it picks too. In the loop the carry keeps one layout from step to step and
    an invariant input is laid out once before the first; a step compiled alone with the caller's
    default layouts would copy the whole cache into its preferred one at every step, a conversion
    the loop makes once or never."""
    fn = functools.partial(step, graphdef)
    shardings = [jax.tree.map(lambda x: x.sharding, a) for a in args]
    for i in (*carried, *invariant):
        shardings[i] = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding) if x.ndim >= 3 else x.sharding, args[i])
    out = jax.eval_shape(fn, *args)
    mesh = next(x.sharding.mesh for x in jax.tree.leaves(args))
    # The carried outputs keep the carried inputs' formats (the loop's next step reads them).
    formats = {a.shape: f for i in carried for a, f in zip(jax.tree.leaves(args[i]), jax.tree.leaves(shardings[i]))}
    out_shardings = jax.tree.map(lambda x: formats.get(x.shape) if x.ndim >= 3 and x.shape in formats
                                 else batch_sharding(mesh, x.shape) if x.ndim else placement.replicated(mesh), out)
    return jax.jit(fn, in_shardings=tuple(shardings), out_shardings=out_shardings,
                   donate_argnums=carried).lower(*args)


def decode_step(model: str, steps: int, lower: Callable[[], Any], mesh, weight_bytes: float,
                cache_bytes: float, index: int) -> DecodeStep | None:
    """Compile one step and read its figures; None when it does not compile (the phase's own
    figures carry the reason)."""
    begin = time.perf_counter()
    try:
        with jax.set_mesh(mesh), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
            compiled = lower().compile()
    except Exception:
        return None
    p = program_figures(compiled)
    return DecodeStep(model, steps, p.flops, p.hbm_bytes, p.collectives, time.perf_counter() - begin,
                      xla_flops=p.xla_flops, xla_hbm_bytes=p.xla_hbm_bytes, uncounted=p.uncounted,
                      weight_bytes=weight_bytes, cache_bytes=cache_bytes, index=index)


def sample_steps(rollout, graphdef, params, config, mesh, progress: Callable[[str], None], first: bool = True
                 ) -> tuple[DecodeStep | None, DecodeStep | None]:
    """The sampling step at the mean filled length of a loop run to the cap (P + N / 2) and at
    its first step (P): (mid, first); first=False skips the second (module docstring)."""
    b = rollout.tokens.shape[0]
    rows = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding(mesh, (b,)))
    alive = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sharding(mesh, (b,)))
    cache, n, p = rollout.cache, config.rollout.max_new_tokens, config.data.prompt_length
    out = []
    for what, index in (("", p + n // 2), (" at its first slot", p))[:2 if first else 1]:
        progress(f"compiling one decode step of sample{what} ...")
        out.append(decode_step("student", n, lambda index=index: lower_step(
            functools.partial(generate_step, index=index), graphdef, params, rows, alive, cache.keys, cache.values,
            cache.valid, carried=(3, 4)), mesh, computed_bytes(params),
            per_device_bytes((cache.keys, cache.values)) * (index + 1) / cache.max_len, index))
    return out[0], out[1] if first else None


def branch_steps(rollout, scores, located, graphdef, params, t_graphdef, t_params, s_cfg, t_cfg, config, loss, mesh,
                 progress: Callable[[str], None]) -> tuple[DecodeStep, ...]:
    """One window step of each branching model, with prefixes of the mean length (a candidate t
    of the N completion tokens is N / 2 in on average); the branch caches split as the KV cache is."""
    if located is None or not loss.uses_windows or scores is None or scores.cache is None:
        return ()
    b = rollout.tokens.shape[0]
    points = located.positions.shape[1]
    ot = LOCATORS[loss.locator].branches
    if ot and located.reference_positions is not None:
        points += located.reference_positions.shape[1]
    shape = (b, points)
    index = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated(mesh))
    models = [("teacher", t_graphdef, t_params, t_cfg, scores.cache, config.teacher.dtype)]
    if ot:
        models.append(("student", graphdef, params, s_cfg, rollout.cache, config.student.dtype))
    prefix_end = config.data.prompt_length + config.rollout.max_new_tokens // 2
    found = []
    for name, gd, ps, cfg, cache, dtype in models:
        kv = jax.eval_shape(lambda: init_branch_cache(cfg, b, points, loss.window, phases.DTYPES[dtype]))
        kv = with_shardings(kv, jax.tree.map(lambda x: logical_sharding(
            ("batch", "layers", None, None, "kv_heads", "head_dim"), x.shape, mesh), kv))
        progress(f"compiling one window step of branch ({name}) ...")
        one = decode_step(name, loss.window, functools.partial(
            lower_step, functools.partial(branch_step, prefix_end=prefix_end), gd, ps, index, index, cache,
            index, kv, step, carried=(5,), invariant=(3,)), mesh, computed_bytes(ps),
            per_device_bytes((cache.keys, cache.values)) * prefix_end / cache.max_len + per_device_bytes(kv),
            prefix_end)
        if one is not None:
            found.append(one)
    return tuple(found)


__all__ = ["DecodeStep", "branch_step", "branch_steps", "decode_step", "generate_step", "lower_step", "sample_steps"]
