"""The miniature reproduction's pieces: SFT batches, SFT, accuracy, precision/recall, the tables."""

import numpy as np
import pytest

from topd_jax import miniature as M
from topd_jax.data import synthetic as S


def test_sft_batches_put_the_prompt_left_and_train_only_on_the_solution():
    tokens, mask, loss_mask = M.sft_batch(0, 3, 4, S.TEACHER_STYLE)
    tok = S.SyntheticTokenizer()
    assert tokens.shape == (4, S.PROMPT_LENGTH + M.MAX_COMPLETION)
    for row, m, lm in zip(tokens, mask, loss_mask):
        assert m[S.PROMPT_LENGTH - 1] and not lm[:S.PROMPT_LENGTH].any()
        prompt = tok.decode(row[:S.PROMPT_LENGTH][m[:S.PROMPT_LENGTH]])
        solution = tok.decode(row[lm], stop_at_eos=False)
        assert prompt.startswith("find") and solution.endswith("<eos>")
        problem_digits = [int(w) for w in prompt.split()[1:-4:2]]
        ops = prompt.split()[2:-4:2]
        assert S.is_correct(S.Problem(tuple(problem_digits), tuple(ops)), solution)
    assert np.array_equal(M.sft_batch(0, 3, 4, S.TEACHER_STYLE)[0], tokens)


def test_sft_lowers_the_solution_loss():
    losses = []
    config = M.SftConfig(M.STUDENT, S.STUDENT_STYLE, steps=25, batch_size=16, learning_rate=4e-3)
    M.sft(config, progress=lambda i, loss: losses.append(loss))
    assert len(losses) == 25 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_accuracy_is_the_share_of_completions_ending_in_the_right_answer(monkeypatch):
    problems = [S.Problem((7, 4), ("+",)), S.Problem((2, 3), ("*",)), S.Problem((9, 9), ("-",))]
    tok = S.SyntheticTokenizer()
    texts = ["7 + 4 = 1 ; answer 1", "2 * 3 = 5 ; answer 5", "9 - 9 makes 0 ; result 0"]
    ids = np.array([tok.encode(t) + [S.EOS_ID] * (12 - len(tok.encode(t))) for t in texts])
    monkeypatch.setattr(M, "completions", lambda model, ps: ids)
    assert M.accuracy(None, problems) == pytest.approx(2 / 3)


def test_precision_and_recall_against_fork_labels():
    predicted = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 1, 0, 1], bool)
    assert M.precision_recall(predicted, truth) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    p, r = M.precision_recall(np.zeros(3, bool), np.zeros(3, bool))
    assert np.isnan(p) and np.isnan(r)


def test_the_summary_tables_report_mean_std_and_the_step_time_ratio():
    runs = {f"{m}/{s}": {"method": m, "seed": s, "final_accuracy": acc, "step_time": t, "low_divergence_share": low}
            for m, t, low, accs in (("opd", 0.02, None, (0.2, 0.4)), ("topd", 0.03, 0.3, (0.5, 0.7)))
            for s, acc in enumerate(accs)}
    locators = {"candidates": 100.0, "fork_share": 0.5, "ot_precision": 0.8, "ot_recall": 0.6,
                "ot_low_divergence_share": 0.3, "window_kl_precision": 0.7, "window_kl_recall": 0.4,
                "window_kl_low_divergence_share": 0.5}
    text = M.summary({"teacher_accuracy": 1.0, "student_accuracy": 0.2, "eval_problems": 8, "steps": 10,
                      "seeds": [0, 1], "runs": runs, "locators": locators})
    assert "| opd | 30.0% +- 10.0% | - | 20 ms | 1.00x |" in text
    assert "| topd | 60.0% +- 10.0% | 30.0% | 30 ms | 1.50x |" in text
    assert "| OT (branch + Sinkhorn) | 80.0% | 60.0% | 30.0% |" in text
