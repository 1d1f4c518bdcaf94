"""The miniature's locator analysis: every locator of `LOCATORS` scored against the synthetic
task's fork labels on the SFT'd student's own rollouts (precision, recall, ROC AUC), all locators
locating the same candidates of the same rollouts. `protocol.reproduce` runs it first;
`rendering.locator_table` prints it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from topd_jax.data import synthetic
from topd_jax.experiments import models
from topd_jax.experiments.statistics import precision_recall, roc_auc, share
from topd_jax.losses.locators import LOCATORS
from topd_jax.losses.topd import TopdConfig, topd_weights
from topd_jax.models.decoder import CausalLM
from topd_jax.prompts import left_pad
from topd_jax.trainer.config import RolloutConfig
from topd_jax.trainer.step import StudentLogprobs, experience, locate, loss_inputs, sample, score_teacher


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef"))
def _rollouts(graphdef, params, teacher_graphdef, teacher_params, prompts, mask, key):
    """sample -> score of the student's rollouts at temperature 1, one program."""
    student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
    rollout = sample(student, prompts, mask, key, _OPTIONS)
    return rollout, score_teacher(teacher, rollout, chunk_size=1024, return_cache=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "loss"))
def jit_locate(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, key, *, loss):
    student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
    return locate(student, teacher, rollout, scores, key, loss, _OPTIONS, labeller=synthetic.candidate_labels)


_OPTIONS = RolloutConfig(max_new_tokens=models.MAX_COMPLETION, eos_ids=(synthetic.EOS_ID,))


def located_rollouts(student: CausalLM, teacher: CausalLM, loss: TopdConfig, problems, key,
                     locators: Sequence[str] | None = None):
    """(rollout, teacher scores, {locator: Located}) of the student's rollouts of `problems`
    (temperature 1), located by each of `locators` (default: loss.locator) from the same rollout
    and the same candidate/reference key, so every locator scores the same candidates."""
    tok = synthetic.SyntheticTokenizer()
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], synthetic.PROMPT_LENGTH)
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    k_sample, k_locate = jax.random.split(key)
    rollout, scores = _rollouts(graphdef, params, teacher_graphdef, teacher_params, prompts, mask, k_sample)
    located = {name: jit_locate(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, k_locate,
                             loss=dataclasses.replace(loss, locator=name))
               for name in (locators or (loss.locator,))}
    return rollout, scores, located


def candidate_table(student, teacher, loss: TopdConfig, problems, key) -> dict[str, np.ndarray]:
    """Every valid candidate of one batch of student rollouts, as flat arrays: `d` (its token
    loss), `label` (its fork label: 1 fork, 0 surface form, -1 undecidable) and, for every
    locator of `LOCATORS`, its score (`<locator>`, e.g. `ot`, `window_kl`) and verdict
    (`<locator>_divergent`) under the training rule itself (`topd_weights` with the run's config
    and that locator, each locator locating the same candidates); plus the batch's valid OT
    reference scores (`reference_ot`) and each locator's threshold (`<locator>_tau`, one value)."""
    rollout, scores, located = located_rollouts(student, teacher, loss, problems, key, locators=tuple(LOCATORS))
    any_located = located[loss.locator]
    tokens, positions, valid = (np.asarray(x) for x in (rollout.tokens, any_located.positions, any_located.valid))
    labels = np.stack([synthetic.fork_labels(p, row)[pos] for p, row, pos in zip(problems, tokens, positions)])
    d = np.take_along_axis(np.asarray(rollout.logprobs - scores.logprobs), positions, axis=1)
    out = {"d": d[valid], "label": labels[valid]}
    for name, at in located.items():
        inputs = loss_inputs(experience(rollout, scores, at), StudentLogprobs(rollout.logprobs))
        selection = topd_weights(inputs, dataclasses.replace(loss, locator=name))
        out[name] = np.asarray(selection.scores)[valid]
        out[f"{name}_divergent"] = np.asarray(selection.divergent)[valid]
        out[f"{name}_tau"] = np.asarray(selection.tau)
    if any_located.reference_ot is not None:
        out["reference_ot"] = np.asarray(any_located.reference_ot)[np.asarray(any_located.reference_valid)]
    return out



def locator_analysis(student: CausalLM, teacher: CausalLM, *, loss: TopdConfig, batches: int = 4,
                     batch_size: int = 32, seed: int = 0, tables: list | None = None) -> dict[str, float]:
    """How well each locator finds the real forks among the high-loss candidates.

    Over `batches` batches of student rollouts (temperature 1), every valid candidate (top 20% of
    d_t, at most M per rollout) is one sample. Reported: candidates, the shares of candidates
    that are surface forms (cosmetic_share), forks (fork_share) and undecidable (unlabelled_share);
    and, for every locator of `LOCATORS`, over the labelled candidates, <locator>_precision /
    _recall of "divergent" against "fork", <locator>_auc (ROC AUC of its score) and its
    low-divergence share, all under the threshold rule of `loss` (`divergent_states`). `tables`
    (a list) receives the per-batch `candidate_table`s (for plots).
    """
    parts = [candidate_table(student, teacher, loss, synthetic.problems(seed + 20_000, i, batch_size),
                             jax.random.PRNGKey(seed * 1000 + i)) for i in range(batches)]
    if tables is not None:
        tables.extend(parts)
    labels = np.concatenate([p["label"] for p in parts])
    labelled = labels >= 0
    fork = labels[labelled] == 1
    out = {"candidates": float(labels.size), "cosmetic_share": share(labels == 0), "fork_share": share(labels == 1),
           "unlabelled_share": share(labels < 0)}
    for name in LOCATORS:
        divergent = np.concatenate([p[f"{name}_divergent"] for p in parts])
        out[f"{name}_precision"], out[f"{name}_recall"] = precision_recall(divergent[labelled], fork)
        out[f"{name}_auc"] = roc_auc(np.concatenate([p[name] for p in parts])[labelled], fork)
        out[f"{name}_low_divergence_share"] = 1.0 - share(divergent)
    return out


__all__ = ["candidate_table", "jit_locate", "located_rollouts", "locator_analysis"]
