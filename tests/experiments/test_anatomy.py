"""The anatomy's task-side measurements on hand-written completions and windows (the gradient
part runs in `python -m topd_jax.experiments anatomy`, reported in docs/results.md)."""

import types

import numpy as np
import pytest

from topd_jax.data import synthetic as S
from topd_jax.experiments import anatomy


def ids(text, width=20):
    row = S.SyntheticTokenizer().encode(text) + [S.EOS_ID]
    return row + [S.PAD_ID] * (width - len(row))


def test_first_errors_classify_each_wrong_completion_by_its_first_local_error(monkeypatch):
    p = S.Problem((7, 4, 6), ("+", "-"))  # partials 1, 5
    texts = ["7 + 4 = 1 ; then , 1 - 6 = 5 ; answer 5",   # right
             "7 + 4 = 1 ; then , 1 - 4 = 7 ; answer 7",   # copied the wrong operand
             "7 + 4 = 2 ; then , 2 - 6 = 6 ; answer 6",   # arithmetic
             "7 + 4 = 1 ; then , 1 * 6 = 6 ; answer 6",   # operator
             "7 + 4 = 1 ; then , 1 - 6 = 5 ; answer 3",   # answer
             "7 + 4 = 1 ; then , then"]                   # off the format
    monkeypatch.setattr(anatomy.models, "completions", lambda model, problems: np.array([ids(t) for t in texts]))
    shares = anatomy.first_errors(None, [p] * len(texts))
    assert shares == pytest.approx({"flawless": 1 / 6, "operand": 1 / 6, "operator": 1 / 6, "value": 1 / 6,
                                    "answer": 1 / 6, "format": 1 / 6})
    assert "| a | 16.7% |" in anatomy.error_table({"a": shares})


def test_window_faults_split_windows_by_their_prefix():
    p = S.Problem((7, 4, 6), ("+", "-"))
    tok = S.SyntheticTokenizer()
    rollout_text = ["7 + 4 = 1 ; then , 1 - 6 = 5 ; answer 5", "7 + 4 = 2 ; then , 2 - 6 = 6 ; answer 6"]
    tokens = np.array([ids(t) for t in rollout_text])
    # Row 0 branches at t=4 (a clean prefix) with a right window; row 1 at t=9 (after the wrong
    # value 2) with a window that copies a wrong operand.
    windows = [tok.encode("1 ; then , 1"), tok.encode("4 = 8 ; answer")]
    wt = np.zeros((2, 1, 5), np.int32)
    wm = np.zeros((2, 1, 5), bool)
    for b, w in enumerate(windows):
        wt[b, 0, :len(w)], wm[b, 0, :len(w)] = w, True
    rollout = types.SimpleNamespace(tokens=tokens)
    located = types.SimpleNamespace(positions=np.array([[4], [9]]),
                                    teacher_windows=types.SimpleNamespace(tokens=wt, mask=wm))
    out = anatomy.window_faults([p, p], rollout, located, np.array([[True], [True]]))
    assert out["windows_from_broken_prefix"] == 0.5
    assert out["faulty_given_clean"] == 0.0 and out["faulty_given_broken"] == 1.0
    assert out["guided_tokens"] == 10 and 0 < out["guided_surface_share"] < 1
