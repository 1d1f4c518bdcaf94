"""The experiments' statistics: locator precision / recall / AUC, the paired interval, curve areas."""

import numpy as np
import pytest

from topd_jax.experiments import statistics as M


def test_precision_and_recall_against_fork_labels():
    predicted = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 1, 0, 1], bool)
    assert M.precision_recall(predicted, truth) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    p, r = M.precision_recall(np.zeros(3, bool), np.zeros(3, bool))
    assert np.isnan(p) and np.isnan(r)


def test_roc_auc_is_the_probability_a_fork_outscores_a_surface_form():
    truth = np.array([1, 1, 0, 0], bool)
    assert M.roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), truth) == 1.0
    assert M.roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), truth) == 0.0
    assert M.roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), truth) == 0.5  # ties count 1/2
    assert M.roc_auc(np.array([0.9, 0.1, 0.5, 0.2]), truth) == 0.5
    assert np.isnan(M.roc_auc(np.array([0.1, 0.2]), np.array([1, 1], bool)))


def test_the_paired_interval_is_the_student_t_interval_of_the_differences():
    mean, low, high = M.paired_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and high - mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert mean - low == pytest.approx(high - mean)
    assert np.isnan(M.paired_interval([0.1])[1])


def test_the_curve_area_is_the_mean_accuracy_over_the_budget():
    curve = [(0, 0.5), (25, 0.5), (50, 1.0), (100, 1.0)]
    assert M.curve_area(curve) == pytest.approx((25 * 0.5 + 25 * 0.75 + 50 * 1.0) / 100)
    assert M.curve_area(curve, until=50) == pytest.approx((25 * 0.5 + 25 * 0.75) / 50)
    assert np.isnan(M.curve_area([(0, 0.3)]))
    assert M.accuracy_at(curve, 50) == 1.0 and np.isnan(M.accuracy_at(curve, 60))


def test_the_demo_and_the_protocol_share_one_interval():
    from topd_jax.experiments import demo, rendering

    assert not hasattr(demo, "paired_vs")  # the demo's per-problem pairs go through paired_interval too
    assert rendering.interval((0.02, -0.01, 0.05)) == "+2.0 [-1.0, +5.0]"
