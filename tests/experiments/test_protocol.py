"""The miniature reproduction's pieces: SFT batches, SFT, accuracy, locator scores, the protocol, the tables."""

import json

import numpy as np
import pytest

from topd_jax import miniature as M
from topd_jax.losses.locators import LOCATORS
from topd_jax.data import synthetic as S


def test_sft_batches_put_the_prompt_left_and_train_only_on_the_solution():
    tokens, mask, loss_mask = M.sft_batch(0, 3, 16, S.TEACHER_STYLE)
    tok = S.SyntheticTokenizer()
    assert tokens.shape == (16, S.PROMPT_LENGTH + M.MAX_COMPLETION)
    wait = S.VOCAB.index("wait")
    for row, m, lm in zip(tokens, mask, loss_mask):
        assert m[S.PROMPT_LENGTH - 1] and not lm[:S.PROMPT_LENGTH].any()
        prompt = tok.decode(row[:S.PROMPT_LENGTH][m[:S.PROMPT_LENGTH]])
        answer = row[S.PROMPT_LENGTH:][m[S.PROMPT_LENGTH:]]
        solution = tok.decode(answer, stop_at_eos=False)
        # Trained on: every solution token but a slipped value (the one before "wait").
        slipped = np.r_[answer[1:] == wait, False]
        assert np.array_equal(lm[S.PROMPT_LENGTH:][m[S.PROMPT_LENGTH:]], ~slipped)
        assert prompt.startswith("find") and solution.endswith("<eos>")
        problem_digits = [int(w) for w in prompt.split()[1:-4:2]]
        ops = prompt.split()[2:-4:2]
        assert S.is_correct(S.Problem(tuple(problem_digits), tuple(ops)), solution)
    assert np.array_equal(M.sft_batch(0, 3, 16, S.TEACHER_STYLE)[0], tokens) and (~loss_mask & mask).any()


def test_sft_lowers_the_solution_loss():
    losses = []
    config = M.SftConfig(M.STUDENT, S.STUDENT_STYLE, steps=25, batch_size=16, learning_rate=4e-3)
    M.sft(config, progress=lambda i, loss: losses.append(loss))
    assert len(losses) == 25 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_accuracy_is_the_share_of_completions_ending_in_the_right_answer(monkeypatch):
    problems = [S.Problem((7, 4), ("+",)), S.Problem((2, 3), ("*",)), S.Problem((9, 9), ("-",)),
                S.Problem((7, 4), ("+",))]
    tok = S.SyntheticTokenizer()
    texts = ["7 + 4 = 1 ; answer 1", "2 * 3 = 5 ; answer 5", "9 - 9 makes 0 ; result 0", "7 + 4 = 1 ; answer 1"]
    ids = np.array([tok.encode(t) + [S.EOS_ID] * (12 - len(tok.encode(t))) for t in texts])
    ids[3, 5] = S.PAD_ID  # a sampled <pad> inside the completion: wrong, not dropped
    monkeypatch.setattr(M, "completions", lambda model, ps: ids)
    assert M.correctness(None, problems).tolist() == [True, False, True, False]
    assert M.accuracy(None, problems) == pytest.approx(2 / 4)
    assert M.malformed(None, problems) == pytest.approx(1 / 4)


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


def _run(method, seed, score, lr=1e-3, low=None):
    return {"method": method, "seed": seed, "score": score, "step_time": 0.02 if method == "opd" else 0.03,
            "learning_rate": lr, "low_divergence_share": low, "accuracy": [(0, 0.1), (10, score)]}


def test_the_summary_reports_shares_locators_the_sweep_and_paired_differences():
    runs = {f"{m}/{s}": _run(m, s, acc, low=low) for m, low, accs in (("opd", None, (0.2, 0.4, 0.3)),
                                                                     ("topd", 0.3, (0.5, 0.6, 0.4)))
            for s, acc in enumerate(accs)}
    locators = {"candidates": 100.0, "cosmetic_share": 0.3, "fork_share": 0.6, "unlabelled_share": 0.1}
    for name in LOCATORS:
        locators.update({f"{name}_precision": 0.8, f"{name}_recall": 0.6, f"{name}_auc": 0.7,
                         f"{name}_low_divergence_share": 0.3})
    results = {"task_version": 2, "complete": True, "teacher_accuracy": 1.0, "teacher_malformed": 0.0,
               "student_accuracy": 0.2, "student_malformed": 0.01, "eval_problems": 8, "dev_problems": 4, "steps": 10,
               "seeds": [0, 1, 2], "dev_seed": 100, "learning_rates": [3e-4, 1e-3],
               "sweep": {"opd": {"0.0003": {"score": 0.25}, "0.001": {"score": 0.35}}},
               "chosen_learning_rate": {"opd": 1e-3}, "runs": runs, "locators": locators}
    text = M.summary(results)
    assert "30.0% surface forms (cosmetic), 60.0% forks, 10.0% undecidable" in text
    assert "| ot_coupled | 80.0% | 60.0% | 0.700 | 30.0% |" in text and "| oracle |" in text
    assert "| opd | 25.0 | 35.0 | 0.001 |" in text
    assert "| opd | 0.001 | 30.0 +- 10.0 | 20.0, 40.0, 30.0 | - | - | 20 ms (1.00x) |" in text
    # topd - opd per seed: +0.3, +0.2, +0.1 -> mean +20.0, t-interval +-24.8 points
    assert "| topd | 0.001 | 50.0 +- 10.0 | 50.0, 60.0, 40.0 | +20.0 [-4.8, +44.8] | 30.0% | 30 ms (1.50x) |" in text
    assert "PARTIAL" not in text and "PARTIAL" in M.summary({**results, "complete": False})


def test_bad_arguments_are_one_line_errors(tmp_path):
    for argv in (["--seeds", "0,x"], ["--methods", "opd,nope"], ["--dev-seed", "1", "--seeds", "0,1"],
                 ["--learning-rates", "0"], ["--steps", "0"], ["--evals", "1"]):
        with pytest.raises(SystemExit):
            M.main([*argv, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="development seed 0 must not be a test seed"):
        M.reproduce(str(tmp_path), seeds=[0], dev_seed=0)


def test_the_protocol_chooses_each_rate_on_the_dev_seed_then_runs_every_test_seed_at_it(tmp_path, monkeypatch):
    """The protocol's bookkeeping with the runs faked (the real runs are the demo's test): the
    sweep sees only the dev seed and dev problems, each method's best rate is used for every
    test seed on the test problems, and results.json is rewritten as runs finish."""
    calls = []
    best = {"opd": 3e-4, "oracle": 3e-3}

    def fake_run(student_dir, teacher_dir, method, seed, lr, steps, problems, out_dir, evals):
        calls.append((method, seed, lr, len(problems)))
        score = 0.5 - abs(np.log(lr / best[method])) / 10 + 0.01 * seed
        return {"method": method, "seed": seed, "learning_rate": lr, "accuracy": [(0, 0.1), (steps, score)],
                "score": score, "step_time": 0.01, "skipped_steps": 0.0, "low_divergence_share": None}

    monkeypatch.setattr(M, "cached_sft", lambda config, cache, name: name)
    monkeypatch.setattr(M, "load", lambda path: path)
    monkeypatch.setattr(M, "accuracy", lambda model, problems: 0.5)
    monkeypatch.setattr(M, "malformed", lambda model, problems: 0.0)
    monkeypatch.setattr(M, "distil_config", lambda *a, **k: type("C", (), {"loss": None})())
    monkeypatch.setattr(M, "_run", fake_run)
    results = M.reproduce(str(tmp_path), seeds=[0, 1, 2], dev_seed=7, learning_rates=[3e-4, 1e-3, 3e-3], steps=5,
                          methods=["opd", "oracle"], eval_count=12, dev_eval_count=6, locator_batches=0)
    sweep_calls = calls[:6]
    assert all(seed == 7 and n == 6 for _, seed, _, n in sweep_calls)
    assert results["chosen_learning_rate"] == best
    assert sorted(calls[6:]) == sorted((m, s, best[m], 12) for m in best for s in (0, 1, 2))
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True
    rows = M.comparisons(results)
    assert rows["opd"]["vs_opd"] is None and rows["oracle"]["vs_opd"][0] == pytest.approx(0.0)
    assert "| oracle | 0.003 |" in M.summary(results)
