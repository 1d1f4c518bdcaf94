"""The synthetic task: correct solutions in every surface form, exact fork labels, a pure stream."""

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


def test_text_that_leaves_the_format_is_unlabelled_from_there_on():
    p = S.Problem((7, 4), ("+",))
    labels, answer = labelled(p, "7 + 4 = 1 ; find ; answer 1")
    assert answer is None
    assert (labels[:6] >= 0).all() and (labels[6:] == -1).all()  # labelled up to the last ";"
    assert not S.is_correct(p, "7 + 4 = 1")  # no answer phrase


def test_fork_labels_of_token_ids_stop_at_padding():
    p = S.Problem((7, 4), ("+",))
    ids = TOK.encode(S.solution(p, np.random.default_rng(1))) + [S.EOS_ID, S.PAD_ID, S.PAD_ID]
    labels = S.fork_labels(p, ids)
    assert labels[-3] == 0 and (labels[-2:] == -1).all()


def test_the_problem_stream_is_a_pure_function_of_seed_and_index():
    assert S.problems(3, 5, 8) == S.problems(3, 5, 8)
    assert S.problems(3, 5, 8) != S.problems(3, 6, 8) != S.problems(4, 5, 8)
    a, b = S.sft_examples(0, 0, 4), S.sft_examples(0, 0, 4)
    assert a == b and all(c[-1] == S.EOS_ID for _, c in a)


def test_the_styles_differ_where_the_student_is_confident():
    rng = np.random.default_rng(2)
    p = S.Problem((7, 4, 6, 2), ("+", "-", "+"))
    student = [S.solution(p, rng, S.STUDENT_STYLE) for _ in range(200)]
    teacher = [S.solution(p, rng, S.TEACHER_STYLE) for _ in range(200)]
    share = lambda texts, word: np.mean([word in t.split() for t in texts])  # noqa: E731
    assert share(student, "next") > 0.8 > share(teacher, "next") > 0.2


def test_the_tokenizer_round_trips_and_refuses_unknown_words():
    text = "find 7 + 4 mod 10 ?"
    assert TOK.decode(TOK.encode(text)) == "find 7 + 4 mod 1 0 ?"
    assert TOK.decode(TOK.encode("answer 5") + [S.EOS_ID, 7]) == "answer 5"
    with pytest.raises(ValueError, match="not in the synthetic vocabulary"):
        TOK.encode("find x")
    with pytest.raises(ValueError, match="min_steps"):
        S.sample_problem(np.random.default_rng(0), min_steps=3, max_steps=2)
