"""How long rollouts are: a length distribution from a one-word spec, and the expectations the
plan's rollout modes read from it (`plan.modes`).

    lengths = parse_lengths("lognormal:3276.8,0.8")
    f = cdf(lengths, cap=8192)           # f[t] = P(min(L, cap) <= t), t = 0 .. cap
    expected_length(f)                   # E[min(L, cap)]
    expected_max(f, draws=128)           # E[max of 128 independent lengths]

A length L is the number of tokens a rollout generates (>= 1, its EOS included); the decode loop
stops a row at the cap N = rollout.max_new_tokens, so every expectation is of min(L, N). The specs
(`--lengths SPEC` of the plan, the `lengths` argument of `measure.plan_step`), one table `FORMS`:

| SPEC | L |
| --- | --- |
| `max` | N: every rollout runs to the cap (the plan before this option) |
| `lognormal:MEAN,SIGMA` | min(N, max(1, ceil(X))), ln X ~ Normal(mu, SIGMA^2), mu = ln MEAN - SIGMA^2 / 2: MEAN is E[X] in tokens, before capping and rounding up; SIGMA the standard deviation of ln X (the coefficient of variation of X is sqrt(exp(SIGMA^2) - 1)) |
| `PATH.json` | measured: `{"lengths": [l_1, ...], "counts": [c_1, ...]}`, each l_i a whole number of tokens >= 1 and c_i >= 0 its count (any scale, sum > 0): P(L = l_i) = c_i / sum_j c_j; a length above the cap counts as the cap |

Expectations, from the CDF F(t) = P(min(L, N) <= t) (F(0) = 0, F(N) = 1):

    E[min(L, N)]        = sum_{t=0}^{N-1} (1 - F(t))
    E[min(L, N)^2]      = sum_{t=1}^{N} t^2 (F(t) - F(t-1))
    E[max_{i<=B} L_i]   = sum_{t=0}^{N-1} (1 - F(t)^B)        (B independent lengths, each capped)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A parsed length spec (module docstring): its form, its parameters and the spec as given."""

    spec: str
    form: str  # a key of FORMS
    mean: float = 0.0  # lognormal: E[X] in tokens
    sigma: float = 0.0  # lognormal: std of ln X
    values: tuple[int, ...] = ()  # histogram: lengths in tokens
    counts: tuple[float, ...] = ()  # histogram: their counts


def _max_cdf(lengths: Lengths, cap: int) -> np.ndarray:
    f = np.zeros(cap + 1)
    f[cap] = 1.0
    return f


def _lognormal_cdf(lengths: Lengths, cap: int) -> np.ndarray:
    mu = math.log(lengths.mean) - lengths.sigma ** 2 / 2
    f = np.array([0.0] + [0.5 * math.erfc(-(math.log(t) - mu) / (lengths.sigma * math.sqrt(2)))
                          for t in range(1, cap + 1)])
    f[cap] = 1.0  # P(ceil X <= t) = P(X <= t) below the cap; the cap takes the rest
    return f


def _histogram_cdf(lengths: Lengths, cap: int) -> np.ndarray:
    pmf = np.zeros(cap + 1)
    for value, count in zip(lengths.values, lengths.counts):
        pmf[min(value, cap)] += count
    f = np.cumsum(pmf) / pmf.sum()
    f[cap] = 1.0
    return f


# form -> the CDF of min(L, cap) on t = 0 .. cap
FORMS: dict[str, Callable[[Lengths, int], np.ndarray]] = {
    "max": _max_cdf, "lognormal": _lognormal_cdf, "histogram": _histogram_cdf}


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"lengths {spec!r}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"lengths {spec!r}: {what} must be > 0, got {text}")
    return value


def _histogram(spec: str) -> Lengths:
    try:
        with open(spec) as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"lengths {spec!r}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"lengths {spec!r}: not JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict) or not {"lengths", "counts"} <= set(data):
        raise ValueError(f"lengths {spec!r}: expected {{\"lengths\": [...], \"counts\": [...]}}")
    values, counts = data["lengths"], data["counts"]
    if not isinstance(values, list) or not isinstance(counts, list) or len(values) != len(counts) or not values:
        raise ValueError(f"lengths {spec!r}: \"lengths\" and \"counts\" must be non-empty lists of one size")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1), None)
    if bad is not None:
        raise ValueError(f"lengths {spec!r}: a length must be a whole number of tokens >= 1, got {bad!r}")
    bad = next((c for c in counts if isinstance(c, bool) or not isinstance(c, (int, float))
                or not math.isfinite(c) or c < 0), None)
    if bad is not None:
        raise ValueError(f"lengths {spec!r}: a count must be a number >= 0, got {bad!r}")
    if not sum(counts) > 0:
        raise ValueError(f"lengths {spec!r}: the counts sum to 0")
    return Lengths(spec, "histogram", values=tuple(values), counts=tuple(float(c) for c in counts))


def parse_lengths(spec: str) -> Lengths:
    """The `Lengths` of `spec` (module docstring's table); ValueError in one line naming the problem
    (a histogram file is read here, so a bad one is refused before anything is compiled)."""
    if spec == "max":
        return Lengths(spec, "max")
    if spec.startswith("lognormal:"):
        parts = spec[len("lognormal:"):].split(",")
        if len(parts) != 2:
            raise ValueError(f"lengths {spec!r}: expected lognormal:MEAN,SIGMA (two numbers), e.g. lognormal:3276.8,0.8")
        return Lengths(spec, "lognormal", mean=_number(parts[0], "MEAN", spec), sigma=_number(parts[1], "SIGMA", spec))
    if spec.endswith(".json"):
        return _histogram(spec)
    raise ValueError(f"lengths {spec!r}: unknown; use max, lognormal:MEAN,SIGMA or a PATH.json histogram")


def cdf(lengths: Lengths, cap: int) -> np.ndarray:
    """F(t) = P(min(L, cap) <= t) for t = 0 .. cap: float64 [cap + 1], F(0) = 0, F(cap) = 1."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1 tokens, got {cap}")
    return FORMS[lengths.form](lengths, cap)


def expected_length(f: np.ndarray) -> float:
    """E[min(L, N)] = sum_{t<N} (1 - F(t)), F = `cdf(lengths, N)`."""
    return float(np.sum(1.0 - f[:-1]))


def expected_square(f: np.ndarray) -> float:
    """E[min(L, N)^2] = sum_t t^2 P(min(L, N) = t)."""
    t = np.arange(len(f), dtype=np.float64)
    return float(np.sum(t ** 2 * np.diff(f, prepend=0.0)))


def expected_max(f: np.ndarray, draws: int) -> float:
    """E[max of `draws` independent min(L, N)] = sum_{t<N} (1 - F(t)^draws): P(max <= t) = F(t)^draws."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    return float(np.sum(1.0 - f[:-1] ** draws))


__all__ = ["FORMS", "Lengths", "cdf", "expected_length", "expected_max", "expected_square", "parse_lengths"]
