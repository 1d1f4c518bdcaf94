"""Markdown tables of the experiments' results (the protocol's results.json, the demo's).

    summary(results)        the protocol: setup, locators, screen, sweep, test tables
    comparisons(results)    per carried method: budgets, area, final, per-compute, paired vs OPD
"""

from __future__ import annotations

from typing import Any

import numpy as np

from topd_jax.experiments.statistics import accuracy_at, paired_interval
from topd_jax.losses.locators import LOCATORS


def pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def interval(values: tuple[float, float, float] | None) -> str:
    """A paired interval in points: +m [lo, hi]."""
    if values is None:
        return "-"
    m, lo, hi = (100 * v for v in values)
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" if np.isfinite(lo) else f"{m:+.1f}"


def locator_table(loc: dict[str, float]) -> str:
    """`protocol.locator_analysis`'s result: the candidates' label shares, then per locator
    precision, recall, ROC AUC and low-divergence share."""
    lines = [f"{int(loc['candidates'])} high-loss candidates of the SFT'd student: "
             f"{loc['cosmetic_share']:.1%} surface forms (cosmetic), {loc['fork_share']:.1%} forks, "
             f"{loc['unlabelled_share']:.1%} undecidable.", "",
             "| locator | precision | recall | ROC AUC | low-divergence share |", "| --- | --- | --- | --- | --- |"]
    for name in LOCATORS:
        if f"{name}_auc" in loc:
            lines.append(f"| {name} | {pct(loc[f'{name}_precision'])}% | {pct(loc[f'{name}_recall'])}% | "
                         f"{loc[f'{name}_auc']:.3f} | {pct(loc[f'{name}_low_divergence_share'])}% |")
    return "\n".join(lines)


def budgets(results: dict[str, Any]) -> list[int]:
    p = results["protocol"]
    return [s for s in range(p["eval_every"], p["steps"] + 1, p["eval_every"])]


def comparisons(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per tested method: mean accuracy at every budget, area and final over the seeds; the paired
    difference to OPD of each (95% Student-t over seeds, `paired_interval`); median step time,
    counted FLOPs per step; the accuracy OPD reaches in the same wall-clock and FLOPs."""
    runs = list(results["runs"].values())
    opd = {r["seed"]: r for r in runs if r["method"] == "opd"}
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        by_seed = {r["seed"]: r for r in runs if r["method"] == method}
        row: dict[str, Any] = {"seeds": sorted(by_seed), "learning_rate": next(iter(by_seed.values()))["learning_rate"],
                               "step_time": float(np.median([r["step_time"] for r in by_seed.values()])),
                               "step_flops": float(np.median([r["step_flops"] for r in by_seed.values()]))}
        metrics = {f"at{b}": (lambda r, b=b: accuracy_at(r["accuracy"], b)) for b in budgets(results)}
        metrics.update(area=lambda r: r["area"], final=lambda r: r["final"])
        for name, get in metrics.items():
            values = [get(r) for r in by_seed.values()]
            row[name] = float(np.mean(values))
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            paired = [get(by_seed[s]) - get(opd[s]) for s in by_seed if s in opd]
            row[f"{name}_vs_opd"] = paired_interval(paired) if opd and method != "opd" else None
        lows = [r["low_divergence_share"] for r in by_seed.values() if r["low_divergence_share"] is not None]
        row["low_divergence_share"] = float(np.mean(lows)) if lows else None
        out[method] = row
    return out


def summary(results: dict[str, Any]) -> str:
    """The Markdown tables of `protocol.reproduce`'s results."""
    p = results["protocol"]
    lines = [f"task version {results['task_version']}; teacher {results['teacher_accuracy']:.1%} "
             f"({results['teacher_malformed']:.1%} malformed), student before distillation "
             f"{results['student_accuracy']:.1%} ({results['student_malformed']:.1%} malformed), greedy on "
             f"{p['eval_problems']} held-out problems; {p['steps']} steps of {p['batch']} prompts; test seeds "
             f"{p['seeds']}, development seed {p['dev_seed']} ({p['dev_problems']} development problems)"]
    if not results.get("complete", True):
        lines += ["", "PARTIAL: the protocol did not finish; the tables hold only the runs that did."]
    if results.get("locators"):
        lines += ["", locator_table(results["locators"])]
    marks = budgets(results)
    if results.get("screen"):
        lines += ["", "Screen (development seed, development problems, learning rate 1e-3; accuracy %; "
                  "area = mean accuracy over the steps):", "",
                  "| method | " + " | ".join(f"step {b}" for b in marks) + " | area | final | loss_traj first -> last "
                  "| low-divergence share | step time |", "| --- |" + " --- |" * (len(marks) + 5)]
        for method, r in results["screen"].items():
            traj = r.get("loss_traj") or [None, None]
            traj_text = "-" if traj[0] is None else f"{traj[0]:.2f} -> {traj[1]:.2f}"
            low = r.get("low_divergence_share")
            lines.append(f"| {method} | " + " | ".join(pct(accuracy_at(r['accuracy'], b)) for b in marks) +
                         f" | {pct(r['area'])} | {pct(r['final'])} | {traj_text} | "
                         f"{'-' if low is None else pct(low) + '%'} | {1e3 * r['step_time']:.0f} ms |")
    if results.get("sweep"):
        rates = [f"{lr:g}" for lr in p["learning_rates"]]
        lines += ["", f"Learning-rate sweep of the carried methods (seed {p['dev_seed']}, development problems; "
                  "area %):", "", "| method | " + " | ".join(rates) + " | chosen |",
                  "| --- |" + " --- |" * (len(rates) + 1)]
        for method, sweep in results["sweep"].items():
            cells = [pct(sweep[r]["area"]) if r in sweep else "-" for r in rates]
            chosen = results["chosen_learning_rate"].get(method)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if chosen is None else f'{chosen:g}'} |")
    rows = comparisons(results) if results.get("runs") else {}
    if rows:
        lines += ["", f"Test ({len(p['seeds'])} seeds, {p['eval_problems']} held-out problems; mean accuracy %, "
                  "difference to OPD paired by seed: mean [95% t-interval], points):", "",
                  "| method | lr | " + " | ".join(f"step {b}" for b in marks) + " | area | final | "
                  "area vs OPD | final vs OPD |", "| --- | --- |" + " --- |" * (len(marks) + 4)]
        for method, r in rows.items():
            cells = [f"{pct(r[f'at{b}'])}" + ("" if r[f"at{b}_vs_opd"] is None else f" ({interval(r[f'at{b}_vs_opd'])})")
                     for b in marks]
            lines.append(f"| {method} | {r['learning_rate']:g} | " + " | ".join(cells) +
                         f" | {pct(r['area'])} +- {pct(r['area_std'])} | {pct(r['final'])} +- {pct(r['final_std'])} | "
                         f"{interval(r['area_vs_opd'])} | {interval(r['final_vs_opd'])} |")
        lines += ["", "Per unit of compute (medians over seeds; counted FLOPs: `protocol.step_flops`). 'At OPD's "
                  "wall-clock' / 'at OPD's FLOPs': the method's mean test accuracy at the step where its cumulative "
                  "cost equals OPD's whole run (interpolated along its evaluations), beside OPD's final:", "",
                  "| method | step time | x OPD | GFLOP per step | x OPD | at OPD's wall-clock | at OPD's FLOPs | "
                  "OPD final |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        opd = rows.get("opd")
        for method, r in rows.items():
            time_ratio = r["step_time"] / opd["step_time"] if opd else float("nan")
            flop_ratio = r["step_flops"] / opd["step_flops"] if opd else float("nan")
            lines.append(f"| {method} | {1e3 * r['step_time']:.0f} ms | {time_ratio:.2f} | {r['step_flops'] / 1e9:.1f} | "
                         f"{flop_ratio:.2f} | {pct(_at_cost(results, method, time_ratio))} | "
                         f"{pct(_at_cost(results, method, flop_ratio))} | {pct(opd['final'] if opd else None)} |")
        lines += ["", "Verdict (the rule, fixed before the runs: a method beats OPD only if its area's 95% "
                  "interval against OPD lies above 0, with a real locator (not the oracle), and it also leads at "
                  "OPD's compute, its accuracy at OPD's wall-clock and at OPD's FLOPs above OPD's final):", "",
                  "| method | area vs OPD | final vs OPD | at OPD's wall-clock - OPD final | at OPD's FLOPs - OPD "
                  "final | verdict |", "| --- | --- | --- | --- | --- | --- |"]
        for method, r in rows.items():
            if method == "opd":
                continue
            lines.append(f"| {method} | {interval(r['area_vs_opd'])} | {interval(r['final_vs_opd'])} | "
                         + " | ".join(_points(_at_cost(results, method, r[key] / opd[key]) - opd["final"])
                                      for key in ("step_time", "step_flops"))
                         + f" | {verdict(method, r, results, opd)} |")
    return "\n".join(lines)


def _points(difference: float) -> str:
    return "-" if not np.isfinite(difference) else f"{100 * difference:+.1f}"


def verdict(method: str, row: dict[str, Any], results: dict[str, Any], opd: dict[str, Any]) -> str:
    """What the area's interval and the per-compute comparison say, in the rule's words."""
    low, high = row["area_vs_opd"][1:] if row["area_vs_opd"] else (float("nan"), float("nan"))
    at_cost = [_at_cost(results, method, row[key] / opd[key]) - opd["final"] for key in ("step_time", "step_flops")]
    # a method cheaper than OPD per step leads at OPD's compute when its final does
    at_cost = [a if np.isfinite(a) else row["final"] - opd["final"] for a in at_cost]
    if not np.isfinite(low):
        text = "no paired interval"
    elif low > 0:
        text = "area above OPD"
    elif high < 0:
        text = "area below OPD"
    else:
        text = "area not distinguishable from OPD"
    if "@oracle" in method:
        return f"{text} (oracle locator: a bound, never a win)"
    if low > 0 and all(a > 0 for a in at_cost):
        return "beats OPD"
    if low > 0:
        return f"{text}, but not at OPD's compute"
    return text


def _at_cost(results: dict[str, Any], method: str, ratio: float) -> float:
    """The method's mean test accuracy after (its steps / ratio) steps, i.e. when its cumulative
    cost (ratio x OPD's per step) equals OPD's whole run; linear interpolation along its
    evaluations (NaN for a ratio < 1: it would need more steps than it ran)."""
    curves = [r["accuracy"] for r in results["runs"].values() if r["method"] == method]
    if not curves or not np.isfinite(ratio) or ratio < 1 - 1e-9:
        return float("nan")
    steps = np.array([s for s, _ in curves[0]], np.float64)
    mean = np.mean([[a for _, a in c] for c in curves], axis=0)
    return float(np.interp(steps[-1] / ratio, steps, mean))


__all__ = ["comparisons", "interval", "locator_table", "pct", "summary"]
