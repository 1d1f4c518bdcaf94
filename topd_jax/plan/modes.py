"""The sample phase under each rollout mode (`rollout.mode`), from the rollouts' lengths.

    s = plan_sampling(config, lengths, cache, params, cfg, devices, sample_phase, mid, first)
    [(m.name, m.steps, m.filled) for m in s.modes]     # static, continuous, produced

Per train step: B = prompts_per_step x num_samples rollouts, prompts of P tokens, lengths L
(`plan.lengths`, every expectation of min(L, N), N = max_new_tokens), S decode slots and a host
check every c = 8 steps (`rollout.check_every`). The plan compiles its decode step for B rows, so
it models S = B. One table, `MODES`:

| mode | decode steps T per train step | mean filled slots x a step reads per row |
| --- | --- | --- |
| static | E[max_{i<=B} L_i] = sum_{t<N} (1 - F(t)^B) | P + T / 2 |
| continuous | ceil(B E[L] / S) + B (c / 2) / S | P + E[L^2] / (2 E[L]) |

static: `generate` decodes the B rows in lockstep until every row has ended, so a step reads the
KV cache of all B rows up to the current slot, finished rows included. continuous: S slots kept
busy; a row that ends frees its slot, refilled with a new prompt's prefill at the next host check
(a freed slot idles c / 2 steps on average: the B (c / 2) / S term), rows unfinished at the end of
a train step carry into the next, so in the steady state a train step decodes its B rows' B E[L]
tokens S at a time. A busy slot seen at a random step holds a row with probability proportional
to the row's length and is uniformly far into it: the length-biased mean P + E[L^2] / (2 E[L]).
(A refill that waits for several free slots idles longer; this is the idle of refilling at every
check.) A third row, `produced`, is the tokens the rows actually produce, B E[L], at the decode
step's per-token figures: T = E[L] steps of B tokens at the continuous x, the limit of any
schedule (no step decodes a finished row or an idle slot). Prefill is the same in every mode
(each rollout's prompt is prefilled once per train step).

The phase's figures under a mode: its compiled program (the prefill, the decode loop's body once)
plus (T - 1) decode steps at x, a step at x being affine between the two compiled ones
(`plan.steps`); its bound: the prefill part plus T decode-step parts at x (`bound.decode_part`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from topd_jax.plan import lengths as length_stats
from topd_jax.plan.bound import Bound, Part, decode_part, prefill_part
from topd_jax.plan.figures import computed_bytes, per_device_bytes


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Decode steps per train step, and the mean filled slots per row a step reads."""

    steps: float
    filled: float


def static_schedule(f: np.ndarray, *, rows: int, slots: int, prompt: int, check_every: int) -> Schedule:
    steps = length_stats.expected_max(f, rows)
    return Schedule(steps, prompt + steps / 2)


def _biased_filled(f: np.ndarray, prompt: int) -> float:
    return prompt + length_stats.expected_square(f) / (2 * length_stats.expected_length(f))


def continuous_schedule(f: np.ndarray, *, rows: int, slots: int, prompt: int, check_every: int) -> Schedule:
    steps = math.ceil(rows * length_stats.expected_length(f) / slots) + rows * (check_every / 2) / slots
    return Schedule(steps, _biased_filled(f, prompt))


def produced_schedule(f: np.ndarray, *, rows: int, slots: int, prompt: int, check_every: int) -> Schedule:
    return Schedule(length_stats.expected_length(f), _biased_filled(f, prompt))


# rollout.mode -> its schedule (module docstring)
MODES: dict[str, Callable[..., Schedule]] = {"static": static_schedule, "continuous": continuous_schedule}
ROWS = {**MODES, "produced": produced_schedule}  # the side-by-side table's rows


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"rollout.mode: unknown {mode!r}; choose from {', '.join(MODES)}")
    return mode


@dataclasses.dataclass(frozen=True)
class SampleMode:
    """The sample phase under one row of `ROWS`, per device: its schedule, the tokens the rows
    produce, FLOPs, HBM and collective bytes with the loop run (None without a compiled step) and
    its bound."""

    name: str
    steps: float
    filled: float
    tokens: float
    totals: tuple[float, float, float] | None
    bound: Bound


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Every row of `ROWS` for one length spec; `mode` is the config's rollout.mode."""

    lengths: str
    mode: str
    rows: int
    slots: int
    check_every: int
    cap: int
    mean_length: float  # E[min(L, N)]
    modes: tuple[SampleMode, ...]

    def get(self, name: str) -> SampleMode:
        return next(m for m in self.modes if m.name == name)


def step_at(mid, first, filled: float) -> tuple[float, float, float]:
    """(FLOPs, HBM bytes, collective bytes) of one decode step at `filled`, affine between two
    compiled steps (`steps.DecodeStep`, at their `index`; `first` None or at the same index: `mid`'s)."""
    def figures(d):
        return np.array([d.flops, d.hbm_bytes, sum(d.collectives.values())])
    if first is None or first.index == mid.index:
        return tuple(float(x) for x in figures(mid))
    slope = (figures(mid) - figures(first)) / (mid.index - first.index)
    return tuple(float(x) for x in figures(first) + (filled - first.index) * slope)


def sample_modes(f: np.ndarray, *, rows: int, slots: int, prompt: int, check_every: int, devices: int,
                 program: tuple[float, float, float] | None, mid, first, prefill: Part,
                 decode: Callable[[float, float], Part]) -> tuple[SampleMode, ...]:
    """Each row of `ROWS` (module docstring); program: the phase's compiled (FLOPs, HBM bytes,
    collective bytes), mid / first: its compiled steps (None: no estimate), decode(steps, filled):
    the bound's decode-step part."""
    tokens = rows * length_stats.expected_length(f) / devices
    out = []
    for name, schedule in ROWS.items():
        s = schedule(f, rows=rows, slots=slots, prompt=prompt, check_every=check_every)
        totals = None
        if program is not None and mid is not None:
            step = step_at(mid, first, s.filled)
            totals = tuple(p + (s.steps - 1) * x for p, x in zip(program, step))
        out.append(SampleMode(name, s.steps, s.filled, tokens, totals,
                              Bound((prefill, decode(s.steps, s.filled)), decode_tokens=tokens)))
    return tuple(out)


def plan_sampling(config, lengths: length_stats.Lengths, cache, params, cfg, devices: int, sample, mid, first
                  ) -> Sampling:
    """`Sampling` of `config`'s sample phase: cache, params its abstract KV cache and student
    parameters (inference layout), cfg the student's model config, sample its `PhaseFigures`
    (None or failed: no estimate), mid / first its compiled decode steps (`steps.sample_steps`)."""
    r = config.rollout
    mode = check_mode(r.mode)
    check_every = r.check_every
    rows, prompt, cap = r.prompts_per_step * r.num_samples, config.data.prompt_length, r.max_new_tokens
    weights = computed_bytes(params)
    slot_bytes = per_device_bytes((cache.keys, cache.values)) / cache.max_len
    program = None if sample is None or sample.error is not None else (
        sample.flops, sample.hbm_bytes, sum(sample.collectives.values()))
    f = length_stats.cdf(lengths, cap)
    modes = sample_modes(
        f, rows=rows, slots=rows, prompt=prompt, check_every=check_every, devices=devices, program=program,
        mid=mid, first=first, prefill=prefill_part(cfg, rows=rows, prompt=prompt, devices=devices, weight_bytes=weights),
        decode=lambda steps, filled: decode_part(cfg, rows=rows, filled=filled, steps=steps, devices=devices,
                                                 weight_bytes=weights, slot_bytes=slot_bytes))
    return Sampling(lengths.spec, mode, rows, rows, check_every, cap, length_stats.expected_length(f), modes)


__all__ = ["MODES", "ROWS", "SampleMode", "Sampling", "Schedule", "check_mode", "continuous_schedule",
           "plan_sampling", "produced_schedule", "sample_modes", "static_schedule", "step_at"]
