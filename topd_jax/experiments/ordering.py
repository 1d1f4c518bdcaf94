"""The order a protocol stage runs its tasks in (`protocol.reproduce`): longest first.

    tasks = longest_first(tasks, results["screen"])
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _kind(method: str) -> int:
    """A method's cost class before it ran: relay (rounds of decoding), window or branching
    methods, OPD's (sample, score, update only)."""
    return 2 if "relay" in method else 1 if method.startswith("topd") else 0


def longest_first(tasks, screen: dict[str, dict[str, Any]]) -> list:
    """Tasks (method, seed, lr, split) ordered by expected run time, longest first, so that a stage
    does not end on one long run with the other workers idle: a method's screened step time when
    it has one, else the mean screened step time of its kind (`_kind`), else its kind's rank. The
    order changes no result (each run is a pure function of its task)."""
    by_kind: dict[int, list[float]] = {}
    for method, record in screen.items():
        by_kind.setdefault(_kind(method), []).append(record["step_time"])

    def cost(task):
        method = task[0]
        if method in screen:
            return (1, screen[method]["step_time"])
        if _kind(method) in by_kind:
            return (1, float(np.mean(by_kind[_kind(method)])))
        return (0, _kind(method))

    return sorted(tasks, key=cost, reverse=True)
