"""TFDS builders (ArrayRecord, no TensorFlow) for local math files, and per-host prompt readers.

A local JSONL or Parquet file becomes a TFDS dataset of three text features, `problem`, `answer`
and `id`, written as ArrayRecord in file order (shuffling is the reader's job, not the writer's).
The layout names where each feature comes from:

| layout    | problem                              | answer                    | id                 |
|-----------|--------------------------------------|---------------------------|--------------------|
| `prompts` | `problem_field` ("problem")          | `answer_field` ("answer") | `id_field` or line |
| `aime24`  | `problem`                            | `answer`                  | `id`               |
| `aime25`  | `problem`                            | `answer`                  | line               |
| `amc23`   | `problem`                            | `answer` (27.0 -> "27")   | `id`               |
| `math500` | `problem` minus MATH500_INSTRUCTION  | `answer`                  | `unique_id`        |
| `gsm8k`   | `question`                           | `answer` after "####"     | `idx`              |

"line" is the 1-based line (JSONL) or row (Parquet) number in its file, prefixed by the file name
when several files are read; it is also the id of a record that lacks its layout's id field.
Numbers become text (27.0 -> "27"). GSM8K keeps the text after the last "####" without thousands
separators ("1,600" -> "1600"). Blank JSONL lines are ignored. These rules match
`math_sets.read_records`, the plain (non-TFDS) reader.
A bad record (`not_utf8`, `not_json`, `not_object`, `unreadable_row`, `missing_field`,
`empty_problem`, `empty_answer`) is skipped and counted; the counts by reason are logged at the
end of building and stored with the data (`builder.info.metadata["skipped"]`, in
`metadata.json`), so a broken line never stops an epoch.

TFDS imports TensorFlow lazily, only for `tf.data`; building with `file_format="array_record"`
and reading with `as_data_source` never touch it.

`ShardedReader` turns a random-access source into deterministic per-host batches: global batch
`index` is the global stream positions [index * G, (index + 1) * G), epoch `e` of the stream
being `numpy.random.default_rng([seed, e]).permutation(len(source))`, and host `i` of `n` takes
the `i`-th contiguous slice of G / n records. A batch is a pure function of (seed, index), so a
checkpoint stores only `reader.position` (the next batch index) and resuming is `batch(position)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

LAYOUTS = ("prompts", "aime24", "aime25", "amc23", "math500", "gsm8k")
SKIP_REASONS = ("not_utf8", "not_json", "not_object", "unreadable_row", "missing_field",
                "empty_problem", "empty_answer")
# The instruction the published MATH500 file prepends to every problem.
MATH500_INSTRUCTION = "Return your final response within \\boxed{}."
# layout -> (problem field, answer field, id field or None for the line index)
_LAYOUT_FIELDS = {
    "aime24": ("problem", "answer", "id"),
    "aime25": ("problem", "answer", None),
    "amc23": ("problem", "answer", "id"),
    "math500": ("problem", "answer", "unique_id"),
    "gsm8k": ("question", "answer", "idx"),
}
_BUILDER_NAME = "math_source"
_VERSION = "1.0.0"


class BadRecord(ValueError):
    """A source record that cannot become a (problem, answer, id) example; `reason` names why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _as_text(value: Any) -> str:
    """A field value as stripped text: bytes are UTF-8 decoded, integral floats lose `.0`,
    anything but text or a number is empty."""
    if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float)):
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("not_utf8") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def normalize_math_record(raw: Any, line: str, *, layout: str, problem_field: str = "problem",
                          answer_field: str = "answer", id_field: str | None = None
                          ) -> dict[str, str]:
    """One raw record -> {"problem", "answer", "id"} under `layout`; raises BadRecord if bad.

    The field arguments apply to the `prompts` layout only; `line` is the id when the layout
    names no id field or the record lacks it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(raw, dict):
        raise BadRecord("not_object")
    fields = (problem_field, answer_field, id_field)
    p_key, a_key, id_key = _LAYOUT_FIELDS.get(layout, fields)
    if raw.get(p_key) is None or raw.get(a_key) is None:
        raise BadRecord("missing_field")
    problem, answer = _as_text(raw[p_key]), _as_text(raw[a_key])
    if layout == "math500" and problem.startswith(MATH500_INSTRUCTION):
        problem = problem[len(MATH500_INSTRUCTION):].strip()
    if layout == "gsm8k":
        final = answer.rsplit("####", 1)[1].strip() if "####" in answer else ""
        answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", final)  # "1,600" -> "1600"
    if not problem:
        raise BadRecord("empty_problem")
    if not answer:
        raise BadRecord("empty_answer")
    given_id = _as_text(raw.get(id_key)) if id_key is not None else ""
    return {"problem": problem, "answer": answer, "id": given_id or line}


def _jsonl_records(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object or BadRecord) per non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, BadRecord("not_utf8")
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError:
                yield n, BadRecord("not_json")


def _parquet_records(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row dict or BadRecord) per row; an unreadable row group is all bad."""
    import pyarrow.parquet as pq  # Only Parquet sources need pyarrow.

    pfile, row = pq.ParquetFile(path, page_checksum_verification=True), 1
    for g in range(pfile.num_row_groups):
        size = pfile.metadata.row_group(g).num_rows
        try:
            rows = pfile.read_row_group(g).to_pylist()
        except Exception:  # noqa: BLE001 - any decode failure of this group skips its rows.
            rows = [BadRecord("unreadable_row")] * size
        for r in rows:
            yield row, r
            row += 1


@dataclasses.dataclass(eq=False)
class MathSourceConfig(tfds.core.BuilderConfig):
    """Which local files to read (`source_paths`, `.jsonl` or `.parquet`) and how (`layout`)."""

    source_paths: tuple[str, ...] = ()
    layout: str = "prompts"
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    split: str = "train"
    sha256: tuple[str, ...] = ()  # Of each source file: what reuse is checked against.


def _source_key(cfg: MathSourceConfig) -> dict[str, Any]:
    """What a built dataset was made from, as JSON-ready data (paths excluded: copies match)."""
    return {"sha256": list(cfg.sha256), "layout": cfg.layout, "split": cfg.split,
            "fields": [cfg.problem_field, cfg.answer_field, cfg.id_field]}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MathSource(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local math JSONL/Parquet files -> ArrayRecord examples {problem, answer, id}, file order.

    Unregistered (no global TFDS name): read it back with `open_source`, not `tfds.load`.
    """

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Local math files as {problem, answer, id} text."}

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"problem": text, "answer": text, "id": text}),
            disable_shuffling=True,  # Keep file order; ShardedReader shuffles.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        return {self.builder_config.split: self._generate_examples()}

    def _generate_examples(self):
        cfg, skipped, key = self.builder_config, Counter(), 0
        for path in cfg.source_paths:
            is_parquet = str(path).endswith(".parquet")
            records = _parquet_records(path) if is_parquet else _jsonl_records(path)
            prefix = f"{os.path.basename(path)}:" if len(cfg.source_paths) > 1 else ""
            for n, raw in records:
                try:
                    if isinstance(raw, BadRecord):
                        raise raw
                    example = normalize_math_record(
                        raw, f"{prefix}{n}", layout=cfg.layout, problem_field=cfg.problem_field,
                        answer_field=cfg.answer_field, id_field=cfg.id_field)
                except BadRecord as bad:
                    skipped[bad.reason] += 1
                    continue
                yield key, example  # Integer keys in file order: the written order.
                key += 1
        if key == 0:
            raise ValueError(f"no usable records in {list(cfg.source_paths)}; skipped "
                             f"{dict(skipped)}")
        self.info.metadata["skipped"] = {r: skipped[r] for r in SKIP_REASONS}
        self.info.metadata["source"] = _source_key(cfg)
        logging.info("math_source/%s: wrote %d records, skipped %s", cfg.name, key,
                     dict(skipped) or "none")


def build_dataset(source_path: str | os.PathLike | Sequence[str | os.PathLike], *, layout: str,
                  data_dir: str | os.PathLike, name: str | None = None, split: str = "train",
                  problem_field: str = "problem", answer_field: str = "answer",
                  id_field: str | None = None) -> MathSource:
    """Builds `data_dir/math_source/<name>/1.0.0/` from local file(s), or reuses it if built.

    `name` defaults to the first file's stem. A dataset already built under (data_dir, name) is
    reused when its files' SHA-256, layout, fields and split match, and is an error otherwise.
    Build on one process per data_dir (e.g. process 0, then a barrier): TFDS renames a temporary
    directory into place and concurrent builders would race. Returns the builder;
    `builder.info.metadata["skipped"]` holds the skip counts by reason and
    `open_source(data_dir, name, split)` reads the records.
    """
    paths = [source_path] if isinstance(source_path, (str, os.PathLike)) else list(source_path)
    paths = tuple(os.fspath(p) for p in paths)
    if not paths:
        raise ValueError("build_dataset needs at least one source file")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"math source file not found: {p}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    name = name or os.path.basename(paths[0]).split(".")[0].replace("-", "_")
    config = MathSourceConfig(name=name, version=_VERSION, source_paths=paths, layout=layout,
                              problem_field=problem_field, answer_field=answer_field,
                              id_field=id_field, split=split,
                              sha256=tuple(_sha256(p) for p in paths))
    builder = MathSource(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.data_path.exists():
        built = (builder.info.metadata or {}).get("source")
        if built != _source_key(config):
            raise ValueError(f"dataset {name!r} in {builder.data_path} was built from another "
                             f"source ({built}); pick another name or delete that directory")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return builder


def open_source(data_dir: str | os.PathLike, name: str, split: str = "train") -> "TextSource":
    """Random-access records (dicts of str) of a dataset that `build_dataset` wrote."""
    path = os.path.join(os.fspath(data_dir), _BUILDER_NAME, name, _VERSION)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no built math dataset at {path}; call build_dataset first")
    return TextSource(tfds.builder_from_directory(path).as_data_source(split=split))


class TextSource(Sequence):
    """A TFDS data source whose byte strings are decoded to python str."""

    def __init__(self, source: Sequence[dict[str, Any]]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, str]:
        if isinstance(i, slice):
            raise TypeError("TextSource takes an integer index, not a slice")
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v
                for k, v in self._source[int(i)].items()}


class ShardedReader:
    """Deterministic per-host batches of a random-access source, resumable from `position`.

    `batch(index)` is this host's `batch_size // process_count` records of global batch `index`
    (see the module docstring); it does not move `position`. `next_batch()` returns
    `batch(position)` and advances `position`, the int to save in a checkpoint.
    """

    def __init__(self, source: Sequence[dict[str, Any]], *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 position: int = 0):
        if len(source) == 0:
            raise ValueError("ShardedReader needs a non-empty source")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} is not a positive multiple of "
                             f"process_count {process_count}")
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.position = position
        self._order: dict[int, np.ndarray] = {}  # epoch -> permutation; the last two are kept.

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order:
            n = len(self.source)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order = {e: o for e, o in self._order.items() if e == epoch - 1}
            self._order[epoch] = order
        return self._order[epoch]

    def indices(self, index: int) -> list[int]:
        """Source indices of this host's slice of global batch `index`."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        n, per_host = len(self.source), self.batch_size // self.process_count
        start = index * self.batch_size + self.process_index * per_host
        positions = range(start, start + per_host)
        return [int(self._epoch_order(p // n)[p % n]) for p in positions]

    def batch(self, index: int) -> list[dict[str, Any]]:
        """This host's records of global batch `index`, a pure function of (seed, index)."""
        return [self.source[i] for i in self.indices(index)]

    def next_batch(self) -> list[dict[str, Any]]:
        """`batch(position)`, then advances `position` by one."""
        out = self.batch(self.position)
        self.position += 1
        return out

    def epoch(self, index: int) -> float:
        """Epochs of the global stream consumed by the end of global batch `index`."""
        return (index + 1) * self.batch_size / len(self.source)
