"""Prompt batches for the trainer: the first arrow of the data flow (prompts -> rollouts).

A prompt source maps a batch index to left-padded token arrays, a pure function of (seed, index):

    tokens, mask = source.batch(i)      # [G, P] int32, [G, P] bool; G prompts, P = prompt_length

so the position in the data is one integer (the next batch index), which a checkpoint stores and a
resumed run continues from exactly. Every process computes the same global batch; the trainer
places each process's shards on its devices. The TFDS source is a stream instead (below): its
Grain iterator's state goes into the checkpoint beside the index (`checkpoint_items`).

- `RandomPrompts`: random token prompts of random lengths in [P/2, P] for random models.
- `SyntheticPrompts`: problems of the synthetic arithmetic task (`data.synthetic`), batch i
  = `synthetic.problems(seed, i, G)`.
- `TfdsPrompts`: a local JSONL/Parquet math file built once into a TFDS ArrayRecord dataset
  (`data.tfds_sources`) and streamed per process through Grain: batch i holds THIS process's
  G / n prompts of step i, from its own shard of the records (`local = True`), so every host
  reads and tokenizes only its own prompts; read in order, resumed from the Grain state.
- `JsonlPrompts`: problems from a local JSONL file, chat-templated with the student's tokenizer;
  visited in a seeded per-epoch permutation. Records that cannot be used (not JSON, missing or
  empty field, longer than P tokens) are counted and skipped, reported in `skipped` (the
  trainer writes the counts to events.log at start-up); a UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import abc
import json
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np

from topd_jax.configuration import ConfigError
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


class PromptSource(abc.ABC):
    """What every prompt source shares (the `PROMPT_SOURCES` table reads these):

    needs_tokenizer  whether it encodes text with the student's tokenizer
    local            whether batch(i) is this process's part of global batch i (else the whole)
    labeller         fork labels of candidates, (prompt ids [B, P], completion ids [B, N],
                     positions [B, M]) -> int32 [B, M], for locators that read labels (the
                     oracle); None: the source has none
    tokenizer        the source's own tokenizer when it brings its vocabulary (synthetic), else
                     None (the run uses the student's)
    skipped          records that could not be used, counted by reason
    """

    needs_tokenizer = False
    local = False
    labeller = None
    tokenizer = None
    skipped: Counter

    @classmethod
    @abc.abstractmethod
    def from_config(cls, data, *, batch_size: int, seed: int, vocab_size: int, tokenizer, data_dir: str,
                    process_index: int = 0, process_count: int = 1) -> "PromptSource":
        """The source a run's `data` config section describes."""

    @abc.abstractmethod
    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompt tokens [G, P] int32 and mask [G, P] bool of batch `index`."""

    def checkpoint_items(self, restore: bool = False) -> dict:
        """Orbax items (name -> save args, or restore args with `restore`) that carry this
        source's position beyond the trainer's batch index: none when batch(i) is a pure
        function of i; a stream's iterator state (TfdsPrompts)."""
        return {}

    def resumed(self, position: int, restored: Sequence[str]) -> None:
        """Told after a resume: the next batch index, and which of `checkpoint_items` the
        checkpoint held and were restored."""


class RandomPrompts(PromptSource):
    """Batch i: G prompts of uniform random tokens in [1, vocab) and lengths in [ceil(P/2), P]."""

    @classmethod
    def from_config(cls, data, *, batch_size, seed, vocab_size, tokenizer, data_dir, process_index=0,
                    process_count=1):
        return cls(vocab_size=vocab_size, prompt_length=data.prompt_length, batch_size=batch_size, seed=seed)

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


class SyntheticPrompts(PromptSource):
    """Batch i: the prompts of `synthetic.problems(seed, i, G)`, word-level tokens; the task's fork
    labeller (`synthetic.candidate_labels`, which reads the problem from the prompt)."""

    labeller = staticmethod(synthetic.candidate_labels)

    @classmethod
    def from_config(cls, data, *, batch_size, seed, vocab_size, tokenizer, data_dir, process_index=0,
                    process_count=1):
        return cls(prompt_length=data.prompt_length, batch_size=batch_size, seed=seed)

    def __init__(self, *, prompt_length: int, batch_size: int, seed: int):
        self.prompt_length, self.batch_size, self.seed = prompt_length, batch_size, seed
        self.tokenizer = synthetic.SyntheticTokenizer()
        self.skipped: Counter[str] = Counter()

    def problems(self, index: int) -> list[synthetic.Problem]:
        return synthetic.problems(self.seed, index, self.batch_size)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return left_pad([self.tokenizer.encode(p.prompt()) for p in self.problems(index)], self.prompt_length)


class TfdsPrompts(PromptSource):
    """Per-host chat prompts of a TFDS math dataset built from a local file, read through Grain.

    Process 0 builds (or reuses) data_dir/math_source/<name> from `path`; every process then
    tokenizes the problems once, drops those longer than prompt_length (counted in `skipped`,
    with the bad records the build skipped) and streams its own shard of the rest through Grain
    (`tfds_sources.loader`: a seeded permutation of the shard per epoch, G / n prompts a batch,
    read ahead by a Grain thread); `batch` tokenizes them (in the calling thread: a Hugging Face
    tokenizer is not safe to call from two threads at once).

    The stream is `stream`, a checkpointable Grain iterator: the trainer saves it with every
    checkpoint (`checkpoint_items`, Orbax item "prompts", one state file per process) and
    restores it on resume (`resumed`), so batch i after a resume is the batch i of an
    uninterrupted run. Batches are read in order: `batch(index)` is the stream's next batch when
    `index == position` (the trainer's case); any other index restarts the stream and reads up to
    it (a checkpoint written before the stream was saved with it resumes this way).
    """

    local = True
    needs_tokenizer = True
    ITEM = "prompts"  # the Orbax item of the stream's state

    @classmethod
    def from_config(cls, data, *, batch_size, seed, vocab_size, tokenizer, data_dir, process_index=0,
                    process_count=1):
        return cls(data.path, tokenizer, layout=data.layout, field=data.field, data_dir=data.data_dir or data_dir,
                   prompt_length=data.prompt_length, batch_size=batch_size, seed=seed,
                   system_prompt=data.system_prompt, process_index=process_index, process_count=process_count)

    def __init__(self, path: str | os.PathLike, tokenizer, *, layout: str, data_dir: str | os.PathLike,
                 prompt_length: int, batch_size: int, seed: int, system_prompt: str | None = None,
                 field: str = "problem", process_index: int = 0, process_count: int = 1):
        from topd_jax.data import tfds_sources

        name = os.path.basename(os.fspath(path)).split(".")[0].replace("-", "_")
        if process_index == 0:
            builder = tfds_sources.build_dataset(path, layout=layout, data_dir=data_dir, name=name,
                                                 problem_field=field)
            self.skipped: Counter[str] = Counter((builder.info.metadata or {}).get("skipped", {}))
        else:
            self.skipped = Counter()
        if process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("topd_jax: prompt dataset built")
        every = tfds_sources.open_source(data_dir, name)
        problems = [record["problem"] for record in every.read(range(len(every)))]
        lengths = [len(ids) for ids in encode_prompts(tokenizer, problems, system=system_prompt)]
        usable = [i for i, n in enumerate(lengths) if 1 <= n <= prompt_length]
        if len(usable) < len(problems):
            self.skipped[f"longer than prompt_length={prompt_length} tokens"] += len(problems) - len(usable)
        if not usable:
            raise ConfigError(f"data.path {path} has no prompt of at most data.prompt_length={prompt_length} tokens "
                              f"(skipped: {dict(self.skipped)})")
        self.records = tfds_sources.open_source(data_dir, name, keys=usable)
        self.loader = tfds_sources.loader(self.records, batch_size=batch_size, seed=seed, process_index=process_index,
                                          process_count=process_count)
        self.stream = iter(self.loader)
        self.position = 0  # the index of the stream's next batch
        self.encoder, self.prompt_length, self.system_prompt = tokenizer, prompt_length, system_prompt

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        if index < self.position:
            self.stream, self.position = iter(self.loader), 0
        while self.position < index:  # read up to it: a restarted stream, or an older checkpoint
            next(self.stream)
            self.position += 1
        problems = [record["problem"] for record in next(self.stream)]
        self.position += 1
        return left_pad(encode_prompts(self.encoder, problems, system=self.system_prompt), self.prompt_length)

    def checkpoint_items(self, restore: bool = False) -> dict:
        import grain

        return {self.ITEM: (grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave)(
            self.stream)}

    def resumed(self, position: int, restored: Sequence[str]) -> None:
        if self.ITEM in restored:
            self.position = position


class JsonlPrompts(PromptSource):
    """Chat prompts from the `field` of each JSONL record; batch i takes the global prompt stream
    [i G, (i + 1) G) where epoch e visits the records in permutation(seed, e)."""

    needs_tokenizer = True

    @classmethod
    def from_config(cls, data, *, batch_size, seed, vocab_size, tokenizer, data_dir, process_index=0,
                    process_count=1):
        return cls(data.path, tokenizer, field=data.field, prompt_length=data.prompt_length, batch_size=batch_size,
                   seed=seed, system_prompt=data.system_prompt)

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
                try:  # utf-8-sig: a byte-order mark (editors on Windows write one) is not an error
                    record = json.loads(raw.decode("utf-8-sig"))
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
            raise ConfigError(f"data.path {path} has no usable prompts in data.field {field!r} "
                              f"(skipped: {dict(self.skipped)})")
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


# data.source -> its prompt source: the one table the trainer and the config read.
PROMPT_SOURCES: dict[str, type[PromptSource]] = {
    "random": RandomPrompts,
    "synthetic": SyntheticPrompts,
    "tfds": TfdsPrompts,
    "jsonl": JsonlPrompts,
}

__all__ = ["JsonlPrompts", "PROMPT_SOURCES", "PromptSource", "RandomPrompts", "SyntheticPrompts", "TfdsPrompts",
           "left_pad"]
