"""Why guidance helps or hurts: the guidance term's gradient set against OPD's, on one batch.

For the SFT'd pair and one batch of the student's own rollouts (temperature 1), each guidance
form g of `protocol.READINGS` is taken apart at the student's starting parameters theta:

    g_opd   = grad L_OPD(w)                  the (suppressed) OPD term alone (lambda = 0)
    g_guide = grad L - g_opd                  what the guidance adds (the window term, or the
                                             return form's extra credit)
    g_ref   = grad (1/N) sum_t m_t KL(pi_s(.|x, y_<t) || pi_T(.|x, y_<t))
                                             the analytic reverse KL over the full vocabulary at
                                             the same states: the direction OPD's sampled
                                             estimate is noisy around

and reported: |g_guide| / |g_opd|; cos(g_guide, g_ref) and cos(g_opd, g_ref) (does the term point
where distillation should go?); cos(g_guide, g_guide') for a second draw of the teacher's windows
from the same states and the same divergent set (how much of the term is sampling noise); and what
the guided windows teach (`window_faults`): the share of surface forms among their tokens, and how
often the teacher's window itself makes an error, from a clean prefix and from a broken one. The
oracle locator fixes R to the true forks, so the guidance's own properties are measured apart from
the locator's errors; the paper's locator (ot) is measured too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from topd_jax.data import synthetic
from topd_jax.experiments.locator_analysis import jit_locate
from topd_jax.experiments import models, protocol
from topd_jax.losses.opd import reverse_kl
from topd_jax.trainer.step import experience, student_loss

FORMS = ("window", "greedy", "topk_fkl", "token", "rollout_token", "lambda0.1", "return")
LOCATORS_MEASURED = ("oracle", "ot")


def _cos(a, b) -> float:
    return float(optax.tree.vdot(a, b) / (optax.tree.norm(a) * optax.tree.norm(b) + 1e-30))


@functools.partial(jax.jit, static_argnames=("graphdef", "loss"))
def _grad(params, graphdef, batch, *, loss):
    return jax.grad(lambda p: student_loss(p, graphdef, batch, loss, chunk_size=4096)[0])(params)


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef"))
def _reference_grad(params, graphdef, teacher_graphdef, teacher_params, rollout):
    """grad of the mean full-vocabulary reverse KL at the rollout's completion states."""
    tokens = jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1)
    mask = jnp.concatenate([rollout.prompt_mask, rollout.mask], axis=1)
    p = rollout.prompt_tokens.shape[1]
    teacher_logits = nnx.merge(teacher_graphdef, teacher_params)(tokens, attention_mask=mask)[:, p - 1:-1]

    def objective(params_):
        logits = nnx.merge(graphdef, params_)(tokens, attention_mask=mask)[:, p - 1:-1]
        kl = reverse_kl(logits, teacher_logits, rollout.mask)
        return jnp.sum(kl) / jnp.maximum(jnp.sum(rollout.mask), 1)

    return jax.grad(objective)(params)


def window_faults(problems, rollout, located, divergent) -> dict[str, float]:
    """What the guided windows teach, from the task's own checker (`synthetic.walk`): for every
    divergent state (b, t) with the teacher's window v, the prefix y_<t is `broken` when it holds a
    local error (a wrong value, operand, operator), and the window is `faulty` when v itself makes
    one given the prefix. Returns the guided tokens' surface-form share, the share of windows from
    broken prefixes, and the faulty share of windows from clean and from broken prefixes."""
    tokens, positions = np.asarray(rollout.tokens), np.asarray(located.positions)
    windows = located.teacher_windows
    wt, wm = np.asarray(windows.tokens), np.asarray(windows.mask)
    labels, broken, faulty = [], [], []
    for b, m in zip(*np.nonzero(divergent)):
        t = int(positions[b, m])
        prefix = [synthetic.VOCAB[int(i)] for i in tokens[b, :t]]
        window = [synthetic.VOCAB[int(i)] for i in wt[b, m][wm[b, m]]]
        row_labels, _, errors = synthetic.walk(problems[b], prefix + window)
        labels.extend(row_labels[t:])
        broken.append(bool(errors[:t].any()))
        faulty.append(bool(errors[t:].any()))
    labels, broken, faulty = (np.asarray(x) for x in (labels, broken, faulty))

    def share(x):
        return float(np.mean(x)) if x.size else float("nan")

    return {"guided_tokens": int(labels.size), "guided_surface_share": share(labels == 0),
            "windows_from_broken_prefix": share(broken), "faulty_given_clean": share(faulty[~broken]),
            "faulty_given_broken": share(faulty[broken])}


def measure(cache_dir: str, *, batch: int = protocol.BATCH, seed: int = 0) -> dict[str, Any]:
    """Every (locator, form) of LOCATORS_MEASURED x FORMS on one batch of `batch` development
    prompts (module docstring). Deterministic given the cached models and `seed`."""
    teacher = models.load(models.cached_sft(models.TEACHER_SFT, cache_dir, "teacher"))
    student = models.load(models.cached_sft(models.STUDENT_SFT, cache_dir, "student"))
    problems = synthetic.problems(models.DEV_SEED + 50_000, seed, batch)
    base = protocol.distil_config(os.devnull, os.devnull, method="topd", seed=0, output_dir=os.devnull).loss
    rollout, scores, _ = protocol.located_rollouts(student, teacher, base, problems, jax.random.PRNGKey(seed),
                                                   locators=("window_kl",))
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    g_ref = _reference_grad(params, graphdef, teacher_graphdef, teacher_params, rollout)
    out: dict[str, Any] = {"batch": batch, "rollout_tokens": int(np.sum(rollout.mask)), "forms": {}}
    for locator in LOCATORS_MEASURED:
        for form in FORMS:
            loss = protocol.distil_config(os.devnull, os.devnull, method=protocol.method_name(locator, form), seed=0,
                                          output_dir=os.devnull).loss
            draws = []
            for key in (1, 2):  # same rollout, candidates and (oracle) R; another teacher window draw
                located = jit_locate(graphdef, params, teacher_graphdef, teacher_params, rollout, scores,
                                           jax.random.PRNGKey(key), loss=loss)
                batch_ = experience(rollout, scores, located)
                g_full = _grad(params, graphdef, batch_, loss=loss)
                g_opd = _grad(params, graphdef, batch_, loss=dataclasses.replace(loss, traj_weight=0.0))
                draws.append((located, g_opd, jax.tree.map(jnp.subtract, g_full, g_opd)))
            located, g_opd, g_guide = draws[0]
            divergent = np.asarray(located.valid) & _divergent(located, loss, rollout, scores)
            row = {"guide_over_opd": float(optax.tree.norm(g_guide) / optax.tree.norm(g_opd)),
                   "cos_guide_ref": _cos(g_guide, g_ref), "cos_opd_ref": _cos(g_opd, g_ref),
                   "cos_total_ref": _cos(jax.tree.map(jnp.add, g_opd, g_guide), g_ref),
                   "cos_guide_redraw": _cos(g_guide, draws[1][2]), "divergent": int(divergent.sum())}
            if located.teacher_windows is not None and loss.guides_windows and divergent.any():
                row.update(window_faults(problems, rollout, located, divergent))
            out["forms"][f"{locator}/{form}"] = row
    return out


def _divergent(located, loss, rollout, scores) -> np.ndarray:
    """R of `located` under `loss`'s rule (the training rule itself)."""
    from topd_jax.losses.topd import topd_weights
    from topd_jax.trainer.step import StudentLogprobs, loss_inputs

    inputs = loss_inputs(experience(rollout, scores, located), StudentLogprobs(rollout.logprobs))
    return np.asarray(topd_weights(inputs, loss).divergent)


def table(result: dict[str, Any]) -> str:
    """`measure`'s result as Markdown."""
    lines = [f"One batch of {result['batch']} rollouts of the SFT'd student ({result['rollout_tokens']} completion "
             "tokens), gradients at its starting parameters:", "",
             "| locator / guidance | norm(g_guide) / norm(g_opd) | cos(g_guide, g_ref) | cos(g_opd, g_ref) | "
             "cos(g_opd + g_guide, g_ref) | cos(g_guide, redraw) | divergent states | guided tokens: surface "
             "forms | windows from a broken prefix | faulty windows: clean prefix | broken prefix |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def share(r, key):
        return "-" if r.get(key) is None or not np.isfinite(r[key]) else f"{r[key]:.1%}"

    for name, r in result["forms"].items():
        lines.append(f"| {name} | {r['guide_over_opd']:.2f} | {r['cos_guide_ref']:+.3f} | {r['cos_opd_ref']:+.3f} | "
                     f"{r['cos_total_ref']:+.3f} | {r['cos_guide_redraw']:+.3f} | {r['divergent']} | "
                     f"{share(r, 'guided_surface_share')} | {share(r, 'windows_from_broken_prefix')} | "
                     f"{share(r, 'faulty_given_clean')} | {share(r, 'faulty_given_broken')} |")
    return "\n".join(lines)


ERROR_KINDS = ("operand", "operator", "value", "answer", "format")


def first_errors(model, problems) -> dict[str, float]:
    """What a student gets wrong: over greedy completions of `problems`, the share that are flawless
    (the right answer and no local error on the way; an answer can be right by two cancelling errors),
    and the share whose first local error (`synthetic.walk`) is each of ERROR_KINDS -- a copied
    operand that is neither the running value nor the problem's, an operator other than the
    problem's, a value other than a op b as written (arithmetic), an answer other than the last
    value, or a token off the format."""
    counts = dict.fromkeys(("flawless", *ERROR_KINDS), 0)
    for problem, ids in zip(problems, models.completions(model, problems)):
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(synthetic.EOS_ID)] if synthetic.EOS_ID in ids else ids
        words = [synthetic.VOCAB[i] for i in ids]
        _, answer, errors = synthetic.walk(problem, words)
        if answer == problem.answer and not errors.any():
            counts["flawless"] += 1
            continue
        at = int(np.argmax(errors)) if errors.any() else len(words)
        counts[_error_kind(words, at, answer is None)] += 1
    return {k: v / len(problems) for k, v in counts.items()}


def _error_kind(words: list[str], at: int, off_format: bool) -> str:
    if at >= len(words):
        return "format" if off_format else "answer"
    word, before = words[at], words[at - 1] if at else ""
    if word in synthetic.OPS:
        return "operator"
    if not word.isdigit():
        return "format"
    if before in (*synthetic.EQUALS, "wait"):
        return "value"
    if before in ("answer", "is", "result"):
        return "answer"
    return "operand"


def error_table(rows: dict[str, dict[str, float]]) -> str:
    """`first_errors` of several students as Markdown."""
    lines = ["| student | flawless | " + " | ".join(f"first error: {k}" for k in ERROR_KINDS) + " |",
             "| --- | --- |" + " --- |" * len(ERROR_KINDS)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flawless']:.1%} | " + " | ".join(f"{r[k]:.1%}" for k in ERROR_KINDS) + " |")
    return "\n".join(lines)


__all__ = ["ERROR_KINDS", "FORMS", "error_table", "first_errors", "measure", "table", "window_faults"]
