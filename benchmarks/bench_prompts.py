"""Prompt reading throughput: the hand-written sharded reader Grain replaced, against Grain, in one run.

    python benchmarks/bench_prompts.py                 # 20,000 generated records, 40,000 prompts read
    python benchmarks/bench_prompts.py --quick         # a smoke run
    python benchmarks/bench_prompts.py --file F --layout gsm8k   # a real file instead

One TFDS ArrayRecord dataset is built (`tfds_sources.build_dataset`, into a temporary folder) from
`--file`, or from `--records` generated math-like problems (seeded; 150 to 600 characters, about
the length of MATH problems). Then N prompts are read, G at a time (one process of one, a
seeded per-epoch permutation, as training reads them), through

  old    `ShardedReader.batch(i)` over TFDS's own `as_data_source` (the reader of
         topd_jax/data/tfds_sources.py up to commit 582c5a3, kept below verbatim as the baseline):
         a numpy permutation per epoch, TFDS decoding each record in the calling thread;
  grain  `next()` of the `tfds_sources.loader` iterator (the trainer's path): a Grain dataset
         pipeline (record keys, shard, `EpochBatches`: a numpy permutation per epoch and
         batches of keys) whose batches read their records
         in one call (grain's ArrayRecordDataSource, batched) and decode them (`Records`), one
         Grain thread reading ahead (`tfds_sources.READ_OPTIONS`);
  grain, no read-ahead   the same with `ReadOptions(num_threads=0)`: every batch read in the
         calling thread;
  grain DataLoader   `grain.DataLoader` with an `IndexSampler` and `ShardOptions` over the same
         `Records` (records read one at a time, Grain's default 16 threads): the other way Grain
         offers, measured for the record (docs/data_and_eval.md).

Each reader reads one batch first (files opened, threads started), then N prompts are timed;
`--repeats` rounds, the best of each reader reported. Tokenization is not included (the same
`encode_prompts` call on both paths). Prints prompts/s of each and grain / old.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from topd_jax.data import tfds_sources


class ShardedReader:  # the baseline, verbatim from topd_jax/data/tfds_sources.py at commit 582c5a3
    """Deterministic per-host batches of a random-access source, resumable from `position`."""

    def __init__(self, source: Sequence[dict[str, Any]], *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 position: int = 0):
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
        n, per_host = len(self.source), self.batch_size // self.process_count
        start = index * self.batch_size + self.process_index * per_host
        positions = range(start, start + per_host)
        return [int(self._epoch_order(p // n)[p % n]) for p in positions]

    def batch(self, index: int) -> list[dict[str, Any]]:
        return [self.source[i] for i in self.indices(index)]


class TextSource(Sequence):  # the baseline's source, verbatim: TFDS's data source, bytes decoded to str
    def __init__(self, source: Sequence[dict[str, Any]]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, str]:
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in self._source[int(i)].items()}


def generated_file(path: str, records: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["Let", "the", "integer", "x", "satisfy", "find", "sum", "of", "all", "real", "roots", "triangle",
             "with", "sides", "probability", "that", "$n$", "is", "divisible", "by", "$7$", "compute", "area"]
    with open(path, "w") as f:
        for i in range(records):
            text = " ".join(rng.choice(words, size=int(rng.integers(30, 120))))
            f.write(json.dumps({"problem": text, "answer": str(int(rng.integers(0, 1000)))}) + "\n")
    return path


def old_reader(data_dir: str, name: str, batch_size: int, seed: int):
    import tensorflow_datasets as tfds

    path = os.path.join(data_dir, "math_source", name, "1.0.0")
    reader = ShardedReader(TextSource(tfds.builder_from_directory(path).as_data_source(split="train")),
                           batch_size=batch_size, seed=seed)
    index = iter(range(1 << 62))
    return lambda: reader.batch(next(index))


def grain_reader(data_dir: str, name: str, batch_size: int, seed: int, read_options=None):
    stream = iter(tfds_sources.loader(tfds_sources.open_source(data_dir, name), batch_size=batch_size, seed=seed,
                                      read_options=read_options))
    return lambda: next(stream)


def dataloader_reader(data_dir: str, name: str, batch_size: int, seed: int):
    records = tfds_sources.open_source(data_dir, name)
    shard = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    sampler = grain.samplers.IndexSampler(num_records=len(records), shard_options=shard, shuffle=True, seed=seed)
    stream = iter(grain.DataLoader(data_source=records, sampler=sampler, shard_options=shard,
                                   operations=[grain.transforms.Batch(batch_size, drop_remainder=True, batch_fn=list)]))
    return lambda: next(stream)


def timed(make, prompts: int, batch_size: int) -> float:
    """Prompts per second of `prompts` prompts read after one warm-up batch."""
    read = make()
    first = read()
    assert len(first) == batch_size and all(r["problem"] for r in first)
    start = time.perf_counter()
    for _ in range(prompts // batch_size):
        read()
    return (prompts // batch_size) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", help="a JSONL or Parquet math file (default: generated records)")
    parser.add_argument("--layout", default="prompts", help="the file's layout (topd_jax.data.math_sets)")
    parser.add_argument("--records", type=int, default=None, help="generated records (default 20000, quick 500)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts read per reader (default 40000, quick 1000)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per batch G (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds; best of each (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke sizes")
    args = parser.parse_args()
    records = args.records or (500 if args.quick else 20_000)
    prompts = args.prompts or (1_000 if args.quick else 40_000)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.file or generated_file(os.path.join(tmp, "bench.jsonl"), records)
        start = time.perf_counter()
        builder = tfds_sources.build_dataset(source, layout=args.layout, data_dir=os.path.join(tmp, "tfds"),
                                             name="bench")
        size = builder.info.splits["train"].num_examples
        print(f"dataset: {size} records from {source if args.file else 'generated'} "
              f"(built in {time.perf_counter() - start:.1f} s); {prompts} prompts per reader, G = {args.batch_size}, "
              f"{repeats} round(s), grain {grain.__version__}")
        data_dir, seed, g = os.path.join(tmp, "tfds"), 0, args.batch_size
        readers = {
            "old (ShardedReader over TFDS as_data_source)": lambda: old_reader(data_dir, "bench", g, seed),
            f"grain (tfds_sources.loader, {tfds_sources.READ_OPTIONS.num_threads} read-ahead thread)":
                lambda: grain_reader(data_dir, "bench", g, seed),
            "grain, no read-ahead (num_threads=0)":
                lambda: grain_reader(data_dir, "bench", g, seed, grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
            "grain DataLoader + IndexSampler (not used)": lambda: dataloader_reader(data_dir, "bench", g, seed),
        }
        best = {name: 0.0 for name in readers}
        for _ in range(repeats):  # interleaved rounds: a busy machine slows every reader alike
            for name, make in readers.items():
                best[name] = max(best[name], timed(make, prompts, g))
        old = next(iter(best.values()))
        for name, rate in best.items():
            print(f"  {name:<48} {rate:>10,.0f} prompts/s   {rate / old:5.2f} x old")


if __name__ == "__main__":
    main()
