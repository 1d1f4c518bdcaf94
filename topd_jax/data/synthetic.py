"""The synthetic reasoning task (version 3): seeded multi-step arithmetic, a chain of thought with
self-corrections, and exact fork labels.

A problem asks for a left-to-right expression of digits modulo 10, so every value is one digit
and the arithmetic is a table a small model can learn on a CPU in minutes:

    prompt:    find 7 + 4 - 6 * 3 mod 1 0 ?
    solution:  7 + 4 = 1 ; then , 1 - 6 = 5 ; then , 3 * 5 = 5 ; answer is 5 <eos>

(every word and digit is one token; 3 or 4 steps by default). Every step has several equivalent
surface forms, drawn independently from a `Style`:
  - operand order of + and * (4 + 7 = 1 is as right as 7 + 4 = 1),
  - the equality word (= | gives | makes), the connective of later steps (then | so | next | now),
    an optional comma after it, and the answer phrase (answer | answer is | result).
Real reasoning forks exist too: a wrong digit of an intermediate value is carried into every
later step and makes the final answer wrong, unless the chain corrects it at once:

    7 + 4 = 2 wait 1 ; then , 1 - 6 = 5 ...

A `Style` with slip > 0 writes such corrections (a wrong value, `wait`, the right value); the
wrong value itself carries no supervised loss (`sft_examples`' weights), so a model trained on it
learns to repair a slip, not to make one. The teacher is trained with slips, the student without:
after a student's slip the teacher's continuation ("wait 1 ; then , 1 - 6 ...") differs from the
student's ("; next 2 - 6 ...") for several tokens (short-horizon drift), while after a surface
choice both continue alike.

Styles: both models have clear but different preferences (0.7 for their favourite form, 0.6 for
the connective), and every form appears with p >= 0.13 in both, so neither model is out of
distribution on the other's style: after supervised training, a student's favourite surface form
costs d ~ log(0.7 / 0.15) ~ 1.5 under the teacher, a high-loss token whose future does not diverge.

Being synthetic, every completion token the format decides can be labelled (`fork_labels`): 1 = a
fork, changing the token changes whether the final answer is right (operator, operands,
intermediate and final digits, `wait` and its value; a later step reuses the value as written, so
the chain is followed as the model wrote it; the first token that leaves the format, a wrong
operator, equality word or a sampled <pad> included); 0 = a surface choice with an equally right
alternative (connectives, equality words, spacing, the answer phrase, the first operand of a
commutative step when it is either operand, EOS); -1 = after the first token that leaves the
format, or after the answer (not decidable). A token that declines a repair is a fork: after an
uncorrected wrong value (one that differs from the problem's running value), whatever is written
where `wait` could go (`;`, usually) decides the answer, since `wait <right value>` would restore it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

VERSION = 3
MAX_STEPS = 4
OPS = ("+", "-", "*")
EQUALS = ("=", "gives", "makes")
CONNECTIVES = ("then", "so", "next", "now")
ANSWER_PHRASES = (("answer",), ("answer", "is"), ("result",))
SPECIAL = ("<pad>", "<eos>")
VOCAB = (*SPECIAL, *[str(d) for d in range(10)], *OPS, *EQUALS, *CONNECTIVES, "answer", "is", "result", ";", ",",
         "?", "find", "mod", "wait")
PAD_ID, EOS_ID = 0, 1
MODULUS = 10
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
PROMPT_LENGTH = 14  # the longest prompt (4 steps) in tokens
MIN_STEPS, DEFAULT_MAX_STEPS = 3, 4  # the problems of versions 2 and 3


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
        """Words of `ids`. With stop_at_eos, everything from the first EOS on is dropped and a
        <pad> before it is a sampled token, written as "<pad>" (so grading sees it); without,
        <pad> is padding and dropped."""
        words = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == EOS_ID:
                break
            if i != PAD_ID or stop_at_eos:
                words.append(VOCAB[i])
        if stop_at_eos:  # trailing pads of a row that never sampled EOS are padding
            while words and words[-1] == VOCAB[PAD_ID]:
                words.pop()
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Style:
    """Probabilities of the surface forms (each row sums to 1): swap = P(second operand first);
    slip = P(a step writes a wrong value, then `wait` and the right value; at most one per solution,
    so the longest 4-step solution is 36 tokens)."""

    equals: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    connectives: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    comma: float = 0.5
    answer: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    swap: float = 0.5
    slip: float = 0.0


def favour(index: int, p: float, n: int) -> tuple[float, ...]:
    """n surface forms, the one at `index` with probability p, the others sharing 1 - p."""
    return tuple(p if i == index else (1 - p) / (n - 1) for i in range(n))


# Version 3: favourite forms at 0.7 (connectives 0.6), so ~28% of the SFT'd student's high-loss
# candidates are surface forms (the paper reports ~30%; at 0.8 / 0.7 it was 40-45%).
TEACHER_STYLE = Style(equals=favour(0, 0.7, 3), connectives=favour(0, 0.6, 4), comma=0.7,
                      answer=favour(0, 0.7, 3), swap=0.7, slip=0.2)
STUDENT_STYLE = Style(equals=favour(1, 0.7, 3), connectives=favour(2, 0.6, 4), comma=1 - 0.7,
                      answer=favour(2, 0.7, 3), swap=1 - 0.7, slip=0.0)


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


def sample_problem(rng: np.random.Generator, *, min_steps: int = MIN_STEPS,
                   max_steps: int = DEFAULT_MAX_STEPS) -> Problem:
    """Uniform digits 0..9 and operators, min_steps..max_steps steps (at most 4)."""
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(f"steps must satisfy 1 <= min_steps <= max_steps <= 4, got {min_steps}, {max_steps}")
    steps = int(rng.integers(min_steps, max_steps + 1))
    values = tuple(int(v) for v in rng.integers(0, 10, size=steps + 1))
    return Problem(values, tuple(OPS[int(i)] for i in rng.integers(0, 3, size=steps)))


def problem_of_prompt(ids: Sequence[int]) -> Problem:
    """The problem a prompt's token ids (padding allowed) state, or a one-line error."""
    words = [VOCAB[int(i)] for i in ids if int(i) != PAD_ID]
    if len(words) < 7 or words[0] != "find" or words[-4:] != ["mod", "1", "0", "?"] or len(words) % 2:
        raise ValueError(f"not a synthetic prompt: {' '.join(words)!r}")
    expr = words[1:-4]
    if not all(w.isdigit() for w in expr[::2]) or not all(w in OPS for w in expr[1::2]):
        raise ValueError(f"not a synthetic prompt: {' '.join(words)!r}")
    return Problem(tuple(int(w) for w in expr[::2]), tuple(expr[1::2]))


def _choice(rng: np.random.Generator, options: Sequence, probs: Sequence[float]):
    return options[int(rng.choice(len(options), p=np.asarray(probs) / np.sum(probs)))]


def solution(problem: Problem, rng: np.random.Generator, style: Style = TEACHER_STYLE) -> str:
    """A correct chain of thought for `problem` with surface forms (and corrected slips) drawn
    from `style`."""
    parts, r, slipped = [], problem.values[0], False
    for i, (op, v) in enumerate(zip(problem.ops, problem.values[1:])):
        a, b = (v, r) if op != "-" and rng.random() < style.swap else (r, v)
        if i:
            parts.append(";")
            parts.append(_choice(rng, CONNECTIVES, style.connectives))
            if rng.random() < style.comma:
                parts.append(",")
        r = apply(op, r, v)
        parts += [str(a), op, str(b), _choice(rng, EQUALS, style.equals)]
        if not slipped and rng.random() < style.slip:
            parts += [str((r + int(rng.integers(1, MODULUS))) % MODULUS), "wait"]
            slipped = True
        parts.append(str(r))
    parts += [";", *_choice(rng, ANSWER_PHRASES, style.answer), str(r)]
    return " ".join(parts)


def _read_number(tokens: Sequence[str], i: int) -> tuple[int | None, int]:
    """The number of consecutive digit tokens from i (at most 3), and the index after them."""
    j = i
    while j < len(tokens) and j - i < 3 and tokens[j].isdigit():
        j += 1
    return (int("".join(tokens[i:j])) if j > i else None), j


def parse(problem: Problem, tokens: Sequence[str]) -> tuple[np.ndarray, int | None]:
    """Follow a completion through the format: (fork labels [len(tokens)] int8, final answer or
    None); see `walk`."""
    labels, answer, _ = walk(problem, tokens)
    return labels, answer


def walk(problem: Problem, tokens: Sequence[str]) -> tuple[np.ndarray, int | None, np.ndarray]:
    """Follow a completion through the format: (fork labels [len(tokens)] int8, final answer or None).

    Labels as in the module docstring. Step s must read `A o B <eq> R [wait R']` (the right
    operands are the running value as written, i.e. the previous step's last value or v_0, and
    v_s, in either order for + and *); numbers and operators are followed as written, so a
    miscalculation, a wrong operand or a wrong operator is not rejected: it is carried into the
    next step and decides the final answer. The first token that leaves the format is a fork (1):
    changing it could restore a right answer; the tokens after it are -1.

    Also returns the local errors [len(tokens)] bool: a token wrong given the chain as written
    before it -- an operand that is not the running value or the problem's v_s (a copying error),
    an operator other than the problem's, a value (or a `wait` value) other than a op b of the
    operands as written, an answer other than the last value, a token off the format.
    """
    labels = np.full(len(tokens), -1, np.int8)
    errors = np.zeros(len(tokens), bool)
    i, running = 0, problem.values[0]
    declined: list[int] = []  # tokens written where `wait` would have repaired a wrong value

    def mark(start, stop, value):
        labels[start:stop] = value

    def leave(at):  # the first token off the format: a fork; nothing after it is decidable
        mark(at, at + 1, 1)
        errors[at:at + 1] = True
        return _with_declines(labels, declined), None, errors

    for s, (op, v) in enumerate(zip(problem.ops, problem.values[1:])):
        if s:
            if i >= len(tokens) or tokens[i] != ";":
                return leave(i)
            mark(i, i + 1, 0)
            i += 1
            if i < len(tokens) and tokens[i] in CONNECTIVES:
                mark(i, i + 1, 0)
                i += 1
            if i < len(tokens) and tokens[i] == ",":
                mark(i, i + 1, 0)
                i += 1
        a, j = _read_number(tokens, i)
        if a is None:
            return leave(i)
        # The first operand is a surface choice when either operand order is right.
        mark(i, j, 0 if op != "-" and a in (running, v) else 1)
        errors[i:j] = a not in ((running, v) if op != "-" else (running,))
        if j >= len(tokens) or tokens[j] not in OPS:
            return leave(j)
        mark(j, j + 1, 1)
        errors[j] = tokens[j] != op
        b, k = _read_number(tokens, j + 1)
        if b is None:
            return leave(j + 1)
        mark(j + 1, k, 1)
        errors[j + 1:k] = b != (v if a == running or op == "-" else running)
        if k >= len(tokens) or tokens[k] not in EQUALS:
            return leave(k)
        mark(k, k + 1, 0)
        r, i = _read_number(tokens, k + 1)
        if r is None:
            return leave(k + 1)
        mark(k + 1, i, 1)
        value = apply(tokens[j], a, b)
        if i < len(tokens) and tokens[i] == "wait":
            mark(i, i + 1, 1)
            errors[i] = r == value  # `wait` after a right value breaks it
            r, i2 = _read_number(tokens, i + 1)
            if r is None:
                return leave(i + 1)
            mark(i + 1, i2, 1)
            errors[i + 1:i2] = r != value
            i = i2
        else:
            errors[k + 1:i] = r != value
            if r != problem.partials[s]:
                declined.append(i)  # the token after an uncorrected wrong value declines the repair
        running = r
    if i >= len(tokens) or tokens[i] != ";":
        return leave(i)
    mark(i, i + 1, 0)
    i += 1
    for phrase in sorted(ANSWER_PHRASES, key=len, reverse=True):
        if tuple(tokens[i:i + len(phrase)]) == phrase:
            mark(i, i + len(phrase), 0)
            i += len(phrase)
            break
    else:
        return leave(i)
    answer, j = _read_number(tokens, i)
    if answer is None:
        return leave(i)
    mark(i, j, 1)
    errors[i:j] = answer != running
    if j < len(tokens) and tokens[j] == "<eos>":
        mark(j, j + 1, 0)
    return _with_declines(labels, declined), answer, errors


def _with_declines(labels: np.ndarray, declined: Sequence[int]) -> np.ndarray:
    """Fork labels with every decidable token that declined a repair marked a fork: after an
    uncorrected wrong value, writing `wait` (and the right value) would have restored the answer,
    so choosing anything else there decides it (e.g. `;` where the teacher continues `wait 0`)."""
    for at in declined:
        if at < len(labels) and labels[at] != -1:
            labels[at] = 1
    return labels


def is_correct(problem: Problem, completion: str) -> bool:
    """Whether the completion follows the format and ends in the right answer."""
    return parse(problem, SyntheticTokenizer().tokenize(completion))[1] == problem.answer


def is_correct_ids(problem: Problem, completion_ids: Sequence[int]) -> bool:
    """`is_correct` of completion token ids up to the first EOS: a <pad> id before it is a
    sampled token and leaves the format (graded wrong), never silently dropped."""
    ids = [int(i) for i in completion_ids]
    ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
    return parse(problem, [VOCAB[i] for i in ids])[1] == problem.answer


def fork_labels(problem: Problem, completion_ids: Sequence[int]) -> np.ndarray:
    """Fork labels (1 / 0 / -1) of completion token ids (padding after EOS: -1). An id outside the
    task's vocabulary (a model with a larger one) reads as <pad>: it leaves the format."""
    tokens = [VOCAB[int(i)] if 0 <= int(i) < len(VOCAB) else VOCAB[PAD_ID] for i in completion_ids]
    return parse(problem, tokens)[0]


def candidate_labels(prompt_tokens: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Fork labels of completion positions: prompt ids [B, P], completion ids [B, N], positions
    [B, M] -> int32 [B, M] (1 fork, 0 surface form, -1 undecidable or out of range). The problem
    is read from the prompt, so this needs nothing but the rollout (the oracle locator's labels,
    `trainer.step.candidates`)."""
    prompt_tokens, tokens, positions = (np.asarray(x) for x in (prompt_tokens, tokens, positions))
    out = np.full(positions.shape, -1, np.int32)
    for b in range(positions.shape[0]):
        labels = fork_labels(problem_of_prompt(prompt_tokens[b]), tokens[b])
        inside = (positions[b] >= 0) & (positions[b] < labels.shape[0])
        out[b, inside] = labels[positions[b, inside]]
    return out


def problems(seed: int, index: int, count: int, **kwargs) -> list[Problem]:
    """Batch `index` of the problem stream `seed`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return [sample_problem(rng, **kwargs) for _ in range(count)]


def sft_examples(seed: int, index: int, count: int, style: Style = TEACHER_STYLE,
                 **kwargs) -> list[tuple[list[int], list[int], list[float]]]:
    """Batch `index` of the supervised stream `seed`: `count` (prompt ids, solution ids + EOS,
    loss weights) triples written in `style`; a pure function of (seed, index), like `problems`.
    The weight is 0 on a slipped value (the digit before `wait`) and 1 elsewhere, so a model
    learns the repair but not the slip."""
    rng = np.random.default_rng([seed, index])
    tok = SyntheticTokenizer()
    wait = VOCAB.index("wait")
    out = []
    for _ in range(count):
        problem = sample_problem(rng, **kwargs)
        ids = tok.encode(solution(problem, rng, style)) + [EOS_ID]
        weights = [0.0 if nxt == wait else 1.0 for nxt in ids[1:]] + [1.0]
        out.append((tok.encode(problem.prompt()), ids, weights))
    return out


__all__ = ["EOS_ID", "PAD_ID", "Problem", "STUDENT_STYLE", "Style", "SyntheticTokenizer", "TEACHER_STYLE", "VERSION",
           "VOCAB", "candidate_labels", "fork_labels", "is_correct", "is_correct_ids", "parse", "problem_of_prompt",
           "problems", "sample_problem", "sft_examples", "solution", "walk"]
