"""The synthetic reasoning task: seeded multi-step arithmetic with a chain of thought and fork labels.

A problem asks for a left-to-right expression of digits modulo 10, so every value is one digit
and the arithmetic is a table a small model can learn on a CPU in minutes:

    prompt:    find 7 + 4 - 6 mod 1 0 ?
    solution:  7 + 4 = 1 ; then , 1 - 6 = 5 ; answer is 5 <eos>

(every word and digit is one token). Every step has several equivalent surface forms, drawn
independently from a `Style`:
  - operand order of + and * (4 + 7 = 1 is as right as 7 + 4 = 1),
  - the equality word (= | gives | makes), the connective of later steps (then | so | next | now),
    an optional comma after it (spacing), and the answer phrase (answer | answer is | result).
Real reasoning forks exist too: a wrong digit of an intermediate value is carried into every
later step and makes the final answer wrong.

Being synthetic, every completion token can be labelled (`fork_labels`): 1 = a fork, changing the
token changes whether the final answer is right (operator, operands, intermediate and final
digits; a later step reuses the value as written, so the chain is followed as the model wrote
it); 0 = a surface choice with an equally right alternative (connectives, equality words,
spacing, the answer phrase, the first operand of a commutative step when it is either operand,
EOS); -1 = after the completion stops following the format (not labelled).

Two styles: `TEACHER_STYLE` draws every surface form uniformly; `STUDENT_STYLE` strongly prefers
other forms, so after supervised training a student's surface choices are confident where the
teacher is unsure: high-loss tokens whose futures do not diverge (TOPD's low-divergence regime),
beside the real forks where a weak student miscalculates.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

MAX_STEPS = 4
OPS = ("+", "-", "*")
EQUALS = ("=", "gives", "makes")
CONNECTIVES = ("then", "so", "next", "now")
ANSWER_PHRASES = (("answer",), ("answer", "is"), ("result",))
SPECIAL = ("<pad>", "<eos>")
VOCAB = (*SPECIAL, *[str(d) for d in range(10)], *OPS, *EQUALS, *CONNECTIVES, "answer", "is", "result", ";", ",",
         "?", "find", "mod")
PAD_ID, EOS_ID = 0, 1
MODULUS = 10
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
PROMPT_LENGTH = 14  # the longest prompt (4 steps) in tokens


class SyntheticTokenizer:
    """Word-level tokenizer of the task: every word, symbol and digit is one token."""

    vocab = VOCAB
    pad_token_id = PAD_ID
    eos_token_id = EOS_ID

    def __init__(self):
        self._ids = {token: i for i, token in enumerate(VOCAB)}

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def tokenize(self, text: str) -> list[str]:
        """Words split on spaces, numbers split into digits."""
        out = []
        for word in text.split():
            out.extend(list(word) if word.isdigit() else [word])
        return out

    def encode(self, text: str) -> list[int]:
        tokens = self.tokenize(text)
        unknown = [t for t in tokens if t not in self._ids]
        if unknown:
            raise ValueError(f"tokens {unknown[:5]} are not in the synthetic vocabulary")
        return [self._ids[t] for t in tokens]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write this vocabulary as Hugging Face tokenizer files (what `export` puts beside a
        synthetic-task run's student, so `eval` and transformers can load it).

        Same ids; whitespace words with digits split, as `tokenize`; a word outside the task's
        vocabulary (any real benchmark text) becomes <pad>; the chat template is the plain
        concatenation of the messages' contents, as the task's prompts have no roles."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=VOCAB[PAD_ID]))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=VOCAB[PAD_ID], pad_token=VOCAB[PAD_ID],
                                eos_token=VOCAB[EOS_ID], chat_template=CHAT_TEMPLATE).save_pretrained(directory)

    def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == EOS_ID:
                break
            if i != PAD_ID:
                words.append(VOCAB[i])
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Style:
    """Probabilities of the surface forms (each row sums to 1): swap = P(second operand first)."""

    equals: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    connectives: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    comma: float = 0.5
    answer: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    swap: float = 0.5


TEACHER_STYLE = Style()
STUDENT_STYLE = Style(equals=(0.05, 0.9, 0.05), connectives=(0.04, 0.04, 0.88, 0.04), comma=0.1,
                      answer=(0.05, 0.05, 0.9), swap=0.1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """values v_0..v_S (digits), ops o_1..o_S; answer = (((v_0 o_1 v_1) o_2 v_2) ...) mod 10, every
    step taken mod 10."""

    values: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def partials(self) -> tuple[int, ...]:
        """The running values after each step."""
        out, r = [], self.values[0]
        for op, v in zip(self.ops, self.values[1:]):
            r = apply(op, r, v)
            out.append(r)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.partials[-1]

    def prompt(self) -> str:
        expr = " ".join([str(self.values[0]), *[f"{op} {v}" for op, v in zip(self.ops, self.values[1:])]])
        return f"find {expr} mod {MODULUS} ?"


def apply(op: str, a: int, b: int) -> int:
    """a op b mod 10."""
    return (a + b if op == "+" else a - b if op == "-" else a * b) % MODULUS


def sample_problem(rng: np.random.Generator, *, min_steps: int = 2, max_steps: int = 3) -> Problem:
    """Uniform digits 0..9 and operators, min_steps..max_steps steps (at most 4)."""
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 4, got {min_steps}, {max_steps}")
    steps = int(rng.integers(min_steps, max_steps + 1))
    values = tuple(int(v) for v in rng.integers(0, 10, size=steps + 1))
    return Problem(values, tuple(OPS[int(i)] for i in rng.integers(0, 3, size=steps)))


def _choice(rng: np.random.Generator, options: Sequence, probs: Sequence[float]):
    return options[int(rng.choice(len(options), p=np.asarray(probs) / np.sum(probs)))]


def solution(problem: Problem, rng: np.random.Generator, style: Style = TEACHER_STYLE) -> str:
    """A correct chain of thought for `problem` with surface forms drawn from `style`."""
    parts, r = [], problem.values[0]
    for i, (op, v) in enumerate(zip(problem.ops, problem.values[1:])):
        a, b = (v, r) if op != "-" and rng.random() < style.swap else (r, v)
        if i:
            parts.append(";")
            parts.append(_choice(rng, CONNECTIVES, style.connectives))
            if rng.random() < style.comma:
                parts.append(",")
        r = apply(op, r, v)
        parts += [str(a), op, str(b), _choice(rng, EQUALS, style.equals), str(r)]
    parts += [";", *_choice(rng, ANSWER_PHRASES, style.answer), str(r)]
    return " ".join(parts)


def _read_number(tokens: Sequence[str], i: int) -> tuple[int | None, int]:
    """The number of consecutive digit tokens from i (at most 3), and the index after them."""
    j = i
    while j < len(tokens) and j - i < 3 and tokens[j].isdigit():
        j += 1
    return (int("".join(tokens[i:j])) if j > i else None), j


def parse(problem: Problem, tokens: Sequence[str]) -> tuple[np.ndarray, int | None]:
    """Follow a completion through the format: (fork labels [len(tokens)] int8, final answer or None).

    Labels as in the module docstring. Step s must read `A o_s B <eq> R` (the right operands are
    the running value as written, i.e. the previous step's R or v_0, and v_s, in either order
    for + and *); numbers are followed as written, so a miscalculation or a wrong operand is not
    rejected: it is carried into the next step and decides the final answer.
    """
    labels = np.full(len(tokens), -1, np.int8)
    i, running = 0, problem.values[0]

    def mark(start, stop, value):
        labels[start:stop] = value

    for s, (op, v) in enumerate(zip(problem.ops, problem.values[1:])):
        if s:
            if i >= len(tokens) or tokens[i] != ";":
                return labels, None
            mark(i, i + 1, 0)
            i += 1
            if i < len(tokens) and tokens[i] in CONNECTIVES:
                mark(i, i + 1, 0)
                i += 1
            if i < len(tokens) and tokens[i] == ",":
                mark(i, i + 1, 0)
                i += 1
        a, j = _read_number(tokens, i)
        if a is None or j >= len(tokens) or tokens[j] != op:
            return labels, None
        # The first operand is a surface choice when either operand order is right.
        mark(i, j, 0 if op != "-" and a in (running, v) else 1)
        mark(j, j + 1, 1)
        b, k = _read_number(tokens, j + 1)
        if b is None:
            return labels, None
        mark(j + 1, k, 1)
        if k >= len(tokens) or tokens[k] not in EQUALS:
            return labels, None
        mark(k, k + 1, 0)
        r, i = _read_number(tokens, k + 1)
        if r is None:
            return labels, None
        mark(k + 1, i, 1)
        running = r
    if i >= len(tokens) or tokens[i] != ";":
        return labels, None
    mark(i, i + 1, 0)
    i += 1
    for phrase in sorted(ANSWER_PHRASES, key=len, reverse=True):
        if tuple(tokens[i:i + len(phrase)]) == phrase:
            mark(i, i + len(phrase), 0)
            i += len(phrase)
            break
    else:
        return labels, None
    answer, j = _read_number(tokens, i)
    if answer is None:
        return labels, None
    mark(i, j, 1)
    if j < len(tokens) and tokens[j] == "<eos>":
        mark(j, j + 1, 0)
    return labels, answer


def is_correct(problem: Problem, completion: str) -> bool:
    """Whether the completion follows the format and ends in the right answer."""
    return parse(problem, SyntheticTokenizer().tokenize(completion))[1] == problem.answer


def fork_labels(problem: Problem, completion_ids: Sequence[int]) -> np.ndarray:
    """Fork labels (1 / 0 / -1) of completion token ids (padding after EOS: -1)."""
    tokens = [VOCAB[int(i)] for i in completion_ids]
    return parse(problem, tokens)[0]


def problems(seed: int, index: int, count: int, **kwargs) -> list[Problem]:
    """Batch `index` of the problem stream `seed`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return [sample_problem(rng, **kwargs) for _ in range(count)]


def sft_examples(seed: int, index: int, count: int, style: Style = TEACHER_STYLE,
                 **kwargs) -> list[tuple[list[int], list[int]]]:
    """Batch `index` of the supervised stream `seed`: `count` (prompt ids, solution ids + EOS)
    pairs written in `style`; a pure function of (seed, index), like `problems`."""
    rng = np.random.default_rng([seed, index])
    tok = SyntheticTokenizer()
    out = []
    for _ in range(count):
        problem = sample_problem(rng, **kwargs)
        out.append((tok.encode(problem.prompt()), tok.encode(solution(problem, rng, style)) + [EOS_ID]))
    return out


__all__ = ["EOS_ID", "PAD_ID", "Problem", "STUDENT_STYLE", "Style", "SyntheticTokenizer", "TEACHER_STYLE", "VOCAB",
           "fork_labels", "is_correct", "parse", "problems", "sample_problem", "sft_examples", "solution"]
