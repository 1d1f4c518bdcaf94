"""TOPD doing its job, on the synthetic task, on a CPU: the README's first command.

    python -m topd_jax.demo [--out topd_demo] [--cache DIR] [--steps 75] [--methods ...] [--quick]

1. Supervised-trains a teacher (larger, its own surface style, repairs slips) and a weaker
   student (smaller, fewer steps, another style) on the synthetic arithmetic task (version 3),
   or loads them from the cache (default ~/.cache/topd_jax/miniature, or $TOPD_CACHE).
2. Distils the student with OPD, OPD with suppression, TOPD and TOPD with the oracle locator
   (the fork labels: the bound of what suppression and guidance can do) on the same budget
   (256 prompts per step, the regime where OPD learns) and learning rate, seed 0, evaluating
   greedy accuracy on held-out problems along the way.
3. Prints a table with a row per method: its accuracy along the way, final accuracy, the area
   under its curve and its paired difference to OPD (the same problems, 95% Student-t interval,
   `statistics.paired_interval`), and writes into --out: accuracy.png (accuracy over steps per
   method), ot_histograms.png (OT distances of high-loss candidates vs reference positions),
   locators.png (ROC curve of every locator against the fork labels), rollout.html (one student
   rollout with its high-loss tokens, each candidate's fork label beside the locator's verdict)
   and results.json.

One seed: the paired interval covers problem-to-problem noise only, not seed-to-seed; the
multi-seed comparison with a tuned learning rate per method is
`python -m topd_jax.experiments reproduce` (docs/results.md).

SIGTERM (or a preemption) stops the current distillation after a saved checkpoint; the demo then
skips the remaining methods and marks the table and results.json ("partial": true) as partial.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from topd_jax import fileio

QUICK_SFT_STEPS = (40, 10)  # teacher, student: a smoke run, not a result


def cache_dir(given: str | None) -> str:
    if given:
        return given
    root = os.environ.get("TOPD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "topd_jax")
    return os.path.join(root, "miniature")


def plot_accuracy(curves: dict[str, list], teacher: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        steps, acc = zip(*curve)
        ax.plot(steps, acc, marker="o", label=method)
    ax.axhline(teacher, color="gray", linestyle="--", label="teacher")
    ax.set(xlabel="distillation step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02),
           title="Student accuracy while distilling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ot_histograms(rows: list[dict[str, Any]], path: str) -> None:
    """Sum of the per-step OT histograms (20 bins on [0, 2]) of candidates and references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 2.0, 21)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for key, label in (("ot_hist_candidates", "high-loss candidates"), ("ot_hist_reference", "reference positions")):
        counts = np.sum([r[key] for r in rows if key in r], axis=0)
        if np.sum(counts):
            ax.stairs(counts / np.sum(counts), edges, label=label, fill=False, linewidth=2)
            drawn = True
    ax.set(xlabel="OT distance of the student's and the teacher's look-ahead windows", ylabel="share",
           title="Where futures diverge")
    if drawn:  # no TOPD rows (a run stopped before TOPD): an empty plot, not a warning
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_locators(tables: list[dict[str, np.ndarray]], path: str) -> None:
    """ROC curves of every locator's score against the fork labels (labelled candidates only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from topd_jax.experiments.statistics import roc_auc
    from topd_jax.losses.locators import LOCATORS

    labels = np.concatenate([t["label"] for t in tables])
    fork = labels[labels >= 0] == 1
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in LOCATORS:
        scores = np.concatenate([t[name] for t in tables])[labels >= 0]
        if fork.all() or not fork.any():
            continue
        order = np.argsort(-scores, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(fork[order]) / fork.sum()])
        fpr = np.concatenate([[0], np.cumsum(~fork[order]) / (~fork).sum()])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, fork):.2f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    ax.set(xlabel="surface forms called divergent", ylabel="forks called divergent",
           title=f"Locators vs fork labels ({fork.size} candidates)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rollout_html(student, teacher, loss, path: str, *, seed: int = 0) -> dict[str, Any]:
    """Render one student rollout: candidates C (high loss), R (divergent) and C \\ R (suppressed)."""
    import jax

    from topd_jax.data import synthetic
    from topd_jax.losses.topd import topd_weights
    from topd_jax.experiments.protocol import located_rollouts
    from topd_jax.trainer.step import StudentLogprobs, experience, loss_inputs

    tok = synthetic.SyntheticTokenizer()
    problems = synthetic.problems(seed + 30_000, 0, 16)
    rollout, scores, located = located_rollouts(student, teacher, loss, problems, jax.random.PRNGKey(seed))
    located = located[loss.locator]
    # The training rule itself (the run's locator and threshold mode), not a copy of it.
    selection = topd_weights(loss_inputs(experience(rollout, scores, located), StudentLogprobs(rollout.logprobs)), loss)
    tau = selection.tau
    valid, positions, ot, divergent = (np.asarray(x) for x in (selection.valid, selection.positions, selection.scores,
                                                               selection.divergent))
    # The rollout with both kinds of candidates shows the method best.
    order = np.argsort(-(np.minimum(divergent.sum(1), 1) + np.minimum((valid & ~divergent).sum(1), 1)), kind="stable")
    b = int(order[0])
    d = np.asarray(rollout.logprobs - scores.logprobs)[b]
    tokens, tmask = np.asarray(rollout.tokens)[b], np.asarray(rollout.mask)[b]
    labels = synthetic.fork_labels(problems[b], tokens)
    windows = np.asarray(located.teacher_windows.tokens)[b] if located.teacher_windows is not None else None
    kind = {}
    for m in np.flatnonzero(valid[b]):
        t = int(positions[b, m])
        future = f"; teacher continues: {tok.decode(windows[m])}" if windows is not None else ""
        kind[t] = ("divergent" if divergent[b, m] else "suppressed", f"D = {ot[b, m]:.3f}{future}")
    names = {1: "fork", 0: "surface form", -1: "undecidable"}
    spans, rows = [], []
    for t in np.flatnonzero(tmask):
        word = synthetic.VOCAB[int(tokens[t])]
        cls, note = kind.get(int(t), ("", ""))
        fork = names[int(labels[t])]
        title = f"d = {d[t]:.2f} ({fork}){'; ' + note if note else ''}"
        mark = f'<sup class="label">{"F" if labels[t] == 1 else "S" if labels[t] == 0 else "?"}</sup>' if cls else ""
        spans.append(f'<span class="tok {cls}" title="{html.escape(title)}">{html.escape(word)}{mark}</span>')
        if cls:
            agrees = (labels[t] == 1) == (cls == "divergent") if labels[t] >= 0 else None
            verdict = {True: "right", False: "wrong", None: "-"}[agrees]
            rows.append(f"<tr><td>{t}</td><td><code>{html.escape(word)}</code></td><td>{d[t]:.2f}</td>"
                        f"<td>{fork}</td><td>{cls}</td><td>{verdict}</td><td>{html.escape(note)}</td></tr>")
    page = f"""<!doctype html><meta charset="utf-8"><title>TOPD: one rollout</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}} .tok{{padding:2px 4px;margin:1px;
display:inline-block;border-radius:4px;font-family:monospace}} .divergent{{background:#f4a3a3}}
.suppressed{{background:#ddd;text-decoration:line-through}} .legend span{{margin-right:1em}}
.label{{font-size:70%;color:#444}}</style>
<h1>One student rollout, as TOPD sees it</h1>
<p><b>Prompt:</b> <code>{html.escape(problems[b].prompt())}</code> (answer {problems[b].answer})</p>
<p class="legend"><span class="tok divergent">real divergent state</span> high-loss token whose
look-ahead futures diverge (OT distance D &ge; &tau; = {float(tau):.3f}): kept, plus guidance along the
teacher's window. <span class="tok suppressed">suppressed</span> high-loss token whose futures do not
diverge: its OPD weight is set to &alpha;. Hover a token for its loss d<sub>t</sub> = b<sub>t</sub> -
q<sub>t</sub>, its fork label and, at candidates, D and the teacher's continuation. At every candidate
the superscript is its fork label (F fork, S surface form, ? undecidable), beside the locator's
verdict (the colour); the table lists both.</p>
<p>{' '.join(spans)}</p>
<table border="1" cellpadding="3" style="border-collapse:collapse"><tr><th>t</th><th>token</th><th>d</th>
<th>fork label</th><th>locator ({html.escape(loss.locator)})</th><th>verdict vs label</th>
<th>D, teacher's window</th></tr>
{''.join(rows)}</table>
"""
    fileio.write_file(path, page)
    return {"candidates": int(valid[b].sum()), "divergent": int(divergent[b].sum())}


DEMO_METHODS = ("opd", "opd_suppress", "topd", "topd@oracle")
DEMO_STEPS = 75  # OPD lifts the student from ~30% to ~65% by then; 4 methods fit 10 minutes on 2 cores


def run(out: str, *, cache: str | None = None, steps: int = DEMO_STEPS, quick: bool = False,
        methods: Sequence[str] = DEMO_METHODS, learning_rate: float | None = None) -> dict[str, Any]:
    """Everything the module docstring lists; returns the results written to results.json."""
    from tqdm import tqdm

    from topd_jax.experiments import models, protocol
    from topd_jax.experiments.statistics import paired_interval

    os.makedirs(out, exist_ok=True)
    learning_rate = protocol.DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
    teacher_sft, student_sft = models.TEACHER_SFT, models.STUDENT_SFT
    eval_count, locator_batches, locator_batch, batch = 512, 4, 32, protocol.BATCH
    if quick:
        import dataclasses

        teacher_sft = dataclasses.replace(teacher_sft, steps=QUICK_SFT_STEPS[0], batch_size=16)
        student_sft = dataclasses.replace(student_sft, steps=QUICK_SFT_STEPS[1], batch_size=16)
        eval_count, locator_batches, locator_batch, batch = 32, 1, 8, 16
    total = teacher_sft.steps + student_sft.steps + steps * len(methods)
    bar = tqdm(total=total, desc="demo", unit="step")
    cache = cache_dir(cache)

    def sft(config, name):
        bar.set_description(f"SFT {name}")
        cached = os.path.isfile(os.path.join(cache, f"{name}-{config.key()}", "config.json"))
        path = models.cached_sft(config, cache, name, progress=lambda i, loss: bar.update(1))
        if cached:
            bar.update(config.steps)
        return path

    teacher_dir, student_dir = sft(teacher_sft, "teacher"), sft(student_sft, "student")
    problems = models.eval_problems(eval_count)
    teacher, student = models.load(teacher_dir), models.load(student_dir)
    results: dict[str, Any] = {"teacher_accuracy": models.accuracy(teacher, problems), "methods": {},
                               "eval_problems": eval_count, "steps": steps, "batch": batch, "partial": False,
                               "learning_rate": learning_rate}
    rows_by_method, correct = {}, {}
    for method in methods:
        bar.set_description(f"distil {method}")
        config = protocol.distil_config(student_dir, teacher_dir, method=method, seed=0, steps=steps, batch=batch,
                                        learning_rate=learning_rate, output_dir=os.path.join(out, "runs", method))
        run_ = protocol.distil(config, problems, eval_every=protocol.EVAL_EVERY, on_step=lambda s: bar.update(1))
        rows_by_method[method], correct[method] = run_["metrics"], run_["correct"]
        low = [r["low_divergence_share"] for r in run_["metrics"] if "low_divergence_share" in r]
        results["methods"][method] = {"accuracy": run_["accuracy"], "final": run_["final"], "area": run_["area"],
                                      "step_time": run_["step_time"],
                                      "low_divergence_share": float(np.mean(low)) if low else None}
        if method != "opd" and "opd" in correct:  # per problem, the same problems: paired
            results["methods"][method]["vs_opd"] = paired_interval(correct[method] - correct["opd"])
        # The trainer returns early on SIGTERM (after saving): this method's numbers are then
        # from fewer steps than asked, which the table and results.json must say.
        if run_["stopped_at"] < steps:
            results["methods"][method].update(partial=True, stopped_at=run_["stopped_at"])
            results["partial"] = True
            break  # the user asked the demo to stop
    bar.set_description("plots")
    plot_accuracy({m: r["accuracy"] for m, r in results["methods"].items()}, results["teacher_accuracy"],
                  os.path.join(out, "accuracy.png"))
    topd_rows = next((rows for m, rows in rows_by_method.items() if m.startswith("topd") and "@" not in m), [])
    plot_ot_histograms(topd_rows, os.path.join(out, "ot_histograms.png"))
    loss = protocol.distil_config(student_dir, teacher_dir, method="topd", seed=0, steps=1, output_dir=out).loss
    tables: list = []
    results["locators"] = protocol.locator_analysis(student, teacher, loss=loss, batches=locator_batches,
                                                    batch_size=locator_batch, tables=tables)
    plot_locators(tables, os.path.join(out, "locators.png"))
    results["rollout"] = rollout_html(student, teacher, loss, os.path.join(out, "rollout.html"))
    bar.close()
    fileio.write_file(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    return results


def table(results: dict[str, Any]) -> str:
    """The comparison as Markdown; a method cut short (SIGTERM) is marked with the step it reached
    and the step its accuracy was measured at, and methods not run are listed as such."""
    from topd_jax.experiments.rendering import interval
    from topd_jax.losses.locators import LOCATORS

    base = next(iter(results["methods"].values()))["accuracy"][0][1]
    opd = results["methods"].get("opd", {}).get("step_time")
    lines = [f"teacher {results['teacher_accuracy']:.1%}; student before distillation {base:.1%} "
             f"(greedy accuracy on {results['eval_problems']} held-out problems); seed 0, {results['steps']} steps of "
             f"{results['batch']} prompts, learning rate {results['learning_rate']:g} for every method", "",
             "| method | accuracy along the way | final | area | final vs OPD, paired over problems [95%] | "
             "low-divergence share | step time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, r in results["methods"].items():
        curve = ", ".join(f"{s}: {100 * a:.1f}" for s, a in r["accuracy"])
        low = "-" if r["low_divergence_share"] is None else f"{r['low_divergence_share']:.1%}"
        ratio = f" ({r['step_time'] / opd:.2f}x OPD)" if opd and method != "opd" else ""
        vs = "-" if r.get("vs_opd") is None else interval(r["vs_opd"]) + " pts"
        name = method
        if r.get("partial"):
            name += (f" (PARTIAL: stopped at step {r['stopped_at']} of {results['steps']}, accuracy at step "
                     f"{r['accuracy'][-1][0]})")
        lines.append(f"| {name} | {curve} | {r['final']:.1%} | {r['area']:.1%} | {vs} | {low} | "
                     f"{1e3 * r['step_time']:.0f} ms{ratio} |")
    loc = results.get("locators")
    if loc:
        lines += ["", f"locators on {int(loc['candidates'])} candidates of the SFT'd student "
                  f"({loc['cosmetic_share']:.0%} surface forms, {loc['fork_share']:.0%} forks): " + ", ".join(
                      f"{name} AUC {loc[f'{name}_auc']:.2f}" for name in LOCATORS
                      if f"{name}_auc" in loc and name != "oracle")]
    if results.get("partial"):
        lines += ["", f"PARTIAL RUN: stopped before {results['steps']} steps; not a result."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.experiments.protocol import METHODS

    parser = argparse.ArgumentParser(prog="python -m topd_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="topd_demo", help="output directory (plots, HTML, results.json)")
    parser.add_argument("--cache", default=None, help="SFT'd models cache (default ~/.cache/topd_jax/miniature)")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="distillation steps per method")
    parser.add_argument("--learning-rate", type=float, default=None, help="every method's rate (default 1e-3)")
    parser.add_argument("--quick", action="store_true", help="tiny SFT budgets and batches: a smoke run, not a result")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS),
                        help="comma list of experiments.protocol.METHODS to distil (opd first for the paired "
                             "differences)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown method {(unknown or [''])[0]!r}; choose from {', '.join(METHODS)}")
    results = run(args.out, cache=args.cache, steps=args.steps, quick=args.quick, methods=methods,
                  learning_rate=args.learning_rate)
    print(table(results))
    print(f"\nplots (accuracy, ot_histograms, locators), rollout.html and results.json in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
