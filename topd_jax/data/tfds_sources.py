"""TFDS builders (ArrayRecord, no TensorFlow) for local math files, and per-host prompt readers.

Local JSONL or Parquet files become a TFDS dataset of three text features, `problem`, `answer`
and `id`, written as ArrayRecord in file order (shuffling is the reader's job, not the writer's).
The records are those of `math_sets.iter_records`: its module docstring holds the layout table
(`prompts` and the published eval sets), the text rules and the skip reasons. When several files
make one dataset, a line-number id is prefixed by its file name ("a.jsonl:3"). Bad records are
skipped and counted; the counts by reason are logged at the end of building and stored with the
data (`builder.info.metadata["skipped"]`, in `metadata.json`), so a broken line never stops an
epoch.

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
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from topd_jax.configuration import ConfigError
from topd_jax.data import math_sets

_BUILDER_NAME = "math_source"
_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class MathSourceConfig(tfds.core.BuilderConfig):
    """Which local files to read (`source_paths`, `.jsonl` or `.parquet`) and how (`layout` and,
    for `prompts`, the field names: see `math_sets`)."""

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
            prefix = f"{os.path.basename(path)}:" if len(cfg.source_paths) > 1 else ""
            for record in math_sets.iter_records(
                    path, cfg.layout, skipped=skipped, problem_field=cfg.problem_field,
                    answer_field=cfg.answer_field, id_field=cfg.id_field, line_prefix=prefix):
                yield key, dataclasses.asdict(record)  # Integer keys in file order: written order.
                key += 1
        if key == 0:
            raise ConfigError(f"no usable records in {list(cfg.source_paths)}; skipped "
                              f"{dict(skipped)}")
        self.info.metadata["skipped"] = dict(skipped)
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
    math_sets.get_layout(layout)  # An unknown layout fails here, before any file is hashed.
    name = name or os.path.basename(paths[0]).split(".")[0].replace("-", "_")
    config = MathSourceConfig(name=name, version=_VERSION, source_paths=paths, layout=layout,
                              problem_field=problem_field, answer_field=answer_field,
                              id_field=id_field, split=split,
                              sha256=tuple(_sha256(p) for p in paths))
    builder = MathSource(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    if builder.data_path.exists():
        built = (builder.info.metadata or {}).get("source")
        current = _source_key(config)
        if built != current:  # most often the source file was edited after the build
            differ = [key for key in current if (built or {}).get(key) != current[key]]
            edited = " (the file was edited since it was built)" if differ == ["sha256"] else ""
            raise ConfigError(f"dataset {name!r} in {builder.data_path} was built from another source: its "
                              f"{', '.join(differ)} differ from {', '.join(paths)}{edited}; set another "
                              "data.data_dir, or delete that directory to rebuild")
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
