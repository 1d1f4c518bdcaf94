"""The plan's table, its JSON and the fit check, from a `measure.StepPlan` and a `chips.Chip`.

Roofline estimate of a phase (an estimate, not a measurement: perfect overlap, peak rates):

    t = max(F / peak_flops, H / hbm_bandwidth, C / ici_bandwidth)

F, H, C: the phase's FLOPs, HBM bytes accessed and collective bytes per device, read from its
compiled program with every counted loop (scanned layers, chunked losses, the OT solver) per
iteration (`hlo`). The decode loops have no trip count (they stop at EOS) and their body counts
once, so for sample and branch each separately compiled loop step adds its figures (steps - 1)
more times: the loops run at most max_new_tokens (K) steps, fewer when every row has sampled an EOS.
The table also shows XLA's own FLOPs (`cost_analysis`, every loop body once) for comparison, and
beside the estimate the phase's first-principles bound (`plan.bound`: what the shapes need at least),
the step's totals of both, and the sampling loop's decode tokens/s per device by each.

The sample row is the phase under the config's `rollout.mode` at the plan's rollout lengths
(`--lengths`, `plan.modes`: the loop run for the mode's expected steps at its mean filled length;
`max` and static: max_new_tokens steps, as before the option), and a second table sets the modes
side by side. `loop_totals`, `roofline_seconds` and `bound_seconds` of a phase alone, and the
JSON's `with_loops`, are the loops run to their full step count.

A phase does not fit when its peak exceeds headroom x the chip's HBM, or when it did not compile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from topd_jax.hardware.chips import GIB, Chip
from topd_jax.hardware.hlo import KINDS
from topd_jax.plan.measure import PhaseFigures, StepPlan
from topd_jax.plan.modes import SampleMode, Sampling

_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A"}


def loop_totals(p: PhaseFigures) -> tuple[float, float, float]:
    """(FLOPs, HBM bytes, collective bytes) of the phase with every decode loop run to its full
    step count (module docstring)."""
    flops, hbm, coll = p.flops, p.hbm_bytes, sum(p.collectives.values())
    for d in p.decode:
        flops += (d.steps - 1) * d.flops
        hbm += (d.steps - 1) * d.hbm_bytes
        coll += (d.steps - 1) * sum(d.collectives.values())
    return flops, hbm, coll


def roofline(totals: tuple[float, float, float], chip: Chip) -> float:
    """max(FLOPs / peak, HBM bytes / HBM bandwidth, collective bytes / ICI bandwidth)."""
    flops, hbm, coll = totals
    return max(flops / chip.peak_flops, hbm / chip.hbm_bandwidth, coll / chip.ici_bandwidth)


def roofline_seconds(p: PhaseFigures, chip: Chip | None) -> float | None:
    """The roofline estimate of phase `p` on `chip` (module docstring); None without a chip or figures."""
    if chip is None or p.error is not None:
        return None
    return roofline(loop_totals(p), chip)


def bound_seconds(p: PhaseFigures, chip: Chip | None) -> float | None:
    """The first-principles bound of phase `p` on `chip` (`plan.bound`); None without one."""
    if chip is None or p.bound is None or p.error is not None:
        return None
    return p.bound.seconds(chip)


def mode_seconds(m: SampleMode, chip: Chip | None) -> tuple[float | None, float | None]:
    """(roofline estimate, bound) of the sample phase under one rollout mode (`plan.modes`)."""
    if chip is None:
        return None, None
    return (None if m.totals is None else roofline(m.totals, chip)), m.bound.seconds(chip)


def phase_seconds(plan: StepPlan, p: PhaseFigures, chip: Chip | None) -> tuple[float | None, float | None]:
    """(roofline estimate, bound) of phase `p` as the table's row shows it: the sample phase under
    the config's rollout mode at the plan's lengths (module docstring), the others as they are."""
    roof, bound = roofline_seconds(p, chip), bound_seconds(p, chip)
    if p.phase == "sample" and plan.sampling is not None and roof is not None:
        mode_roof, bound = mode_seconds(plan.sampling.get(plan.sampling.mode), chip)
        roof = roof if mode_roof is None else mode_roof
    return roof, bound


def decode_tokens(plan: StepPlan, p: PhaseFigures) -> float | None:
    """Tokens the phase's decode loop writes per device (the sample phase: at the plan's lengths)."""
    if p.phase == "sample" and plan.sampling is not None:
        return plan.sampling.modes[0].tokens
    return None if p.bound is None or not p.bound.decode_tokens else p.bound.decode_tokens


def _per_s(tokens: float | None, seconds: float | None) -> float | None:
    return tokens / seconds if tokens and seconds else None


def failures(plan: StepPlan, chip: Chip | None, headroom: float) -> list[str]:
    """One line per phase that does not fit (module docstring); empty when every phase fits."""
    lines = []
    for p in plan.phases:
        if p.error is not None:
            used = "" if math.isnan(p.peak) else f"; needs at least {p.peak / GIB:.1f} GiB per device"
            said = p.error if p.error.startswith(("did not lower", "not compiled")) else f"did not compile: {p.error}"
            lines.append(f"{p.phase}: {said}{used}")
        elif chip is not None and p.peak > headroom * chip.hbm_bytes:
            lines.append(f"{p.phase}: peak {p.peak / GIB:.1f} GiB per device exceeds {headroom:g} x "
                         f"{chip.hbm_bytes / GIB:.1f} GiB HBM of {chip.name} = {headroom * chip.hbm_bytes / GIB:.1f} GiB")
    return lines


def _num(x: float) -> str:
    """3 significant digits without exponents for the usual range (0.0021, 0.213, 21.3, 2130)."""
    if math.isnan(x):
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{max(2 - math.floor(math.log10(abs(x))), 1)}f}" if abs(x) >= 1e-4 else f"{x:.1e}"


def _gib(x: float) -> str:
    return _num(x / GIB)


def format_table(plan: StepPlan, chip: Chip | None, topology: str, headroom: float) -> str:
    """The plan as printed by `python -m topd_jax.plan` (figures per device)."""
    s_used, s_all = plan.student_layers
    t_used, t_all = plan.teacher_layers
    lines = [f"topology {topology}: {plan.num_devices} devices, mesh {plan.mesh_shape} (train), "
             f"{plan.inference_mesh_shape} (sample, branch)"]
    if chip is None:
        lines.append("chip: unknown (no HBM, % HBM or roofline; known chips: v4, v5e, v5p, v6e)")
    else:
        lines.append(f"chip {chip.name} per device: HBM {chip.hbm_bytes / GIB:.1f} GiB, {chip.peak_flops / 1e12:.0f} "
                     f"TFLOP/s bf16, HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s, ICI {chip.ici_bandwidth / 1e9:.0f} GB/s "
                     f"(public Cloud TPU figures; headroom {headroom:g})")
    if (s_used, t_used) != (s_all, t_all):
        lines.append(f"LAYERS CUT: student {s_used} of {s_all}, teacher {t_used} of {t_all} layers (not the full models)")
    header = ["phase", "args GiB", "out GiB", "temp GiB", "held GiB", "peak GiB", "% HBM", "TFLOP", "XLA TFLOP",
              "HBM GB", "AG / RS / AR / A2A GB", "roofline s (est.)", "bound s", "compile s"]
    rows = []
    totals = [0.0, 0.0]
    for p in plan.phases:
        share = "-" if chip is None or math.isnan(p.peak) else f"{100 * p.peak / chip.hbm_bytes:.0f}%"
        roof, bound = phase_seconds(plan, p, chip)
        if p.error is not None:
            rows.append([p.phase, "-", "-", "-", _gib(p.held), ">= " + _gib(p.peak) if p.oom_used else "-",
                         share if p.oom_used else "-", "-", "-", "-", "-", "-", "-", f"{p.compile_s:.1f}"])
            continue
        totals = [totals[0] + (roof or 0.0), totals[1] + (bound or 0.0)]
        coll = " / ".join(_num(p.collectives[k] / 1e9) for k in KINDS)
        rows.append([p.phase, _gib(p.args), _gib(p.out), _gib(p.temp), _gib(p.held), _gib(p.peak), share,
                     _num(p.flops / 1e12), _num(p.xla_flops / 1e12), _num(p.hbm_bytes / 1e9), coll,
                     "-" if roof is None else _num(roof), "-" if bound is None else _num(bound), f"{p.compile_s:.1f}"])
    if chip is not None and len(rows) > 1:
        step = "step" if plan.sampling is None else f"step ({plan.sampling.mode})"
        rows.append([step] + [""] * 10 + [_num(totals[0]), _num(totals[1]), ""])
    lines += _markdown(header, rows)
    lines.append("held: the step's other long-lived arrays in HBM during the phase; peak = args + out - alias + "
                 "temp + held; TFLOP, HBM GB, collectives: counted loops per iteration (XLA TFLOP: XLA's cost "
                 "analysis, every loop body once); roofline = max(FLOP / peak, HBM bytes / HBM bw, collective "
                 "bytes / ICI bw) with every decode loop run to its full step count; bound = what the shapes "
                 "need at least (matmul FLOPs / peak; a decode step: its weights' and KV cache's shares / HBM bw; "
                 "docs/plan.md); step = the phases' sum."
                 + ("" if plan.sampling is None else f" The sample row's roofline and bound: its loop run for the "
                    f"expected steps of rollout.mode {plan.sampling.mode} at lengths {plan.sampling.lengths} "
                    "(the table below)."))
    for p in plan.phases:
        roof, bound = phase_seconds(plan, p, chip)
        tokens = decode_tokens(plan, p)
        est, ideal = _per_s(tokens, roof), _per_s(tokens, bound)
        if est is not None and ideal is not None:
            lines.append(f"  {p.phase}: {tokens:.0f} tokens per device; decode tokens/s per device "
                         f"{_num(est)} (estimate), {_num(ideal)} (bound)")
    if plan.sampling is not None and any(p.phase == "sample" for p in plan.phases):
        lines += format_modes(plan.sampling, chip)
    for p in plan.phases:
        if p.error is None and p.loops:
            parts = []
            if any(n is not None for n in p.loops):
                parts.append("trip counts " + ", ".join(str(n) for n in p.loops if n is not None))
            if None in p.loops:
                parts.append(f"{p.loops.count(None)} without a trip count (counted once)")
            lines.append(f"  {p.phase} loops: " + "; ".join(parts))
    if any(p.decode for p in plan.phases):
        lines.append("Decode loops (no trip count: they stop at EOS) counted once; one loop step, compiled alone:")
    for p in plan.phases:
        for d in p.decode:
            need = d.weight_bytes + d.cache_bytes
            lines.append(f"  {p.phase} ({d.model}): one step {_num(d.flops / 1e12)} TFLOP, {_num(d.hbm_bytes / 1e9)} GB "
                         f"HBM, {_num(sum(d.collectives.values()) / 1e9)} GB collectives; x {d.steps} steps = "
                         f"{_num(d.loop_flops / 1e12)} TFLOP, {_num(d.loop_hbm_bytes / 1e9)} GB HBM (compiled in {d.compile_s:.1f} s)")
            if need:
                lines.append(f"    must read: weights {_num(d.weight_bytes / 1e9)} GB + KV cache {_num(d.cache_bytes / 1e9)} GB"
                             f" = {_num(need / 1e9)} GB; reads {d.hbm_bytes / need:.2f} x that")
    for p in plan.phases:
        uncounted = dict(p.uncounted)
        for d in p.decode:  # the phase's program runs one step of each loop, the step (steps - 1) more
            for name, n in d.uncounted.items():
                uncounted[name] = uncounted.get(name, 0) + n * (d.steps - 1)
        if uncounted:
            lines.append(f"{p.phase}: FLOPs NOT COUNTED of custom calls without a FLOPs rule (counted 0): "
                         + ", ".join(f"{name} x {n}" for name, n in sorted(uncounted.items())))
    for p in plan.phases:
        if p.largest:
            lines.append(f"{p.phase}: largest arrays of the compiled program (per device):")
        for size, kind, op, name in p.largest:
            lines.append(f"  {_gib(size)} GiB {kind} {op} {name[-110:]}")
    for p in plan.phases:
        if p.error is not None:
            lines.append(f"{p.phase}: {p.error}")
    return "\n".join(lines)


def format_modes(sampling: Sampling, chip: Chip | None) -> list[str]:
    """The sample phase per rollout mode side by side (`plan.modes`), as lines of the printed plan."""
    lines = [f"Sample phase per rollout mode at lengths {sampling.lengths} (E[min(L, {sampling.cap})] = "
             f"{sampling.mean_length:.0f} tokens; B = {sampling.rows} rows, S = {sampling.slots} slots, host check "
             f"every {sampling.check_every} steps; per device):"]
    header = ["rollout mode", "decode steps", "mean filled slots", "roofline s (est.)", "bound s",
              "tokens/s (est.)", "tokens/s (bound)", "/ static (est.)", "/ static (bound)"]
    static = mode_seconds(sampling.get("static"), chip)
    rows = []
    for m in sampling.modes:
        roof, bound = mode_seconds(m, chip)
        ratios = [_num(x / base) if x is not None and base else "-" for x, base in zip((roof, bound), static)]
        rows.append([m.name + (" *" if m.name == sampling.mode else ""), _num(m.steps), _num(m.filled),
                     "-" if roof is None else _num(roof), "-" if bound is None else _num(bound),
                     "-" if _per_s(m.tokens, roof) is None else _num(_per_s(m.tokens, roof)),
                     "-" if _per_s(m.tokens, bound) is None else _num(_per_s(m.tokens, bound)), *ratios])
    lines += _markdown(header, rows)
    lines.append(f"* rollout.mode (the sample row above); static: E[max of B lengths] steps, each reading all B rows; "
                 f"continuous: ceil(B E[L] / S) + B (c / 2) / S steps at the length-biased mean filled length; "
                 f"produced: the {sampling.mean_length * sampling.rows:.0f} tokens the rows produce, at the decode "
                 f"step's per-token figures; tokens/s: the {sampling.modes[0].tokens:.0f} produced per device.")
    return lines


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows)]


def modes_json(sampling: Sampling, chip: Chip | None) -> dict[str, Any]:
    """`format_modes` as a JSON-ready dict."""
    static = mode_seconds(sampling.get("static"), chip)
    out = {"lengths": sampling.lengths, "rollout_mode": sampling.mode, "rows": sampling.rows, "slots": sampling.slots,
           "check_every": sampling.check_every, "cap": sampling.cap, "mean_length": sampling.mean_length,
           "tokens_per_device": sampling.modes[0].tokens, "modes": {}}
    for m in sampling.modes:
        roof, bound = mode_seconds(m, chip)
        out["modes"][m.name] = {
            "decode_steps": m.steps, "mean_filled_slots": m.filled, "roofline_s": roof, "bound_s": bound,
            "tflop": None if m.totals is None else m.totals[0] / 1e12,
            "hbm_bytes": None if m.totals is None else m.totals[1],
            "collective_bytes": None if m.totals is None else m.totals[2],
            "bound_parts": [dataclasses.asdict(part) for part in m.bound.parts],
            "over_static": {"roofline": None if roof is None or not static[0] else roof / static[0],
                            "bound": None if bound is None or not static[1] else bound / static[1]}}
    return out


def to_json(plan: StepPlan, chip: Chip | None, topology: str, headroom: float) -> dict[str, Any]:
    """The figures of `format_table` as a JSON-ready dict (bytes as GiB where the key says so)."""

    def gib(x):
        return None if math.isnan(x) else x / GIB

    phases = []
    for p in plan.phases:
        flops, hbm, coll = loop_totals(p)
        roof, bound = phase_seconds(plan, p, chip)
        parts = p.bound if p.phase != "sample" or plan.sampling is None else plan.sampling.get(plan.sampling.mode).bound
        phases.append({
            "phase": p.phase, "args_gib": gib(p.args), "out_gib": gib(p.out), "alias_gib": gib(p.alias),
            "temp_gib": gib(p.temp), "held_gib": gib(p.held), "peak_gib": gib(p.peak),
            "hbm_fraction": None if chip is None or math.isnan(p.peak) else p.peak / chip.hbm_bytes,
            "tflop": p.flops / 1e12, "hbm_bytes": p.hbm_bytes, "collective_bytes": dict(p.collectives),
            "xla_tflop": p.xla_flops / 1e12, "xla_hbm_bytes": p.xla_hbm_bytes, "loop_trip_counts": list(p.loops),
            "uncounted_kernels": dict(p.uncounted),
            "with_loops": {"tflop": flops / 1e12, "hbm_bytes": hbm, "collective_bytes": coll},
            "roofline_s": roof, "bound_s": bound,
            "bound_parts": None if parts is None else [dataclasses.asdict(part) for part in parts.parts],
            "decode_tokens_per_device": decode_tokens(plan, p) if p.bound is not None else None,
            "compile_s": p.compile_s, "error": p.error,
            "decode_steps": [{"model": d.model, "steps": d.steps, "step_tflop": d.flops / 1e12,
                              "step_hbm_bytes": d.hbm_bytes, "step_collective_bytes": d.collectives,
                              "step_xla_tflop": d.xla_flops / 1e12, "step_xla_hbm_bytes": d.xla_hbm_bytes,
                              "uncounted_kernels": dict(d.uncounted), "compile_s": d.compile_s,
                              "weight_bytes": d.weight_bytes, "cache_bytes": d.cache_bytes} for d in p.decode],
            "largest_arrays": [{"bytes": size, "type": kind, "op": op, "op_name": name}
                               for size, kind, op, name in p.largest],
        })
    chip_figures = None if chip is None else {
        "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
        "ici_bandwidth": chip.ici_bandwidth}
    return {"topology": topology, "chip": None if chip is None else chip.name,
            "hbm_gib": None if chip is None else chip.hbm_bytes / GIB, "chip_figures": chip_figures,
            "devices": plan.num_devices, "mesh": plan.mesh_shape, "inference_mesh": plan.inference_mesh_shape, "headroom": headroom,
            "layers": {"student": list(plan.student_layers), "teacher": list(plan.teacher_layers)},
            "fits": not failures(plan, chip, headroom), "phases": phases,
            "step": {"roofline_s": _total(phases, "roofline_s"), "bound_s": _total(phases, "bound_s"),
                     "rollout_mode": None if plan.sampling is None else plan.sampling.mode,
                     "lengths": None if plan.sampling is None else plan.sampling.lengths},
            "sampling": None if plan.sampling is None else modes_json(plan.sampling, chip)}


def _total(phases: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in phases]
    return None if not values or any(v is None for v in values) else sum(values)


__all__ = ["decode_tokens", "failures", "format_modes", "format_table", "loop_totals", "mode_seconds", "modes_json",
           "phase_seconds", "roofline", "roofline_seconds", "to_json"]
