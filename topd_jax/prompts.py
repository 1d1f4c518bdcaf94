"""Prompt batches for the trainer: the first arrow of the data flow (prompts -> rollouts).

A prompt source maps a batch index to left-padded token arrays, a pure function of (seed, index):

    tokens, mask = source.batch(i)      # [G, P] int32, [G, P] bool; G prompts, P = prompt_length

so the position in the data is one integer (the next batch index), which a checkpoint stores and a
resumed run continues from exactly. Every process computes the same global batch; the trainer
places each process's shards on its devices.

- `RandomPrompts`: random token prompts of random lengths in [P/2, P] for random models.
- `SyntheticPrompts`: problems of the synthetic arithmetic task (`data.synthetic`), batch i
  = `synthetic.problems(seed, i, G)`.
- `JsonlPrompts`: problems from a local JSONL file, chat-templated with the student's tokenizer;
  visited in a seeded per-epoch permutation. Records that cannot be used (not JSON, missing or
  empty field, longer than P tokens) are counted and skipped, reported in `skipped`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Sequence

import numpy as np

from topd_jax.data import synthetic
from topd_jax.models.tokenizer import encode_prompts


def left_pad(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows (each 1 <= len <= width) -> left-padded tokens [G, width] int32 and mask [G, width]."""
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if not 1 <= len(row) <= width:
            raise ValueError(f"prompt {i} has {len(row)} tokens; prompts need 1 to {width}")
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return tokens, mask


class RandomPrompts:
    """Batch i: G prompts of uniform random tokens in [1, vocab) and lengths in [ceil(P/2), P]."""

    def __init__(self, *, vocab_size: int, prompt_length: int, batch_size: int, seed: int):
        if vocab_size < 2 or prompt_length < 1 or batch_size < 1:
            raise ValueError(f"RandomPrompts needs vocab_size >= 2, prompt_length >= 1, batch_size >= 1; got "
                             f"{vocab_size}, {prompt_length}, {batch_size}")
        self.vocab_size, self.prompt_length, self.batch_size, self.seed = vocab_size, prompt_length, batch_size, seed
        self.skipped: Counter[str] = Counter()

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        p = self.prompt_length
        lengths = rng.integers((p + 1) // 2, p + 1, size=self.batch_size)
        rows = [rng.integers(1, self.vocab_size, size=n).tolist() for n in lengths]
        return left_pad(rows, p)


class SyntheticPrompts:
    """Batch i: the prompts of `synthetic.problems(seed, i, G)`, word-level tokens."""

    def __init__(self, *, prompt_length: int, batch_size: int, seed: int):
        self.prompt_length, self.batch_size, self.seed = prompt_length, batch_size, seed
        self.tokenizer = synthetic.SyntheticTokenizer()
        self.skipped: Counter[str] = Counter()

    def problems(self, index: int) -> list[synthetic.Problem]:
        return synthetic.problems(self.seed, index, self.batch_size)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return left_pad([self.tokenizer.encode(p.prompt()) for p in self.problems(index)], self.prompt_length)


class JsonlPrompts:
    """Chat prompts from the `field` of each JSONL record; batch i takes the global prompt stream
    [i G, (i + 1) G) where epoch e visits the records in permutation(seed, e)."""

    def __init__(self, path: str | os.PathLike, tokenizer, *, field: str, prompt_length: int, batch_size: int,
                 seed: int, system_prompt: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} does not exist")
        self.skipped: Counter[str] = Counter()
        texts = []
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.skipped["not valid UTF-8 JSON"] += 1
                    continue
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str) or not value.strip():
                    self.skipped[f"missing or empty {field!r}"] += 1
                    continue
                texts.append(value)
        encoded = encode_prompts(tokenizer, texts, system=system_prompt) if texts else []
        self.rows = [ids for ids in encoded if 1 <= len(ids) <= prompt_length]
        if len(self.rows) < len(encoded):
            self.skipped[f"longer than prompt_length={prompt_length} tokens"] += len(encoded) - len(self.rows)
        if not self.rows:
            raise ValueError(f"{path} has no usable prompts in field {field!r} (skipped: {dict(self.skipped)})")
        self.prompt_length, self.batch_size, self.seed = prompt_length, batch_size, seed
        self._epoch, self._order = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._order

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picks = []
        for g in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(g, len(self.rows))
            picks.append(self.rows[self._permutation(epoch)[offset]])
        return left_pad(picks, self.prompt_length)


__all__ = ["JsonlPrompts", "RandomPrompts", "SyntheticPrompts", "left_pad"]
