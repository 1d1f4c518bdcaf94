"""The paper's experiment in miniature, on the synthetic task, on a CPU.

    teacher = sft(TEACHER, style=TEACHER_STYLE, steps=...)    # larger, well trained
    student = sft(STUDENT, style=STUDENT_STYLE, steps=...)    # smaller, less trained, other style
    distil(student, teacher, preset="opd" | "opd_suppress" | "topd", seed=s)  -> accuracy curve
    locator_analysis(student, teacher)   -> OT locator vs window_kl proxy against fork labels

Supervised training uses the trainer's `sft_update` (next-token cross-entropy on the solution
tokens); distillation runs the real `Trainer` on `data.source: synthetic` with the SFT'd models
loaded from Hugging Face checkpoints, so the miniature exercises exactly the code of a real run.
Accuracy is greedy (single-sample, as the paper reports) on held-out problems (seed 10_000).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from topd_jax import fileio
from topd_jax.data import synthetic
from topd_jax.losses.locators import LOCATORS
from topd_jax.losses.topd import TopdConfig, topd_weights
from topd_jax.models.checkpoint import load_pretrained, save_pretrained
from topd_jax.models.decoder import CausalLM
from topd_jax.prompts import left_pad
from topd_jax.sampling import generate
from topd_jax.trainer import placement
from topd_jax.trainer.config import ModelSpec, RandomModelConfig, RolloutConfig, TrainConfig, load_config
from topd_jax.trainer.loop import Trainer, build_model
from topd_jax.trainer.step import (StudentLogprobs, experience, init_state, locate, loss_inputs, sample,
                                   score_teacher)

VOCAB = len(synthetic.VOCAB)
TEACHER = RandomModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, init_seed=1)
STUDENT = RandomModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=12, init_seed=2)
EVAL_SEED = 10_000
MAX_COMPLETION = 28  # longest 3-step solution (23 tokens) + EOS, with room for detours


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """Supervised training of one model on synthetic solutions written in `style`."""

    model: RandomModelConfig
    style: synthetic.Style
    steps: int
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """A short hash of everything that determines the trained weights (the cache key)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


TEACHER_SFT = SftConfig(TEACHER, synthetic.TEACHER_STYLE, steps=1000, learning_rate=4e-3)
STUDENT_SFT = SftConfig(STUDENT, synthetic.STUDENT_STYLE, steps=120, learning_rate=4e-3, seed=1)


def sft_batch(seed: int, index: int, batch_size: int, style: synthetic.Style):
    """`synthetic.sft_examples` batch `index` as arrays: tokens [G, L] = left-padded prompt |
    solution | EOS | right padding, mask, loss_mask (the solution and EOS only)."""
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    loss_mask = np.zeros((batch_size, width), bool)
    for g, (prompt, answer) in enumerate(synthetic.sft_examples(seed, index, batch_size, style)):
        start = synthetic.PROMPT_LENGTH - len(prompt)
        end = synthetic.PROMPT_LENGTH + len(answer)
        tokens[g, start:end] = prompt + answer
        mask[g, start:end] = True
        loss_mask[g, synthetic.PROMPT_LENGTH:end] = True
    return tokens, mask, loss_mask


def sft(config: SftConfig, *, progress: Callable[[int, float], None] | None = None) -> CausalLM:
    """A model of `config.model` trained for `config.steps` AdamW steps (cosine decay)."""
    mesh = placement.data_mesh(jax.devices()[:1])
    model, _ = build_model(ModelSpec(random=config.model), mesh)  # initialised inside jit
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    state = init_state(params, optimizer, jax.random.PRNGKey(config.seed))
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    update = placement.jit_sft_update(state, (config.batch_size, width), mesh, graphdef=graphdef,
                                      optimizer=optimizer, chunk_size=1024)
    for i in range(config.steps):
        state, metrics = update(state, *sft_batch(config.seed, i, config.batch_size, config.style))
        if progress is not None:
            progress(i + 1, float(metrics["loss"]))
    return nnx.merge(graphdef, state.params)


def cached_sft(config: SftConfig, cache_dir: str | os.PathLike, name: str, **kwargs) -> str:
    """The HF checkpoint directory of `sft(config)` under cache_dir/name-<hash>, trained once."""
    path = os.path.join(os.fspath(cache_dir), f"{name}-{config.key()}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        save_pretrained(sft(config, **kwargs), path)
    return path


def eval_problems(count: int) -> list[synthetic.Problem]:
    """The held-out problems (a seed no training batch uses)."""
    return synthetic.problems(EVAL_SEED, 0, count)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy(graphdef, params, prompts, mask):
    model = nnx.merge(graphdef, params)
    return generate(model, prompts, mask, key=jax.random.PRNGKey(0), max_new_tokens=MAX_COMPLETION, temperature=0.0,
                    eos_ids=(synthetic.EOS_ID,)).tokens


def completions(model: CausalLM, problems: Sequence[synthetic.Problem]) -> np.ndarray:
    """Greedy completions [n, MAX_COMPLETION] int32 of each problem's prompt."""
    tok = synthetic.SyntheticTokenizer()
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], synthetic.PROMPT_LENGTH)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(_greedy(graphdef, params, prompts, mask))


def accuracy(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """Greedy single-sample accuracy: the share of problems whose completion ends in the right answer."""
    tok = synthetic.SyntheticTokenizer()
    outs = completions(model, problems)
    return float(np.mean([synthetic.is_correct(p, tok.decode(o)) for p, o in zip(problems, outs)]))


def load(path: str) -> CausalLM:
    return load_pretrained(path, dtype=jnp.float32)


# ---------------------------------------------------------------------------- distillation

DISTIL = ("data.source=synthetic", f"data.prompt_length={synthetic.PROMPT_LENGTH}", "rollout.prompts_per_step=16",
          f"rollout.max_new_tokens={MAX_COMPLETION}", f"rollout.eos_ids=[{synthetic.EOS_ID}]", "loss.window=8",
          "loss.max_candidates=4", "loss.num_reference=2", "optimizer.learning_rate=1.0e-4",
          "checkpoint.resume=false",
          "optimizer.max_grad_norm=1.0", "checkpoint.every=0", "logging.progress=false",
          "logging.tensorboard=false")


def distil_config(student_dir: str, teacher_dir: str, *, preset: str, seed: int, steps: int, output_dir: str,
                  overrides: Sequence[str] = ()) -> TrainConfig:
    """The trainer config of one distillation run of the miniature (overrides go last)."""
    return load_config(None, [f"output_dir={output_dir}", f"steps={steps}", f"preset={preset}", f"seed={seed}",
                              f"student.path={student_dir}", f"teacher.path={teacher_dir}", *DISTIL, *overrides])


def distil(config: TrainConfig, problems: Sequence[synthetic.Problem], *, eval_every: int,
           on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the trainer; evaluate greedy accuracy at step 0 and every `eval_every` steps.

    Returns {"accuracy": [(step, acc), ...], "metrics": [per-step metrics rows],
    "step_time": median seconds per step (after the first, compiling, step)}.
    """
    curve, rows = [], []

    def evaluate(trainer):
        return accuracy(nnx.merge(trainer.graphdef, trainer.state.params), problems)

    def callback(trainer, step, metrics):
        rows.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()})
        if step % eval_every == 0 or step == config.steps:
            curve.append((step, evaluate(trainer)))
        if on_step is not None:
            on_step(step)

    trainer = Trainer(config, callbacks=[callback])
    curve.append((trainer.step, evaluate(trainer)))
    trainer.run()
    trainer.close()
    times = [float(r["time_step"]) for r in rows[1:]] or [float(rows[0]["time_step"])]
    return {"accuracy": curve, "metrics": rows, "step_time": float(np.median(times))}


# ---------------------------------------------------------------------------- locator analysis

@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "loss"))
def _phases(graphdef, params, teacher_graphdef, teacher_params, prompts, mask, key, *, loss):
    """sample -> score -> locate of the student's rollouts at temperature 1, one program."""
    student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
    options = RolloutConfig(max_new_tokens=MAX_COMPLETION, eos_ids=(synthetic.EOS_ID,))
    k_sample, k_locate = jax.random.split(key)
    rollout = sample(student, prompts, mask, k_sample, options)
    scores = score_teacher(teacher, rollout, chunk_size=1024, return_cache=True)
    return rollout, scores, locate(student, teacher, rollout, scores, k_locate, loss, options)


def located_rollouts(student: CausalLM, teacher: CausalLM, loss: TopdConfig, problems, key):
    """(rollout, teacher scores, Located) of the student's rollouts of `problems`."""
    tok = synthetic.SyntheticTokenizer()
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], synthetic.PROMPT_LENGTH)
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    return _phases(graphdef, params, teacher_graphdef, teacher_params, prompts, mask, key, loss=loss)


def candidate_table(student, teacher, loss: TopdConfig, problems, key) -> dict[str, np.ndarray]:
    """Every valid candidate of one batch of student rollouts, as flat arrays: `d` (its token
    loss), `label` (its fork label: 1 fork, 0 surface form, -1 unlabelled) and, for every
    locator of `LOCATORS`, its score (`<locator>`, e.g. `ot`, `window_kl`) and verdict
    (`<locator>_divergent`) under the training rule itself (`topd_weights` with the run's config
    and that locator); plus the batch's valid OT reference scores (`reference_ot`) and each
    locator's threshold (`<locator>_tau`, one value)."""
    rollout, scores, located = located_rollouts(student, teacher, loss, problems, key)
    inputs = loss_inputs(experience(rollout, scores, located), StudentLogprobs(rollout.logprobs))
    tokens, positions, valid = (np.asarray(x) for x in (rollout.tokens, located.positions, located.valid))
    labels = np.stack([synthetic.fork_labels(p, row)[pos] for p, row, pos in zip(problems, tokens, positions)])
    d = np.take_along_axis(np.asarray(rollout.logprobs - scores.logprobs), positions, axis=1)
    out = {"d": d[valid], "label": labels[valid]}
    for name in LOCATORS:
        selection = topd_weights(inputs, dataclasses.replace(loss, locator=name))
        out[name] = np.asarray(selection.scores)[valid]
        out[f"{name}_divergent"] = np.asarray(selection.divergent)[valid]
        out[f"{name}_tau"] = np.asarray(selection.tau)
    if located.reference_ot is not None:
        out["reference_ot"] = np.asarray(located.reference_ot)[np.asarray(located.reference_valid)]
    return out


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall of `predicted` divergent states against true forks (NaN if undefined)."""
    hits = float(np.sum(predicted & truth))
    precision = hits / float(np.sum(predicted)) if np.sum(predicted) else float("nan")
    recall = hits / float(np.sum(truth)) if np.sum(truth) else float("nan")
    return precision, recall


def _share(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def locator_analysis(student: CausalLM, teacher: CausalLM, *, loss: TopdConfig, batches: int = 4,
                     batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """How well each locator finds the real forks among the high-loss candidates.

    Over `batches` batches of student rollouts (temperature 1), every valid candidate (top 20% of
    d_t, at most M per rollout) whose token the fork labels cover is one sample. Reported:
    candidates, fork_share (the share of candidates at true forks), low_divergence_share (the
    share the OT locator puts below tau) and, for every locator of `LOCATORS` (ot, window_kl),
    <locator>_precision / _recall of "divergent" against "fork" and its low-divergence share,
    all under the threshold rule of `loss` (`divergent_states`).
    """
    parts = [candidate_table(student, teacher, loss, synthetic.problems(seed + 20_000, i, batch_size),
                             jax.random.PRNGKey(seed * 1000 + i)) for i in range(batches)]
    labels = np.concatenate([p["label"] for p in parts])
    labelled = labels >= 0
    fork = labels[labelled] == 1
    out = {"candidates": float(fork.size), "fork_share": _share(fork)}
    for name in LOCATORS:
        divergent = np.concatenate([p[f"{name}_divergent"] for p in parts])[labelled]
        out[f"{name}_precision"], out[f"{name}_recall"] = precision_recall(divergent, fork)
        out[f"{name}_low_divergence_share"] = 1.0 - _share(divergent)
    return out


# ---------------------------------------------------------------------------- the reproduction

METHODS = {"opd": ("opd", ()), "opd_suppress": ("opd_suppress", ()), "topd": ("topd", ()),
           "topd_window_kl": ("topd", ("loss.locator=window_kl",))}


def reproduce(out_dir: str, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 600, methods: Sequence[str] = tuple(METHODS),
              eval_count: int = 256, cache_dir: str | None = None, progress=None,
              teacher_sft: SftConfig = TEACHER_SFT, student_sft: SftConfig = STUDENT_SFT,
              locator_batches: int = 8) -> dict[str, Any]:
    """SFT teacher and student (cached), distil with every method and seed on the same budget,
    evaluate, analyse the locators (skipped with locator_batches=0); returns (and writes
    out_dir/results.json) everything."""
    cache_dir = cache_dir or os.path.join(out_dir, "models")
    teacher_dir = cached_sft(teacher_sft, cache_dir, "teacher")
    student_dir = cached_sft(student_sft, cache_dir, "student")
    problems = eval_problems(eval_count)
    teacher, student = load(teacher_dir), load(student_dir)
    results: dict[str, Any] = {"teacher_accuracy": accuracy(teacher, problems),
                               "student_accuracy": accuracy(student, problems), "steps": steps,
                               "seeds": list(seeds), "eval_problems": eval_count, "runs": {}}
    loss = distil_config(student_dir, teacher_dir, preset="topd", seed=0, steps=1, output_dir=out_dir).loss
    if locator_batches:
        results["locators"] = locator_analysis(student, teacher, loss=loss, batches=locator_batches, batch_size=32)
    for method in methods:
        preset, extra = METHODS[method]
        for seed in seeds:
            config = distil_config(student_dir, teacher_dir, preset=preset, seed=seed, steps=steps,
                                   output_dir=os.path.join(out_dir, "runs", f"{method}-{seed}"), overrides=extra)
            run = distil(config, problems, eval_every=max(steps // 6, 1))
            low = [r["low_divergence_share"] for r in run["metrics"] if "low_divergence_share" in r]
            results["runs"][f"{method}/{seed}"] = {
                "method": method, "seed": seed, "accuracy": run["accuracy"], "final_accuracy": run["accuracy"][-1][1],
                "step_time": run["step_time"], "low_divergence_share": float(np.mean(low)) if low else None}
            if progress is not None:
                progress(method, seed)
    fileio.write_file(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    return results


def summary(results: dict[str, Any]) -> str:
    """The Markdown tables of `reproduce`'s results."""
    runs = list(results["runs"].values())
    methods = list(dict.fromkeys(r["method"] for r in runs))
    opd_time = np.median([r["step_time"] for r in runs if r["method"] == "opd"]) if "opd" in methods else None
    lines = [f"teacher accuracy {results['teacher_accuracy']:.1%}, student before distillation "
             f"{results['student_accuracy']:.1%} (greedy, {results['eval_problems']} held-out problems); "
             f"{results['steps']} distillation steps, seeds {results['seeds']}", "",
             "| method | accuracy (mean +- std) | low-divergence share of candidates | step time | vs OPD |",
             "| --- | --- | --- | --- | --- |"]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        acc = np.array([r["final_accuracy"] for r in rs])
        low = [r["low_divergence_share"] for r in rs if r["low_divergence_share"] is not None]
        t = float(np.median([r["step_time"] for r in rs]))
        lines.append(f"| {m} | {acc.mean():.1%} +- {acc.std():.1%} | {np.mean(low):.1%} | {1e3 * t:.0f} ms | "
                     f"{t / opd_time:.2f}x |" if low else
                     f"| {m} | {acc.mean():.1%} +- {acc.std():.1%} | - | {1e3 * t:.0f} ms | "
                     f"{(t / opd_time) if opd_time else float('nan'):.2f}x |")
    loc = results.get("locators")
    if not loc:
        return "\n".join(lines)
    lines += ["", f"Locators on {int(loc['candidates'])} high-loss candidates of the SFT'd student "
              f"({loc['fork_share']:.1%} at true forks):", "",
              "| locator | precision | recall | low-divergence share |", "| --- | --- | --- | --- |"]
    for name, label in (("ot", "OT (branch + Sinkhorn)"), ("window_kl", "window_kl proxy")):
        lines.append(f"| {label} | {loc[f'{name}_precision']:.1%} | {loc[f'{name}_recall']:.1%} | "
                     f"{loc[f'{name}_low_divergence_share']:.1%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m topd_jax.miniature", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="results/miniature",
                        help="output directory (results.md, the runs)")
    parser.add_argument("--seeds", type=int, default=3, help="distillation seeds per method (seeds 0..n-1)")
    parser.add_argument("--steps", type=int, default=600, help="distillation steps per run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of presets to compare")
    parser.add_argument("--cache", default=None, help="where the SFT'd models are kept; None: OUT/models")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    os.makedirs(args.out, exist_ok=True)
    results = reproduce(args.out, seeds=range(args.seeds), steps=args.steps, methods=methods, cache_dir=args.cache,
                        progress=lambda m, s: print(f"done: {m} seed {s}", flush=True))
    table = summary(results)
    fileio.write_file(os.path.join(args.out, "results.md"), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DISTIL", "METHODS", "located_rollouts", "reproduce", "summary", "STUDENT", "SftConfig", "TEACHER", "accuracy", "cached_sft", "completions", "distil",
           "candidate_table", "distil_config", "eval_problems", "load", "locator_analysis", "precision_recall", "sft", "sft_batch"]
