"""The paper's experiment in miniature, on the synthetic task (version 2), on a CPU.

    teacher = sft(TEACHER, style=TEACHER_STYLE, steps=...)    # larger, trained with corrected slips
    student = sft(STUDENT, style=STUDENT_STYLE, steps=...)    # smaller, less trained, other style
    locator_analysis(student, teacher)    -> every locator of LOCATORS against the fork labels
    sweep: every method x learning rate on the development seed (dev problems)
    test:  every method at its best rate x test seeds (held-out problems), paired vs OPD

Supervised training uses the trainer's `sft_update` (next-token cross-entropy on the solution
tokens); distillation runs the real `Trainer` on `data.source: synthetic` with the SFT'd models
loaded from Hugging Face checkpoints, so the miniature exercises exactly the code of a real run.
Accuracy is greedy (single-sample, as the paper reports); a run's score is the mean of its last
two evaluations. The learning rate of each method is chosen on DEV_SEED and DEV_EVAL_SEED
problems only, before any test seed runs; the test problems (EVAL_SEED) are never seen by it.
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
EVAL_SEED = 10_000  # held-out test problems
DEV_EVAL_SEED = 10_001  # the learning-rate sweep's problems
DEV_SEED = 100  # the learning-rate sweep's distillation seed (never a test seed)
MAX_COMPLETION = 38  # longest 4-step solution with its one correction (35 tokens) + EOS, with room for detours


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


TEACHER_SFT = SftConfig(TEACHER, synthetic.TEACHER_STYLE, steps=800, learning_rate=4e-3)
STUDENT_SFT = SftConfig(STUDENT, synthetic.STUDENT_STYLE, steps=250, learning_rate=4e-3, seed=1)


def sft_batch(seed: int, index: int, batch_size: int, style: synthetic.Style):
    """`synthetic.sft_examples` batch `index` as arrays: tokens [G, L] = left-padded prompt |
    solution | EOS | right padding, mask, loss_mask (the solution and EOS only)."""
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    loss_mask = np.zeros((batch_size, width), bool)
    for g, (prompt, answer, weights) in enumerate(synthetic.sft_examples(seed, index, batch_size, style)):
        start = synthetic.PROMPT_LENGTH - len(prompt)
        end = synthetic.PROMPT_LENGTH + len(answer)
        tokens[g, start:end] = prompt + answer
        mask[g, start:end] = True
        loss_mask[g, synthetic.PROMPT_LENGTH:end] = np.asarray(weights) > 0
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


def eval_problems(count: int, seed: int = EVAL_SEED) -> list[synthetic.Problem]:
    """Held-out problems (a seed no training batch uses): EVAL_SEED the test set, DEV_EVAL_SEED
    the learning-rate sweep's."""
    return synthetic.problems(seed, 0, count)


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


def correctness(model: CausalLM, problems: Sequence[synthetic.Problem]) -> np.ndarray:
    """Per problem, whether the greedy completion ends in the right answer (bool [n]; a sampled
    <pad> inside a completion is wrong, `synthetic.is_correct_ids`)."""
    return np.array([synthetic.is_correct_ids(p, o) for p, o in zip(problems, completions(model, problems))])


def accuracy(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """Greedy single-sample accuracy: the share of problems whose completion ends in the right answer."""
    return float(np.mean(correctness(model, problems)))


def malformed(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """The share of greedy completions that leave the format (no answer can be read)."""
    outs = completions(model, problems)
    return float(np.mean([synthetic.parse(p, [synthetic.VOCAB[i] for i in _until_eos(o)])[1] is None
                          for p, o in zip(problems, outs)]))


def _until_eos(ids) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(synthetic.EOS_ID)] if synthetic.EOS_ID in ids else ids


def load(path: str) -> CausalLM:
    return load_pretrained(path, dtype=jnp.float32)


# ---------------------------------------------------------------------------- distillation

DISTIL = ("data.source=synthetic", f"data.prompt_length={synthetic.PROMPT_LENGTH}", "rollout.prompts_per_step=16",
          f"rollout.max_new_tokens={MAX_COMPLETION}", f"rollout.eos_ids=[{synthetic.EOS_ID}]", "loss.window=8",
          "loss.max_candidates=4", "loss.num_reference=4", "checkpoint.resume=false",
          "optimizer.max_grad_norm=1.0", "checkpoint.every=0", "logging.progress=false",
          "logging.tensorboard=false")
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
DEFAULT_LEARNING_RATE = 1e-3
# method -> (preset, overrides): the baselines, TOPD with every locator, guidance alone, the oracle.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "opd": ("opd", ()),
    "topd": ("topd", ()),
    "oracle": ("topd", ("loss.locator=oracle",)),
    "opd_suppress": ("opd_suppress", ()),
    "guidance": ("topd", ("loss.suppress_weight=1.0",)),
    "topd_coupled": ("topd", ("loss.locator=ot_coupled",)),
    "topd_rollout": ("topd", ("loss.locator=ot_rollout",)),
    "topd_window_kl": ("topd", ("loss.locator=window_kl",)),
    "topd_teacher_embedding": ("topd", ("loss.locator=ot_teacher_embedding",)),
}


def distil_config(student_dir: str, teacher_dir: str, *, preset: str, seed: int, steps: int, output_dir: str,
                  learning_rate: float = DEFAULT_LEARNING_RATE, overrides: Sequence[str] = ()) -> TrainConfig:
    """The trainer config of one distillation run of the miniature (overrides go last)."""
    return load_config(None, [f"output_dir={output_dir}", f"steps={steps}", f"preset={preset}", f"seed={seed}",
                              f"student.path={student_dir}", f"teacher.path={teacher_dir}", *DISTIL,
                              f"optimizer.learning_rate={learning_rate}", *overrides])


def distil(config: TrainConfig, problems: Sequence[synthetic.Problem], *, eval_every: int,
           on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the trainer; evaluate greedy accuracy at step 0 and every `eval_every` steps.

    Returns {"accuracy": [(step, acc), ...], "metrics": [per-step metrics rows],
    "step_time": median seconds per step (after the first, compiling, step),
    "score": the mean accuracy of the last two evaluations, "correct": per problem, the mean
    correctness over those two evaluations (float [n], for paired comparisons)}.
    """
    curve, rows, correct = [], [], []

    def evaluate(trainer, step):
        c = correctness(nnx.merge(trainer.graphdef, trainer.state.params), problems)
        curve.append((step, float(np.mean(c))))
        correct.append(c)

    def callback(trainer, step, metrics):
        rows.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()})
        if step % eval_every == 0 or step == config.steps:
            evaluate(trainer, step)
        if on_step is not None:
            on_step(step)

    trainer = Trainer(config, callbacks=[callback])
    evaluate(trainer, trainer.step)
    trainer.run()
    trainer.close()
    times = [float(r["time_step"]) for r in rows[1:]] or [float(rows[0]["time_step"])]
    last = correct[-2:]
    return {"accuracy": curve, "metrics": rows, "step_time": float(np.median(times)),
            "score": float(np.mean([np.mean(c) for c in last])), "correct": np.mean(last, axis=0)}


# ---------------------------------------------------------------------------- locator analysis

@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef"))
def _rollouts(graphdef, params, teacher_graphdef, teacher_params, prompts, mask, key):
    """sample -> score of the student's rollouts at temperature 1, one program."""
    student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
    rollout = sample(student, prompts, mask, key, _OPTIONS)
    return rollout, score_teacher(teacher, rollout, chunk_size=1024, return_cache=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "loss"))
def _locate(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, key, *, loss):
    student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graphdef, teacher_params)
    return locate(student, teacher, rollout, scores, key, loss, _OPTIONS)


_OPTIONS = RolloutConfig(max_new_tokens=MAX_COMPLETION, eos_ids=(synthetic.EOS_ID,))


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
    located = {name: _locate(graphdef, params, teacher_graphdef, teacher_params, rollout, scores, k_locate,
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


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall of `predicted` divergent states against true forks (NaN if undefined)."""
    hits = float(np.sum(predicted & truth))
    precision = hits / float(np.sum(predicted)) if np.sum(predicted) else float("nan")
    recall = hits / float(np.sum(truth)) if np.sum(truth) else float("nan")
    return precision, recall


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """P(score of a random fork > score of a random surface form), ties counting 1/2 (the
    Mann-Whitney form of the ROC AUC); NaN without both classes."""
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _share(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


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
    out = {"candidates": float(labels.size), "cosmetic_share": _share(labels == 0), "fork_share": _share(labels == 1),
           "unlabelled_share": _share(labels < 0)}
    for name in LOCATORS:
        divergent = np.concatenate([p[f"{name}_divergent"] for p in parts])
        out[f"{name}_precision"], out[f"{name}_recall"] = precision_recall(divergent[labelled], fork)
        out[f"{name}_auc"] = roc_auc(np.concatenate([p[name] for p in parts])[labelled], fork)
        out[f"{name}_low_divergence_share"] = 1.0 - _share(divergent)
    return out


# ---------------------------------------------------------------------------- the reproduction

def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its 95% Student-t interval (NaN
    bounds with fewer than two pairs)."""
    x = np.asarray(differences, np.float64)
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def _run(student_dir, teacher_dir, method, seed, learning_rate, steps, problems, out_dir, evals) -> dict[str, Any]:
    preset, extra = METHODS[method]
    config = distil_config(student_dir, teacher_dir, preset=preset, seed=seed, steps=steps, learning_rate=learning_rate,
                           output_dir=out_dir, overrides=extra)
    run = distil(config, problems, eval_every=max(steps // evals, 1))
    low = [r["low_divergence_share"] for r in run["metrics"] if "low_divergence_share" in r]
    skipped = sum(float(r.get("skipped", 0.0)) for r in run["metrics"])
    return {"method": method, "seed": seed, "learning_rate": learning_rate, "accuracy": run["accuracy"],
            "score": run["score"], "step_time": run["step_time"], "skipped_steps": skipped,
            "low_divergence_share": float(np.mean(low)) if low else None}


def reproduce(out_dir: str, *, seeds: Sequence[int] = (0, 1, 2), dev_seed: int = DEV_SEED,
              learning_rates: Sequence[float] = LEARNING_RATES, steps: int = 100,
              methods: Sequence[str] = tuple(METHODS), eval_count: int = 1024, dev_eval_count: int = 256,
              evals: int = 2, cache_dir: str | None = None, progress: Callable[[str], None] | None = None,
              teacher_sft: SftConfig = TEACHER_SFT, student_sft: SftConfig = STUDENT_SFT,
              locator_batches: int = 8) -> dict[str, Any]:
    """The protocol, in order; returns (and writes out_dir/results.json after every run, with
    "complete": false until the end) everything.

    1. SFT teacher and student (cached); their greedy accuracy and malformed share on the test
       problems.
    2. `locator_analysis` of the SFT'd pair (skipped with locator_batches=0).
    3. Sweep: every method at every learning rate, seed `dev_seed`, scored on `dev_eval_count`
       DEV_EVAL_SEED problems; each method's best rate is chosen here (ties: the first). One
       rate: no sweep.
    4. Test: every method at its chosen rate for every seed, scored on `eval_count` EVAL_SEED
       problems; a run's score is the mean of its last two of `evals` evaluations.
    """
    if dev_seed in seeds:
        raise ValueError(f"the development seed {dev_seed} must not be a test seed {list(seeds)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    say = progress or (lambda text: None)
    cache_dir = cache_dir or os.path.join(out_dir, "models")
    teacher_dir = cached_sft(teacher_sft, cache_dir, "teacher")
    student_dir = cached_sft(student_sft, cache_dir, "student")
    problems, dev_problems = eval_problems(eval_count), eval_problems(dev_eval_count, DEV_EVAL_SEED)
    teacher, student = load(teacher_dir), load(student_dir)
    results: dict[str, Any] = {
        "task_version": synthetic.VERSION, "complete": False, "teacher_accuracy": accuracy(teacher, problems),
        "student_accuracy": accuracy(student, problems), "teacher_malformed": malformed(teacher, problems),
        "student_malformed": malformed(student, problems), "steps": steps, "seeds": list(seeds), "dev_seed": dev_seed,
        "learning_rates": list(learning_rates), "eval_problems": eval_count, "dev_problems": dev_eval_count,
        "methods": list(methods), "teacher_sft": teacher_sft.steps, "student_sft": student_sft.steps,
        "sweep": {}, "chosen_learning_rate": {}, "runs": {}}

    def save():
        fileio.write_file(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))

    loss = distil_config(student_dir, teacher_dir, preset="topd", seed=0, steps=1, output_dir=out_dir).loss
    if locator_batches:
        results["locators"] = locator_analysis(student, teacher, loss=loss, batches=locator_batches, batch_size=32)
        say("locator analysis done")
        save()
    for method in methods:
        if len(learning_rates) == 1:
            results["chosen_learning_rate"][method] = float(learning_rates[0])
            continue
        sweep = results["sweep"].setdefault(method, {})
        for lr in learning_rates:
            run = _run(student_dir, teacher_dir, method, dev_seed, lr, steps, dev_problems,
                       os.path.join(out_dir, "sweep", f"{method}-{lr:g}"), evals)
            sweep[f"{lr:g}"] = {"score": run["score"], "skipped_steps": run["skipped_steps"]}
            say(f"sweep {method} lr {lr:g}: {run['score']:.3f}")
            save()
        best = max(learning_rates, key=lambda lr: (sweep[f"{lr:g}"]["score"], -learning_rates.index(lr)))
        results["chosen_learning_rate"][method] = float(best)
    for method in methods:
        for seed in seeds:
            run = _run(student_dir, teacher_dir, method, seed, results["chosen_learning_rate"][method], steps,
                       problems, os.path.join(out_dir, "runs", f"{method}-{seed}"), evals)
            results["runs"][f"{method}/{seed}"] = run
            say(f"test {method} seed {seed}: {run['score']:.3f}")
            save()
    results["complete"] = True
    save()
    return results


def comparisons(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: scores per seed, mean, std, and the paired difference to OPD per seed with
    its 95% interval (`paired_interval`)."""
    runs = list(results["runs"].values())
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        by_seed = {r["seed"]: r for r in runs if r["method"] == method}
        scores = np.array([r["score"] for r in by_seed.values()])
        row: dict[str, Any] = {"scores": {s: r["score"] for s, r in by_seed.items()}, "mean": float(scores.mean()),
                               "std": float(scores.std(ddof=1)) if scores.size > 1 else float("nan"),
                               "step_time": float(np.median([r["step_time"] for r in by_seed.values()])),
                               "learning_rate": next(iter(by_seed.values()))["learning_rate"]}
        lows = [r["low_divergence_share"] for r in by_seed.values() if r["low_divergence_share"] is not None]
        row["low_divergence_share"] = float(np.mean(lows)) if lows else None
        opd = {r["seed"]: r["score"] for r in runs if r["method"] == "opd"}
        paired = [by_seed[s]["score"] - opd[s] for s in by_seed if s in opd]
        row["vs_opd"] = paired_interval(paired) if opd and method != "opd" else None
        out[method] = row
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def locator_table(loc: dict[str, float]) -> str:
    """`locator_analysis`'s result as Markdown: the candidates' label shares, then per locator
    precision, recall, ROC AUC and low-divergence share."""
    lines = [f"{int(loc['candidates'])} high-loss candidates of the SFT'd student: "
             f"{loc['cosmetic_share']:.1%} surface forms (cosmetic), {loc['fork_share']:.1%} forks, "
             f"{loc['unlabelled_share']:.1%} undecidable.", "",
             "| locator | precision | recall | ROC AUC | low-divergence share |", "| --- | --- | --- | --- | --- |"]
    for name in LOCATORS:
        if f"{name}_auc" in loc:
            lines.append(f"| {name} | {_pct(loc[f'{name}_precision'])}% | {_pct(loc[f'{name}_recall'])}% | "
                         f"{loc[f'{name}_auc']:.3f} | {_pct(loc[f'{name}_low_divergence_share'])}% |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """The Markdown tables of `reproduce`'s results."""
    lines = [f"task version {results['task_version']}; teacher {results['teacher_accuracy']:.1%} "
             f"({results['teacher_malformed']:.1%} malformed), student before distillation "
             f"{results['student_accuracy']:.1%} ({results['student_malformed']:.1%} malformed), greedy on "
             f"{results['eval_problems']} held-out problems; {results['steps']} distillation steps; test seeds "
             f"{results['seeds']}, development seed {results['dev_seed']} ({results['dev_problems']} dev problems)"]
    if not results.get("complete", True):
        lines += ["", "PARTIAL: the protocol did not finish; the tables hold only the runs that did."]
    if results.get("locators"):
        lines += ["", locator_table(results["locators"])]
    if results.get("sweep"):
        rates = [f"{lr:g}" for lr in results["learning_rates"]]
        lines += ["", f"Learning-rate sweep (seed {results['dev_seed']}, dev problems; score %):", "",
                  "| method | " + " | ".join(rates) + " | chosen |", "| --- |" + " --- |" * (len(rates) + 1)]
        for method, sweep in results["sweep"].items():
            cells = [_pct(sweep[r]["score"]) if r in sweep else "-" for r in rates]
            chosen = results["chosen_learning_rate"].get(method)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    rows = comparisons(results) if results["runs"] else {}
    if rows:
        opd_time = rows.get("opd", {}).get("step_time")
        lines += ["", "Test (score = mean of the last two evaluations, %; difference to OPD paired by seed, "
                  "mean [95% t-interval]):", "",
                  "| method | lr | mean +- std | per seed | vs OPD | low-divergence share | step time |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for method, r in rows.items():
            seeds = ", ".join(_pct(v) for v in r["scores"].values())
            vs = "-" if r["vs_opd"] is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * v for v in r["vs_opd"]))
            ratio = f" ({r['step_time'] / opd_time:.2f}x)" if opd_time else ""
            lines.append(f"| {method} | {r['learning_rate']:g} | {_pct(r['mean'])} +- {_pct(r['std'])} | {seeds} | "
                         f"{vs} | "
                         f"{_pct(r['low_divergence_share'])}{'%' if r['low_divergence_share'] is not None else ''} | "
                         f"{1e3 * r['step_time']:.0f} ms{ratio} |")
    return "\n".join(lines)


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: --{name} is empty")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m topd_jax.miniature", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="results/miniature", help="output directory (results.md, results.json, runs)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of test seeds")
    parser.add_argument("--dev-seed", type=int, default=DEV_SEED,
                        help="the learning-rate sweep's seed (not a test seed)")
    parser.add_argument("--learning-rates", default=",".join(f"{lr:g}" for lr in LEARNING_RATES),
                        help="comma list swept per method (one value: no sweep)")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps per run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods to compare")
    parser.add_argument("--eval-problems", type=int, default=1024, help="held-out test problems")
    parser.add_argument("--dev-problems", type=int, default=256, help="problems the sweep is scored on")
    parser.add_argument("--evals", type=int, default=2, help="evaluations per run after step 0 (score: last two)")
    parser.add_argument("--locator-batches", type=int, default=8,
                        help="batches of 32 rollouts for the locator analysis")
    parser.add_argument("--cache", default=None, help="where the SFT'd models are kept; None: OUT/models")
    args = parser.parse_args(argv)
    seeds = _numbers(args.seeds, int, "seeds")
    rates = _numbers(args.learning_rates, float, "learning-rates")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    for name in ("steps", "eval_problems", "dev_problems"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.evals < 2 or args.locator_batches < 0:
        parser.error("--evals must be >= 2 and --locator-batches >= 0")
    if args.dev_seed in seeds:
        parser.error(f"--dev-seed {args.dev_seed} must not be one of the test seeds {seeds}")
    if any(lr <= 0 for lr in rates):
        parser.error("--learning-rates must be > 0")
    os.makedirs(args.out, exist_ok=True)
    results = reproduce(args.out, seeds=seeds, dev_seed=args.dev_seed, learning_rates=rates, steps=args.steps,
                        methods=methods, eval_count=args.eval_problems, dev_eval_count=args.dev_problems,
                        evals=args.evals, cache_dir=args.cache, locator_batches=args.locator_batches,
                        progress=lambda text: print(text, flush=True))
    table = summary(results)
    fileio.write_file(os.path.join(args.out, "results.md"), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEV_EVAL_SEED", "DEV_SEED", "DISTIL", "EVAL_SEED", "LEARNING_RATES", "METHODS", "STUDENT", "SftConfig",
           "TEACHER", "accuracy", "cached_sft", "candidate_table", "comparisons", "completions", "correctness",
           "distil", "distil_config", "eval_problems", "load", "located_rollouts", "locator_analysis", "locator_table",
           "malformed",
           "paired_interval", "precision_recall", "reproduce", "roc_auc", "sft", "sft_batch", "summary"]
