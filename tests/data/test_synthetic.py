"""The synthetic task (version 2): correct solutions in every surface form, corrected slips, exact fork
labels (wrong operators and words included), <pad> graded wrong, a pure stream."""

import numpy as np
import pytest

from topd_jax.data import synthetic as S

TOK = S.SyntheticTokenizer()


def labelled(problem, text):
    return S.parse(problem, TOK.tokenize(text))


def test_every_sampled_solution_is_correct_in_both_styles():
    rng = np.random.default_rng(0)
    for style in (S.TEACHER_STYLE, S.STUDENT_STYLE):
        for _ in range(300):
            p = S.sample_problem(rng, min_steps=1, max_steps=4)
            text = S.solution(p, rng, style)
            assert S.is_correct(p, text), (p, text)
            labels, answer = labelled(p, text)
            assert answer == p.answer and (labels >= 0).all()
            assert len(TOK.encode(p.prompt())) <= S.PROMPT_LENGTH


def test_the_answer_is_the_left_to_right_value_mod_10():
    p = S.Problem((7, 4, 6), ("+", "-"))
    assert p.prompt() == "find 7 + 4 - 6 mod 10 ?" and p.partials == (1, 5) and p.answer == 5
    assert S.Problem((3, 4, 9), ("*", "-")).answer == (12 - 9) % 10
    assert S.Problem((2, 5), ("-",)).answer == 7  # 2 - 5 = -3 = 7 mod 10


def test_fork_labels_mark_values_and_operators_not_surface_forms():
    p = S.Problem((7, 4, 6), ("+", "-"))
    text = "4 + 7 gives 1 ; then , 1 - 6 = 5 ; answer is 5"
    labels, answer = labelled(p, text)
    words = text.split()
    expected = {"4": 0, "+": 1, "7": 1, "gives": 0}  # swapped first operand of + is a surface form
    assert [int(x) for x in labels[:4]] == [expected[w] for w in words[:4]]
    assert labels[4] == 1  # the value 1
    assert [int(x) for x in labels[5:8]] == [0, 0, 0]  # ; then ,
    assert [int(x) for x in labels[8:13]] == [1, 1, 1, 0, 1]  # 1 - 6 = 5: "-" is not commutative
    assert [int(x) for x in labels[13:]] == [0, 0, 0, 1]  # ; answer is 5
    assert answer == 5


def test_a_miscalculation_is_followed_and_decides_the_answer():
    p = S.Problem((7, 4, 6), ("+", "-"))
    wrong = "7 + 4 = 2 ; so 2 - 6 = 6 ; result 6"
    labels, answer = labelled(p, wrong)
    assert answer == 6 and not S.is_correct(p, wrong)
    assert (labels >= 0).all()
    assert labels[4] == 1  # the wrong value is a fork: changing it back makes the answer right


def test_the_first_token_off_the_format_is_a_fork_and_the_rest_is_undecidable():
    p = S.Problem((7, 4), ("+",))
    labels, answer = labelled(p, "7 + 4 = 1 ; find ; answer 1")
    assert answer is None
    assert (labels[:6] >= 0).all() and labels[6] == 1 and (labels[7:] == -1).all()
    assert not S.is_correct(p, "7 + 4 = 1")  # no answer phrase
    # A wrong equality word (here a digit where "=" belongs) is the fork, not an unlabelled token.
    labels, answer = labelled(p, "7 + 4 ; answer 1")
    assert answer is None and labels.tolist() == [0, 1, 1, 1, -1, -1]


def test_a_wrong_operator_is_a_fork_and_followed_as_written():
    p = S.Problem((7, 4, 6), ("+", "-"))
    text = "7 * 4 = 8 ; so 8 - 6 = 2 ; result 2"
    labels, answer = labelled(p, text)
    assert answer == 2 and not S.is_correct(p, text)
    assert labels[1] == 1 and (labels >= 0).all()


def test_a_corrected_slip_is_followed_and_its_tokens_are_forks():
    p = S.Problem((7, 4, 6), ("+", "-"))
    text = "7 + 4 = 2 wait 1 ; so 1 - 6 = 5 ; answer 5"
    labels, answer = labelled(p, text)
    assert answer == 5 and S.is_correct(p, text)
    assert labels[4:7].tolist() == [1, 1, 1] and (labels >= 0).all()
    assert not S.is_correct(p, "7 + 4 = 1 wait 2 ; so 2 - 6 = 6 ; answer 6")


def test_a_sampled_pad_inside_a_completion_is_graded_wrong():
    p = S.Problem((7, 4), ("+",))
    ids = TOK.encode("7 + 4 = 1 ; answer 1")
    assert S.is_correct_ids(p, ids + [S.EOS_ID, S.PAD_ID])
    with_pad = ids[:5] + [S.PAD_ID] + ids[5:] + [S.EOS_ID]
    assert not S.is_correct_ids(p, with_pad)
    assert TOK.decode(with_pad) == "7 + 4 = 1 <pad> ; answer 1" and not S.is_correct(p, TOK.decode(with_pad))
    assert S.fork_labels(p, with_pad)[5] == 1


def test_candidate_labels_read_the_problem_from_the_prompt():
    p = S.Problem((7, 4, 6), ("+", "-"))
    prompt = [S.PAD_ID] * 3 + TOK.encode(p.prompt())
    assert S.problem_of_prompt(prompt) == p
    completion = TOK.encode("7 + 4 gives 1 ; then 1 - 6 = 5 ; answer 5") + [S.EOS_ID]
    labels = S.candidate_labels(np.array([prompt]), np.array([completion]), np.array([[3, 4, 99]]))
    assert labels.tolist() == [[0, 1, -1]]
    with pytest.raises(ValueError, match="not a synthetic prompt"):
        S.problem_of_prompt(TOK.encode("7 + 4 = 1"))


def test_supervised_weights_skip_exactly_the_slipped_values():
    wait = S.VOCAB.index("wait")
    examples = S.sft_examples(0, 0, 64, S.TEACHER_STYLE)
    assert any(wait in ids for _, ids, _ in examples)
    for _, ids, weights in examples:
        zero = [i for i, w in enumerate(weights) if w == 0]
        assert zero == [i for i in range(len(ids) - 1) if ids[i + 1] == wait]
    assert all(wait not in ids for _, ids, _ in S.sft_examples(0, 0, 64, S.STUDENT_STYLE))


def test_fork_labels_of_token_ids_stop_at_padding():
    p = S.Problem((7, 4), ("+",))
    ids = TOK.encode(S.solution(p, np.random.default_rng(1))) + [S.EOS_ID, S.PAD_ID, S.PAD_ID]
    labels = S.fork_labels(p, ids)
    assert labels[-3] == 0 and (labels[-2:] == -1).all()


def test_the_problem_stream_is_a_pure_function_of_seed_and_index():
    assert S.problems(3, 5, 8) == S.problems(3, 5, 8)
    assert S.problems(3, 5, 8) != S.problems(3, 6, 8) != S.problems(4, 5, 8)
    a, b = S.sft_examples(0, 0, 4), S.sft_examples(0, 0, 4)
    assert a == b and all(c[-1] == S.EOS_ID for _, c, _ in a)


def test_the_styles_prefer_different_forms_and_every_form_is_seen_by_both():
    for field in ("equals", "connectives", "answer"):
        t, s = getattr(S.TEACHER_STYLE, field), getattr(S.STUDENT_STYLE, field)
        assert min(t) >= 0.13 and min(s) >= 0.13 and max(t) >= 0.6 and max(s) >= 0.6
        assert int(np.argmax(t)) != int(np.argmax(s))
    for field in ("comma", "swap"):
        t, s = getattr(S.TEACHER_STYLE, field), getattr(S.STUDENT_STYLE, field)
        assert 0.1 <= min(t, s) and max(t, s) <= 0.9 and abs(t - s) >= 0.39
    rng = np.random.default_rng(2)
    p = S.Problem((7, 4, 6, 2), ("+", "-", "+"))
    student = [S.solution(p, rng, S.STUDENT_STYLE) for _ in range(400)]
    teacher = [S.solution(p, rng, S.TEACHER_STYLE) for _ in range(400)]
    count = lambda texts, word: np.mean([t.split().count(word) for t in texts]) / 2  # noqa: E731  (2 connectives)
    assert 0.5 < count(student, "next") < 0.7 and 0.05 < count(teacher, "next") < 0.25  # 0.6 vs 0.13


def test_the_tokenizer_round_trips_and_refuses_unknown_words():
    text = "find 7 + 4 mod 10 ?"
    assert TOK.decode(TOK.encode(text)) == "find 7 + 4 mod 1 0 ?"
    assert TOK.decode(TOK.encode("answer 5") + [S.EOS_ID, 7]) == "answer 5"
    with pytest.raises(ValueError, match="not in the synthetic vocabulary"):
        TOK.encode("find x")
    with pytest.raises(ValueError, match="min_steps"):
        S.sample_problem(np.random.default_rng(0), min_steps=3, max_steps=2)


def words(text):
    return S.SyntheticTokenizer().tokenize(text)


def test_a_token_that_declines_a_repair_is_a_fork():
    p = S.Problem((7, 4, 6), ("+", "-"))  # partials 1, 5
    # After the uncorrected wrong value 2, `;` declines the `wait 1` that would repair it: a fork.
    declined = words("7 + 4 = 2 ; then , 2 - 6 = 6 ; answer 6")
    labels, answer = S.parse(p, declined)
    assert declined[5] == ";" and labels[5] == 1 and answer == 6
    assert declined[13] == ";" and labels[13] == 1  # 6 is not the running value 5 either
    assert labels[6] == 0  # the connective after it is still a surface form
    # An accepted repair: `wait` and its value are forks, the `;` after the repaired value is not.
    accepted = words("7 + 4 = 2 wait 1 ; then , 1 - 6 = 5 ; answer 5")
    labels, answer = S.parse(p, accepted)
    assert labels[5] == 1 and labels[6] == 1 and labels[7] == 0 and answer == 5
    # A right value: the `;` after it declines nothing (a surface choice); a "repair" of a right
    # value (wait + a wrong one) is a fork, and the `;` after the now-wrong value declines again.
    right = words("7 + 4 = 1 ; then , 1 - 6 = 5 ; answer 5")
    assert S.parse(p, right)[0][5] == 0
    broken = words("7 + 4 = 1 wait 2 ; then , 2 - 6 = 6 ; answer 6")
    labels, _ = S.parse(p, broken)
    assert labels[5] == 1 and labels[7] == 0 and labels[15] == 1


def test_walk_marks_local_errors_given_the_chain_as_written():
    p = S.Problem((7, 4, 6), ("+", "-"))

    def errors(text):
        tokens = words(text)
        return [f"{w}@{i}" for i, (w, e) in enumerate(zip(tokens, S.walk(p, tokens)[2])) if e]

    assert errors("4 + 7 = 1 ; then , 1 - 6 = 5 ; answer is 5") == []  # either order of a + b
    assert errors("7 + 4 = 2 ; then , 2 - 6 = 6 ; answer 6") == ["2@4"]  # then followed as written
    assert errors("7 + 4 = 2 wait 1 ; then , 1 - 4 = 7 ; answer 5") == ["4@12", "5@17"]  # copy, answer
    assert errors("7 + 4 = 1 ; 1 * 6 = 6 ; answer 6") == ["*@7"]  # the problem's operator is -
    assert errors("7 + 7 = 4") == ["7@2"]



def test_fork_labels_read_an_id_outside_the_tasks_vocabulary_as_leaving_the_format():
    # A model with a larger vocabulary (a random one) may sample such ids; the oracle's labeller
    # runs inside a host callback, where an exception would stall every device.
    problem = S.problems(0, 0, 1)[0]
    ids = S.SyntheticTokenizer().encode(S.solution(problem, np.random.default_rng(0)))[:3] + [len(S.VOCAB) + 5]
    labels = S.fork_labels(problem, ids)
    np.testing.assert_array_equal(labels, S.fork_labels(problem, ids[:3] + [S.PAD_ID]))
