"""TFDS builders (ArrayRecord, no TensorFlow) for local math files, read per process through Grain.

Local JSONL or Parquet files become a TFDS dataset of three text features, `problem`, `answer`
and `id`, written as ArrayRecord in file order (shuffling is the reader's job, not the writer's).
The records are those of `math_sets.iter_records`: its module docstring holds the layout table
(`prompts` and the published eval sets), the text rules and the skip reasons. When several files
make one dataset, a line-number id is prefixed by its file name ("a.jsonl:3"). Bad records are
skipped and counted; the counts by reason are logged at the end of building and stored with the
data (`builder.info.metadata["skipped"]`, in `metadata.json`), so a broken line never stops an
epoch.

TFDS imports TensorFlow lazily, only for `tf.data`; building with `file_format="array_record"`
and reading with Grain never touch it.

Reading is Grain's (`grain`): `Records` is a Grain data source over the split's ArrayRecord files
(`grain.sources.ArrayRecordDataSource` reads the serialized examples, many at once in its C++
threads; TFDS's feature spec decodes them with numpy), optionally restricted to some of its
records. `loader` is one process's endless stream of batches over it, a Grain dataset pipeline:
the record keys, process p of n taking every n-th from p (Grain's sharding idiom `ds[p::n]`:
the shards partition the records), batches of keys in a seeded permutation per epoch
(`EpochBatches`, a Grain MapDataset of ours, see its docstring), each batch read in one call
(`map`), read ahead by Grain's threads
(`to_iter_dataset`). Its iterator is checkpointable: `get_state()` / `set_state()`, and
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` save and restore it as an item of an
Orbax checkpoint (one file per process).

What stays ours: `Records` (Grain's ArrayRecord source yields bytes: the batched read, TFDS's
example decoding and the subset of usable records are ours, a few lines), `EpochBatches` (one
numpy permutation per epoch and one gather per batch: Grain's index shuffle costs 17-20 ms per
epoch of a small set) and
the pipeline's options. `grain.DataLoader` with an `IndexSampler` and `ShardOptions` does the same job but reads
records one at a time behind a per-record sampler (a Philox generator each) and read about a
sixth as fast as the reader it replaced (benchmarks/bench_prompts.py, docs/data_and_eval.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grain
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
            disable_shuffling=True,  # Keep file order; the Grain sampler shuffles.
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


def open_source(data_dir: str | os.PathLike, name: str, split: str = "train",
                keys: Sequence[int] | None = None) -> "Records":
    """Random-access records (dicts of str) of a dataset that `build_dataset` wrote, a Grain data
    source (`Records`); `keys`: only those records, in that order."""
    path = os.path.join(os.fspath(data_dir), _BUILDER_NAME, name, _VERSION)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no built math dataset at {path}; call build_dataset first")
    return Records(tfds.builder_from_directory(path).info, split, keys)


class Records:
    """A Grain data source of a built split: record k is a dict of str {problem, answer, id}.

    `grain.sources.ArrayRecordDataSource` reads the serialized examples from the split's
    ArrayRecord files (TFDS's file instructions); TFDS's feature spec decodes them
    (`deserialize_example_np`: numpy, no TensorFlow) and the bytes become str. With `keys`, record
    k is the split's record keys[k] (the records a pipeline may use). `read(ks)` reads many
    records in one call (ArrayRecord's batched read, in its C++ threads), as `loader` does.
    """

    def __init__(self, info: tfds.core.DatasetInfo, split: str = "train", keys: Sequence[int] | None = None):
        from tensorflow_datasets.core.data_sources import base

        self._info, self._split = info, split
        self._source = grain.sources.ArrayRecordDataSource(base.file_instructions(info, split))
        self._keys = None if keys is None else np.asarray(keys, np.int64)
        if self._keys is not None and len(self._keys) and not 0 <= self._keys.min() <= self._keys.max() < len(
                self._source):
            raise ValueError(f"record keys outside [0, {len(self._source)})")

    def __len__(self) -> int:
        return len(self._source) if self._keys is None else len(self._keys)

    def _decode(self, serialized: bytes) -> dict[str, str]:
        example = self._info.features.deserialize_example_np(serialized)
        return {f: v.decode("utf-8") if isinstance(v, bytes) else v for f, v in example.items()}

    def __getitem__(self, k: int) -> dict[str, str]:
        if isinstance(k, slice):
            raise TypeError("Records takes an integer index, not a slice")
        return self._decode(self._source[int(k) if self._keys is None else int(self._keys[k])])

    def read(self, ks: Sequence[int]) -> list[dict[str, str]]:
        """Records ks, in that order, read in one batched call."""
        keys = [int(k) for k in ks] if self._keys is None else self._keys[np.asarray(ks, np.int64)].tolist()
        return [self._decode(serialized) for serialized in self._source.__getitems__(keys)]

    def __repr__(self) -> str:
        return f"Records({self._info.name}/{self._info.config_name}/{self._split}, {len(self)} of {len(self._source)})"


# One read-ahead thread, two batches ahead (the elements of the stream are batches): Grain's
# default of 16 threads and 500 elements is tuned for remote disks; on local ArrayRecord files the
# decoding (Python, under the GIL) is the cost, which more threads do not share out.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


class EpochBatches(grain.MapDataset):
    """Batches of record keys from `keys` [n] repeated without end, epoch e in the seeded
    permutation `numpy.random.default_rng([seed, e]).permutation(n)` (key order when seed is
    None): element j holds the keys of stream positions [j G, (j + 1) G), an epoch's last batch
    running on into the next.

    Ours rather than Grain's `shuffle().repeat().batch()`: Grain's stateless `index_shuffle`
    permutes a domain of at least 2^16 indices and walks each index's cycle back into [0, n),
    17-20 ms per epoch of a set under 65,536 records (340 us per index at n = 50), and its batch
    gathers a Python call per element; here a batch is one numpy gather from a permutation drawn
    once per epoch (docs/data_and_eval.md). Random access by batch index, so Grain's iterator
    state checkpoints it as before.
    """

    def __init__(self, keys: np.ndarray, batch_size: int, seed: int | None):
        super().__init__()
        self._keys = np.asarray(keys, np.int64)
        self._batch = int(batch_size)
        self._seed = None if seed is None else int(seed)
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _order(self, epoch: int) -> np.ndarray:
        order = self._epochs.get(epoch)  # a dict read: safe beside Grain's read-ahead thread
        if order is None:
            n = self._keys.size
            order = (self._keys if self._seed is None
                     else self._keys[np.random.default_rng([self._seed, epoch]).permutation(n)])
            self._epochs = {epoch: order, **{e: o for e, o in self._epochs.items() if e == epoch - 1}}
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = int(index) * self._batch
        first, last = start // self._keys.size, (start + self._batch - 1) // self._keys.size
        stream = np.concatenate([self._order(e) for e in range(first, last + 1)])
        offset = start - first * self._keys.size
        return stream[offset:offset + self._batch]

    def __str__(self) -> str:
        return f"EpochBatches(batch_size={self._batch}, seed={self._seed})"


def loader(source: Sequence[Any], *, batch_size: int, seed: int = 0, process_index: int = 0,
           process_count: int = 1, shuffle: bool = True,
           read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """This process's endless stream of batches (lists) of `batch_size // process_count` records.

    A Grain pipeline (module docstring) over `source`: `Records`, or any sequence of records (a
    list). Process p of n reads the keys p, p + n, p + 2n, ... (the shards partition the
    records); epoch e of a shard is its seeded permutation e (`shuffle=False`: key order);
    batches run on across epochs. `iter(loader(...))` is the checkpointable iterator
    (`get_state` / `set_state`; in an Orbax checkpoint through `grain.checkpoint`).
    """
    if len(source) == 0:
        raise ValueError("the prompt loader needs a non-empty source")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not a positive multiple of "
                         f"process_count {process_count}")
    if process_count > len(source):
        raise ValueError(f"{len(source)} records cannot be shared by {process_count} processes")
    keys = np.arange(len(source))[process_index::process_count]  # Grain's sharding idiom ds[p::n]
    read = source.read if isinstance(source, Records) else (lambda ks: [source[int(k)] for k in ks])
    batches = EpochBatches(keys, batch_size // process_count, seed % 2**32 if shuffle else None).map(read)
    return batches.to_iter_dataset(read_options or READ_OPTIONS)
