"""The step's no-gradient phases as the trainer jits them, and shape-only models.

    rollout = sample_phase(graphdef, params, prompt_tokens, prompt_mask, key, options=sampling)
    scores  = score_phase(teacher_graphdef, teacher_params, rollout, chunk_size=..., return_cache=...)
    located = locate_phase(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, key,
                           loss=loss, options=sampling)
    rollout, scores, located = splice_phase(...)    # instead of locate, for a splicing guidance
    rollout, scores, located = no_gradient_phases(run, move, ...)   # the three chained

Each phase is one program over (graphdef, params): no per-call graph traversal of the modules,
no op-by-op dispatch of the glue between the library's jitted functions. `no_gradient_phases` is
the one chain of them: `Trainer.train_step` runs it, each phase under `jax.set_mesh` of its mesh
(`PHASE_MESH`; the decode loops pin their carries to the batch axes), and `topd_jax.plan` lowers
the very same chain on abstract inputs for a TPU topology. The update is `placement.jit_update`.

`abstract_model` builds a `CausalLM` of shapes only (`nnx.eval_shape`): from `config.json` alone
for a checkpoint path (no weight file is opened), or from the random-model config.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from topd_jax.models.config import DTYPES, ModelConfig
from topd_jax.models.decoder import CausalLM
from topd_jax.models.families import read_config
from topd_jax.slots import with_cache
from topd_jax.trainer.config import ComputeConfig, ModelSpec
from topd_jax.trainer.step import locate, sample, score_teacher, splice


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def sample_phase(graphdef, params, prompt_tokens, prompt_mask, key, *, options):
    """`step.sample` of the student (graphdef, params): the `time_sample` phase."""
    return sample(nnx.merge(graphdef, params), prompt_tokens, prompt_mask, key, options)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def cache_phase(graphdef, params, rollout, *, chunk_size):
    """`slots.with_cache` of the student: a continuous rollout's KV cache for branching (`time_sample`)."""
    return with_cache(nnx.merge(graphdef, params), rollout, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size", "return_cache"))
def score_phase(graphdef, params, rollout, *, chunk_size, return_cache):
    """`step.score_teacher` of the teacher (graphdef, params): the `time_score` phase."""
    return score_teacher(nnx.merge(graphdef, params), rollout, chunk_size=chunk_size, return_cache=return_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "loss", "options", "labeller"))
def locate_phase(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, key, *, loss, options,
                 labeller=None):
    """`step.locate` of student and teacher (labeller: the prompt source's): the `time_branch` phase."""
    return locate(nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params), rollout, scores, key,
                  loss, options, labeller)


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "loss", "options", "chunk_size",
                                             "labeller"))
def splice_phase(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, key, *, loss, options,
                 chunk_size, labeller=None):
    """`step.splice` (guidance relay): teacher segments spliced into the rollouts, the student
    continuing after them, the teacher rescoring: the `time_branch` phase of a splicing step."""
    return splice(nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params), rollout, scores, key,
                  loss, options, chunk_size=chunk_size, labeller=labeller)


# Where each no-gradient phase runs: the inference mesh (decoding: tensor and expert parallel
# weights, no per-token weight gathers) or the training mesh (the teacher's scoring prefill is
# compute-bound: there data parallelism with FSDP-gathered weights moves the least; tensor
# parallelism would all-reduce every layer's [tokens, D] activations, 291 GB per chip per step for
# the paper's pair on v5p:4x4x2, docs/plan.md).
PHASE_MESH = {"sample": "inference", "score": "train", "branch": "inference"}


def no_gradient_phases(run, move, graphdef, params, teacher_graphdef, teacher_params, prompt_tokens, prompt_mask,
                       k_sample, k_locate, *, options, loss, chunk_size, labeller=None, rollout=None):
    """sample -> score -> branch of one step, each phase called as `run(name, phase, *args, **static)`.

    The one place the step's no-gradient phases are chained: `Trainer.train_step` runs them (`run`
    times each and waits for its result, under the phase's mesh); `topd_jax.plan` lowers and
    compiles them on abstract inputs (`run` returns each phase's abstract outputs, or raises to
    stop the chain). teacher_params: (score, branch), the teacher laid out for each phase's mesh
    (PHASE_MESH; one object when both meshes are one). move(tree, name): `tree` placed where phase
    `name` runs. The rollout reaches scoring without its cache (scoring reads tokens only). Returns
    (rollout, scores, located) for `step.experience`. rollout: the step's rollouts when they were
    sampled already (rollout.mode continuous, `trainer.rollouts`; without a cache): then the sample
    phase only prefills the student's cache, when the windows branch from it.
    """
    if rollout is None:
        rollout = run("sample", sample_phase, graphdef, params, prompt_tokens, prompt_mask, k_sample, options=options)
    elif loss.uses_windows and not loss.splices:
        rollout = run("sample", cache_phase, graphdef, params, rollout, chunk_size=chunk_size)
    scores = run("score", score_phase, teacher_graphdef, teacher_params[0],
                 move(dataclasses.replace(rollout, cache=None), "score"), chunk_size=chunk_size,
                 return_cache=loss.uses_windows or loss.splices)
    if loss.splices:  # the rollout itself changes: spliced, continued, rescored
        return run("branch", splice_phase, graphdef, params, teacher_graphdef, teacher_params[1],
                   dataclasses.replace(rollout, cache=None), move(scores, "branch"), k_locate, loss=loss,
                   options=options, chunk_size=chunk_size, labeller=labeller)
    located = run("branch", locate_phase, graphdef, params, teacher_graphdef, teacher_params[1], rollout,
                  move(scores, "branch"), k_locate, loss=loss, options=options, labeller=labeller)
    return rollout, scores, located


def model_config(spec: ModelSpec, num_layers: int | None = None,
                 compute: ComputeConfig = ComputeConfig()) -> ModelConfig:
    """The ModelConfig of `spec`: its path's config.json (nothing else is read) or its random config,
    computing as `compute` says; `num_layers` cuts the decoder to its first layers (shape studies
    only)."""
    cfg = read_config(spec.path) if spec.path is not None else spec.random.model_config()
    cfg = dataclasses.replace(cfg, **compute.overrides())
    if num_layers is None:
        return cfg
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
    return dataclasses.replace(cfg, num_layers=num_layers,
                               mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < num_layers))


def abstract_model(cfg: ModelConfig, dtype: str = "float32") -> CausalLM:
    """A CausalLM of `cfg` whose params are ShapeDtypeStructs (no memory, no weights read)."""
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))


__all__ = ["DTYPES", "abstract_model", "cache_phase", "locate_phase", "model_config", "sample_phase", "score_phase", "splice_phase"]
