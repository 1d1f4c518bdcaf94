"""The statistics every comparison of the experiments reports: one paired interval, the area under
an accuracy curve, and how well a locator's verdicts match the fork labels.

    paired_interval(x - y)        mean difference and its 95% Student-t interval (pairs: seeds, or
                                  problems of one run)
    curve_area(curve)             the normalised area under an accuracy curve (mean accuracy over
                                  the budget, trapezoids)
    precision_recall, roc_auc     a locator's verdicts and scores against the fork labels
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its 95% Student-t interval,

        mean +- t_{0.975, n-1} s / sqrt(n)

    (NaN bounds with fewer than two pairs). The one interval of the experiments: pairs are seeds
    (the protocol) or problems of one seed (the demo)."""
    x = np.asarray(differences, np.float64)
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def curve_area(curve: Sequence[tuple[float, float]], until: float | None = None) -> float:
    """The normalised area under an accuracy curve [(step, accuracy), ...] from its first step to
    `until` (default: its last): sum of trapezoids / (until - first), i.e. the mean accuracy over
    the budget. Steps past `until` are ignored; NaN for a curve of one point."""
    steps, acc = (np.asarray(v, np.float64) for v in zip(*curve))
    end = steps[-1] if until is None else float(until)
    keep = steps <= end
    steps, acc = steps[keep], acc[keep]
    if steps.size < 2 or steps[-1] <= steps[0]:
        return float("nan")
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def accuracy_at(curve: Sequence[tuple[float, float]], step: float) -> float:
    """The accuracy of a curve at `step` (NaN if it was not evaluated there)."""
    return next((float(a) for s, a in curve if s == step), float("nan"))


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


def share(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


__all__ = ["accuracy_at", "curve_area", "paired_interval", "precision_recall", "roc_auc", "share"]
