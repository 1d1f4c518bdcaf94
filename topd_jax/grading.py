"""Answer extraction, math-verify grading, and the avg@k / pass@k metrics (TOPD.md, section 7).

    grade(completion, "\\frac{1}{2}")   # last \\boxed{...} of the completion == the reference?
    avg_at_k(correct), pass_at_k(correct), pass_at_k(correct, k=1)   # correct: [P, n] bool

Grading: the answer is the content of the last \\boxed{...} (or \\fbox{...}) of the completion;
no box is wrong. The extracted answer and the reference are each wrapped as \\boxed{...} and
parsed by math-verify (`parse`), then compared with `verify(gold, prediction)` (symbolic and
numeric equality, intervals, tuples, sets, units and \\text stripped, 10\\% == 10). An answer
that equals the reference after a light string normalisation (`normalize`) is correct without
math-verify; that is also the only test when math-verify parses nothing from either side
(free-text answers such as "\\text{Evelyn}"). Grading never raises: any error grades False.

math-verify bounds each parse and comparison with signal.alarm, which only works in the main
thread; in other threads `grade` runs it without a time limit (it cannot be interrupted there).
Importing this module sets the "math_verify" logger to ERROR: its per-item timeout warnings would
flood an evaluation log, and a timed-out item simply grades False.
"""

from __future__ import annotations

import logging
import math
import re
import threading

import numpy as np

TIMEOUT_SECONDS = 5
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")

# math-verify logs a warning whenever a timeout is disabled or hit; the caller's report says enough.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == "{", None if it never closes.
    Escaped braces \\{ and \\} do not count."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} in `text` (nested braces kept whole),
    or the token after a brace-less "\\boxed 5"; None when there is no box or the last one never
    closes (a truncated completion)."""
    if not isinstance(text, str):
        return None
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    rest = matches[-1].end()
    after = text[rest:]
    stripped = after.lstrip()
    if stripped.startswith("{"):
        content = _braced(text, rest + len(after) - len(stripped))
        return None if content is None else content.strip()
    token = re.match(r"\s+([^\s$]+)", after)
    return token.group(1) if token else None


def normalize(answer: str) -> str:
    """Light canonical form for exact comparison: no spaces, $, \\left/\\right, \\! or \\,;
    \\dfrac/\\tfrac -> \\frac; \\text{x} -> x; no trailing period; lower case."""
    s = answer.strip().rstrip(".").strip().strip("$")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s.lower()


def _math_verify_equal(prediction: str, reference: str) -> bool | None:
    """verify(parse(\\boxed{reference}), parse(\\boxed{prediction})); None when a side parses to nothing."""
    from math_verify import parse, verify  # heavy import (sympy), only when grading

    limit = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=limit)
    pred = parse(f"\\boxed{{{prediction}}}", parsing_timeout=limit)
    if not gold or not pred:
        return None
    return bool(verify(gold, pred, timeout_seconds=limit))


def answers_match(prediction: str, reference: str) -> bool:
    """Is the extracted answer `prediction` equal to `reference` (module docstring)? Never raises."""
    try:
        if normalize(prediction) == normalize(reference):
            return True
        return bool(_math_verify_equal(prediction, reference))
    except Exception:  # noqa: BLE001 - a grader bug or sympy failure grades the sample wrong, never stops an eval
        return False


def grade(prediction_text: str, reference_answer: str) -> bool:
    """True iff the last boxed answer of `prediction_text` matches `reference_answer`; never raises."""
    extracted = last_boxed(prediction_text)
    if extracted is None or not isinstance(reference_answer, str):
        return False
    return answers_match(extracted, reference_answer)


def _matrix(correct) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"correct must be a [num_problems >= 1, num_samples >= 1] matrix, got shape {c.shape}")
    return c.astype(bool)


def avg_at_k(correct) -> float:
    """avg@k = (1 / (P k)) sum_p sum_j c_pj over a [P, k] correctness matrix: the mean accuracy
    of one sample, estimated from k samples per problem."""
    return float(_matrix(correct).mean())


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold
    at least one correct one. Needs 1 <= k <= n and 0 <= c <= n."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k(correct, k: int | None = None) -> float:
    """pass@k over a [P, n] correctness matrix: the mean over problems of pass_at_k_unbiased(n, c_p, k).
    k = n (the default) is the fraction of problems with at least one correct sample among the n."""
    c = _matrix(correct)
    n = c.shape[1]
    k = n if k is None else k
    return float(np.mean([pass_at_k_unbiased(n, int(row.sum()), k) for row in c]))


__all__ = ["answers_match", "avg_at_k", "grade", "last_boxed", "normalize", "pass_at_k", "pass_at_k_unbiased"]
