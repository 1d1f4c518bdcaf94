"""Compile every phase of one train step for a set of devices and measure it, per device.

    report = plan_step(config, devices)      # devices: a TPU topology's compile-only devices
    [p.phase for p in report.phases]         # ["sample", "score", "branch", "train"]

The phases are the trainer's own: `phases.no_gradient_phases`, the chain `Trainer.train_step` runs,
is called here with a `run` that lowers and compiles each phase under `jax.set_mesh` of its mesh
(`phases.PHASE_MESH`: sampling and branching on the inference mesh, scoring on the training mesh)
instead of running it, then `placement.jit_update` on the training mesh. The meshes are the
trainer's (`runtime.mesh_from_config`, `runtime.inference_mesh`). Their inputs are abstract
(`jax.ShapeDtypeStruct` with a sharding): the models from `config.json` alone
(`phases.abstract_model`), the state from `jax.eval_shape(init_state, ...)` on
`placement.state_shardings`, the student's parameters resharded to the inference mesh
(`Trainer.inference_params`), the teacher's on it, the prompts on its batch sharding, each phase's
outputs (shapes from the lowering, shardings from the compiled program) feeding the next, and the
update's batch from `jax.eval_shape(step.experience, rollout, scores, located)` on
`placement.experience_shardings` of the training mesh.

Figures of a phase, all per device (the compiled program is the partitioned one):
  args, out, alias, temp   `compiled.memory_analysis()`: argument, output, aliased (donated
                           argument buffers reused for outputs) and temporary bytes
  held                     bytes of the step's long-lived arrays the phase does not take as
                           arguments but that stay in HBM while it runs: the optimizer state and
                           teacher params during sampling, the student's state during scoring, its
                           optimizer state during branching, the teacher's params during the update
  peak                     args + out - alias + temp + held
  flops                    `hlo.flops`: matmul FLOPs (dot, convolution, Mosaic kernels such as
                           splash attention) read from `compiled.as_text()`, each loop of known trip
                           count (the scanned layers, chunked losses, the OT solver) per iteration
  hbm_bytes                `hlo.hbm_bytes`: bytes the top-level instructions read and write, loops
                           likewise per iteration
  collectives              `hlo.collective_bytes`, loops likewise per iteration
  xla_flops, xla_hbm_bytes `compiled.cost_analysis()` "flops" and "bytes accessed", as XLA counts
                           them: every while loop's body once
  loops                    the trip count of each while loop of the program (None: not a counted
                           loop, its body counted once); uncounted: Mosaic kernels and other custom
                           calls with no FLOPs rule, counted 0 ({name: times run})
XLA's cost analysis counts a while loop's body once (checked: a loop of 4 and one of 16 matmuls
both report one matmul's FLOPs); `hlo` reads the trip count of counted loops from the program's
structure. The decode loops (`generate`'s one-token steps, `branch`'s K window steps) stop when
every row has sampled an EOS, so they have no trip count and their body counts once; one step is
also compiled on its own (`plan.steps`) and reported with the number of steps the phase runs at
most; `DecodeStep.loop_*` are steps x step. The sample phase is also planned per rollout mode at
the rollouts' lengths (`plan.lengths`, `plan.modes`): `StepPlan.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from topd_jax.losses.locators import LOCATORS
from topd_jax.models.sharding import batch_sharding
from topd_jax.errors import first_line
from topd_jax.hardware import hlo
from topd_jax.hardware.hlo import KINDS
from topd_jax.plan import modes, steps
from topd_jax.plan.bound import Bound, sample_bound, score_bound, update_bound, window_bound
from topd_jax.plan.figures import ProgramFigures, computed_bytes, per_device_bytes, program_figures, with_shardings
from topd_jax.plan.lengths import Lengths, parse_lengths
from topd_jax.plan.steps import DecodeStep
from topd_jax.trainer import placement, phases
from topd_jax.trainer.config import TrainConfig
from topd_jax.trainer.runtime import inference_mesh, mesh_from_config
from topd_jax.trainer.step import experience, init_state

PHASES = ("sample", "score", "branch", "train")  # the trainer's time keys, in step order


class _ChainStopped(Exception):
    """A phase did not lower or compile to outputs: the phases after it cannot be lowered."""


@dataclasses.dataclass(frozen=True)
class PhaseFigures:
    """The compiled figures of one phase (module docstring); `error` is the compiler's one-line
    reason when it did not compile (then `peak` is a lower bound: the HBM the compiler's message
    says it needs, plus `held`; NaN when it does not say)."""

    phase: str
    args: float = 0.0
    out: float = 0.0
    alias: float = 0.0
    temp: float = 0.0
    held: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    compile_s: float = 0.0
    decode: tuple[DecodeStep, ...] = ()
    xla_flops: float = 0.0
    xla_hbm_bytes: float = 0.0
    loops: tuple[int | None, ...] = ()  # each while loop's trip count (None: counted once)
    uncounted: dict[str, int] = dataclasses.field(default_factory=dict)  # custom calls counted 0
    error: str | None = None
    oom_used: float | None = None
    largest: tuple[tuple[int, str, str, str], ...] = ()  # hlo.largest_arrays, when asked for
    bound: Bound | None = None  # what the phase must cost at least (`bound`)

    @property
    def peak(self) -> float:
        if self.error is not None:
            return self.oom_used if self.oom_used is not None else math.nan
        return self.args + self.out - self.alias + self.temp + self.held


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The phases of one train step on `devices` (a mesh of `mesh_shape`), in step order."""

    phases: tuple[PhaseFigures, ...]
    mesh_shape: dict[str, int]
    num_devices: int
    student_layers: tuple[int, int]  # (compiled, in config.json)
    teacher_layers: tuple[int, int]
    inference_mesh_shape: dict[str, int] = dataclasses.field(default_factory=dict)  # sample, branch
    sampling: modes.Sampling | None = None  # the sample phase per rollout mode at the plan's lengths


def _batch_split(tree: Any, mesh) -> Any:
    """Stand-in shardings for a phase's outputs when it did not compile: leading axis split along
    the batch rule (as the decode loops pin their carries), scalars replicated."""
    def one(x):
        if not x.shape:
            return placement.replicated(mesh)
        return batch_sharding(mesh, x.shape)
    return jax.tree.map(one, tree)


# XLA:TPU's out-of-memory messages: "Used 120.5G of 95.74G hbm" and "the total memory required for HLO
# temporaries (205.95G) exceeds available HBM (95.74G)".
_OOM_USED = (re.compile(r"Used\s+([0-9.]+)([KMGT]?)i?B?\s+of\s+[0-9.]+[KMGT]?i?B?\s+hbm", re.IGNORECASE),
             re.compile(r"required for HLO temporaries\s*\(([0-9.]+)([KMGT]?)i?B?\)", re.IGNORECASE))
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_used_bytes(message: str) -> float | None:
    """The HBM bytes an out-of-memory compile error says the program needs (its total, or its
    temporaries alone: either way a lower bound of the peak), or None when it does not say."""
    for pattern in _OOM_USED:
        match = pattern.search(message)
        if match:
            return float(match[1]) * _UNITS[match[2].upper()]
    return None


def _figures(phase: str, compiled: Any, held: float, seconds: float, buffers: int) -> PhaseFigures:
    memory = compiled.memory_analysis()
    module = hlo.parse(compiled.as_text())
    program = program_figures(compiled, module)
    return PhaseFigures(
        phase=phase, args=float(memory.argument_size_in_bytes), out=float(memory.output_size_in_bytes),
        alias=float(memory.alias_size_in_bytes), temp=float(memory.temp_size_in_bytes), held=held,
        compile_s=seconds, largest=tuple(hlo.largest_arrays(module, buffers)) if buffers else (),
        **dataclasses.asdict(program))


def _compile(phase: str, lower: Callable[[], Any], held: float, mesh, buffers: int
             ) -> tuple[PhaseFigures, Any]:
    """Lower and compile one phase: (figures, its abstract outputs with their shardings or None)."""
    begin = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            lowered = lower()
    except Exception as err:  # a trace error of this config: nothing downstream can be lowered
        return PhaseFigures(phase, held=held, error=f"did not lower: {first_line(err)}"), None
    try:
        with warnings.catch_warnings():
            # A compile-only executable (a topology without a TPU) cannot be loaded back from the
            # persistent compilation cache: the read fails harmlessly and the compile proceeds.
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
            compiled = lowered.compile()
    except Exception as err:
        message = str(err)
        figures = PhaseFigures(phase, held=held, compile_s=time.perf_counter() - begin,
                               error=first_line(err), oom_used=oom_used_bytes(message))
        if figures.oom_used is not None:
            figures = dataclasses.replace(figures, oom_used=figures.oom_used + held)
        return figures, with_shardings(lowered.out_info, _batch_split(lowered.out_info, mesh))
    out = with_shardings(lowered.out_info, compiled.output_shardings)
    return _figures(phase, compiled, held, time.perf_counter() - begin, buffers), out


def _abstract_params(cfg, dtype: str, mesh):
    graphdef, params = nnx.split(phases.abstract_model(cfg, dtype), nnx.Param)
    return graphdef, with_shardings(params, placement.tree_shardings(params, mesh))


def plan_step(config: TrainConfig, devices, *, student_layers: int | None = None,
              teacher_layers: int | None = None, decode_steps: bool = True, buffers: int = 0,
              only: tuple[str, ...] | None = None, lengths: Lengths | str = "max",
              progress: Callable[[str], None] = lambda line: None) -> StepPlan:
    """Compile the four phases of `config`'s train step for `devices` (module docstring).

    student_layers / teacher_layers cut the models to their first layers (compile time grows with
    depth); decode_steps=False skips the separately compiled loop steps; buffers > 0 lists each
    phase's largest materialised arrays (`hlo.largest_arrays`). `only` compiles just these phases:
    the others are lowered for their outputs' shapes, which take the batch-split shardings the decode
    loops pin (the update's input shardings are its own either way). `lengths` (a `plan.lengths`
    spec or its parse) gives the rollouts' lengths the sample phase is planned at per rollout mode
    (`plan.modes`; the config's `rollout.mode` is the sample phase's). `progress` gets one line per
    compiled program.
    """
    bad = sorted(set(only or ()) - set(PHASES))
    if bad:
        raise ValueError(f"unknown phase {', '.join(bad)}; phases: {', '.join(PHASES)}")
    lengths = parse_lengths(lengths) if isinstance(lengths, str) else lengths
    modes.check_mode(config.rollout.mode)
    mesh = mesh_from_config(config.mesh, devices)
    r = config.rollout
    placement.batch_size_divides(r.prompts_per_step * r.num_samples, mesh)
    s_full = phases.model_config(config.student, compute=config.model)
    t_full = phases.model_config(config.teacher, compute=config.model)
    inf_mesh = inference_mesh(config.inference, mesh, s_full, t_full)
    placement.batch_size_divides(r.prompts_per_step * r.num_samples, inf_mesh)
    s_cfg = phases.model_config(config.student, student_layers, compute=config.model)
    t_cfg = phases.model_config(config.teacher, teacher_layers, compute=config.model)
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise ValueError(f"student vocab_size {s_cfg.vocab_size} != teacher vocab_size {t_cfg.vocab_size}; TOPD "
                         "compares the two models' tokens, so they must share a tokenizer")
    graphdef, s_params = _abstract_params(s_cfg, config.student.dtype, mesh)
    t_graphdef, t_params = _abstract_params(t_cfg, config.teacher.dtype, inf_mesh)  # lives there
    loss = config.loss
    optimizer = config.optimizer.build(config.steps)
    init = functools.partial(init_state, optimizer=optimizer)
    state = jax.eval_shape(init, s_params, key=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state = with_shardings(state, placement.state_shardings(state, mesh))
    # The student's parameters as the no-gradient phases read them (Trainer.inference_params).
    params = state.params if inf_mesh is mesh else \
        with_shardings(state.params, placement.tree_shardings(state.params, inf_mesh))
    replicated = placement.replicated(inf_mesh)
    keys = jax.eval_shape(lambda k: jax.random.split(jax.random.fold_in(k, 0)), state.key)
    k_sample = k_locate = jax.ShapeDtypeStruct(keys.shape[1:], keys.dtype, sharding=replicated)
    shape = (r.prompts_per_step, config.data.prompt_length)
    prompt_tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(inf_mesh, shape))
    prompt_mask = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sharding(inf_mesh, shape))
    sampling = r  # the rollout options are the static options of sampling and branching
    # The teacher for scoring on the training mesh (Trainer.teacher_score_params), a second copy when
    # the meshes differ; with them, the training state's parameters stay beside the resharded copy.
    apart = inf_mesh is not mesh
    t_score = with_shardings(t_params, placement.tree_shardings(t_params, mesh)) if apart else t_params
    train_params, copies = (state.params, t_score) if apart else ((), ())
    meshes = {name: inf_mesh if where == "inference" else mesh for name, where in phases.PHASE_MESH.items()}
    held = {"sample": per_device_bytes((train_params, state.opt_state, t_params, copies)),
            "score": per_device_bytes((state.params, state.opt_state, (params, t_params) if apart else ())),  # + cache
            "branch": per_device_bytes((train_params, state.opt_state, copies)),
            "train": per_device_bytes((t_params, copies))}

    results: list[PhaseFigures] = []
    wanted = set(PHASES if only is None else only)
    failed: set[str] = set()

    def run(phase, lower, on=inf_mesh):
        if phase not in wanted:  # lowered for its outputs' shapes only
            progress(f"lowering {phase} (not compiled) ...")
            try:
                with jax.set_mesh(on):
                    lowered = lower()
            except Exception as err:
                results.append(PhaseFigures(phase, held=held[phase], error=f"did not lower: {first_line(err)}"))
                failed.add(phase)
                return None
            return with_shardings(lowered.out_info, _batch_split(lowered.out_info, on))
        progress(f"compiling {phase} ...")
        figures, out = _compile(phase, lower, held[phase], on, buffers)
        progress(f"  {phase}: {figures.compile_s:.1f} s" + (f" ({figures.error})" if figures.error else ""))
        results.append(figures)
        if figures.error is not None and out is None:
            failed.add(phase)
        return out

    def missing(phase, needs):
        results.append(PhaseFigures(phase, held=held[phase], error=f"not compiled: needs the outputs of {needs}"))
        failed.add(phase)

    outputs = {}

    def chained(name, phase, *args, **static):  # the trainer's chain, each phase lowered (and compiled)
        if name == "score":  # the rollout's cache waits in HBM for the branch phase
            held["score"] += per_device_bytes(outputs["sample"].cache)
        outputs[name] = run(name, lambda: phase.lower(*args, **static), on=meshes[name])
        if name in failed:
            raise _ChainStopped(name)
        return outputs[name]

    try:
        phases.no_gradient_phases(chained, lambda tree, name: with_shardings(
            tree, placement.phase_shardings(tree, meshes[name])), graphdef, params, t_graphdef, (t_score, t_params),
            prompt_tokens, prompt_mask, k_sample, k_locate, options=sampling, loss=loss, chunk_size=config.chunk_size)
    except _ChainStopped as stop:
        for later in PHASES[PHASES.index(stop.args[0]) + 1:-1]:
            missing(later, stop.args[0])
    rollout, scores, located = (outputs.get(name) for name in ("sample", "score", "branch"))
    if scores is not None:  # as the branch phase reads them (its cache included)
        scores = with_shardings(scores, placement.phase_shardings(scores, meshes["branch"]))
    trained = rollout, scores, located
    if loss.splices and located is not None:  # the splice phase remade the rollout and its scores
        trained = located
        located = trained[2]
    if failed:
        missing("train", ", ".join(sorted(failed)))
    else:
        batch = jax.eval_shape(experience, *trained)
        batch = with_shardings(batch, placement.experience_shardings(batch, mesh))
        jitted = placement.jit_update(state, batch, mesh, graphdef=graphdef, optimizer=optimizer, loss=loss,
                                      chunk_size=config.chunk_size)
        run("train", lambda: jitted.lower(state, batch), on=mesh)  # as Trainer._compile_update
    results = [r for r in results if r.phase in wanted or r.error is not None]

    bounds = _bounds(config, loss, rollout, scores, located, params, t_params, state.params, s_cfg, t_cfg, len(devices))
    results = [dataclasses.replace(r, bound=bounds.get(r.phase)) for r in results]
    mid = first = None
    if decode_steps and rollout is not None and wanted & {"sample", "branch"}:
        mid, first = steps.sample_steps(rollout, graphdef, params, config, inf_mesh, progress,
                                        first="sample" in wanted)
        windows = steps.branch_steps(rollout, scores, located, graphdef, params, t_graphdef, t_params, s_cfg, t_cfg,
                                     config, loss, inf_mesh, progress)
        results = [dataclasses.replace(r, decode=(mid,)) if r.phase == "sample" and mid is not None else
                   dataclasses.replace(r, decode=windows) if r.phase == "branch" and windows else r for r in results]
    sample = next((r for r in results if r.phase == "sample"), None)
    sampling = None if rollout is None else modes.plan_sampling(
        config, lengths, rollout.cache, params, s_cfg, len(devices), sample, mid, first)
    return StepPlan(tuple(results), dict(mesh.shape), len(devices), (s_cfg.num_layers, s_full.num_layers),
                    (t_cfg.num_layers, t_full.num_layers), dict(inf_mesh.shape), sampling)


def _bounds(config, loss, rollout, scores, located, params, t_params, train_params, s_cfg, t_cfg, n) -> dict:
    """Each phase's first-principles `Bound` from the shapes (per device: the weights' and caches'
    shares as the phases hold them; None where a phase's inputs are unknown)."""
    r = config.rollout
    b, p, new = r.prompts_per_step * r.num_samples, config.data.prompt_length, r.max_new_tokens
    out = {"score": score_bound(t_cfg, rows=b, length=p + new, scored=new, devices=n,
                                weight_bytes=computed_bytes(t_params))}
    if rollout is None:
        return out
    slots = rollout.cache.max_len
    s_slot = per_device_bytes((rollout.cache.keys, rollout.cache.values)) / slots
    out["sample"] = sample_bound(s_cfg, rows=b, prompt=p, new=new, devices=n, weight_bytes=computed_bytes(params),
                                 slot_bytes=s_slot)
    guided = located is not None and located.teacher_windows is not None
    m = 0 if located is None else located.positions.shape[1]
    packed = p + new + (m * located.teacher_windows.tokens.shape[-1] if guided else 0)
    out["train"] = update_bound(s_cfg, rows=b, length=packed, scored=packed - p, devices=n,
                                weight_bytes=computed_bytes(train_params))
    if located is None or not loss.uses_windows or scores is None or scores.cache is None:
        return out
    locator = LOCATORS[loss.locator]
    points = m + (located.reference_positions.shape[1]
                  if locator.branches and located.reference_positions is not None else 0)
    t_slot = per_device_bytes((scores.cache.keys, scores.cache.values)) / scores.cache.max_len
    prefix = p + new / 2
    parts = []
    if locator.branches or not loss.greedy_windows:
        parts.append(window_bound(t_cfg, rows=b, points=points, window=loss.window, prefix=prefix, devices=n,
                                  weight_bytes=computed_bytes(t_params), slot_bytes=t_slot))
    if locator.branches and locator.student_window != "rollout":
        parts.append(window_bound(s_cfg, rows=b, points=points, window=loss.window, prefix=prefix, devices=n,
                                  weight_bytes=computed_bytes(params), slot_bytes=s_slot))
    if loss.greedy_windows:
        parts.append(window_bound(t_cfg, rows=b, points=m, window=loss.window, prefix=prefix, devices=n,
                                  weight_bytes=computed_bytes(t_params), slot_bytes=t_slot))
    out["branch"] = Bound(tuple(parts))
    return out


__all__ = ["DecodeStep", "PHASES", "PhaseFigures", "ProgramFigures", "StepPlan", "oom_used_bytes", "per_device_bytes",
           "plan_step", "program_figures", "with_shardings"]
