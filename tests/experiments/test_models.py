"""The miniature's models: SFT batches, SFT, greedy accuracy."""

import numpy as np
import pytest

from topd_jax.data import synthetic as S
from topd_jax.experiments import models as M


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
