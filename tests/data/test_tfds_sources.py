"""TFDS math sources: math_sets records, skip counts stored with the data, no TensorFlow; the Grain
loader: shards per process, seeded epochs, exact resume from a saved state and, in two JAX
processes, across kill -9."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from topd_jax.data import math_sets
from topd_jax.data import tfds_sources as ts

DATA = "/work/shared/data"
REAL = {  # layout -> (file, rows)
    "aime24": ("aime24.jsonl", 30),
    "aime25": ("aime25.jsonl", 30),
    "amc23": ("amc23.jsonl", 40),
    "math500": ("math500.jsonl", 500),
    "gsm8k": ("gsm8k_test.jsonl", 1319),
}

GOOD = [{"q": f"What is {i} + {i}?", "a": str(2 * i), "key": f"k{i}"} for i in range(6)]
BAD_LINES = [  # reason -> one raw JSONL line
    ("not valid UTF-8", b'{"q": "caf\xe9", "a": "1", "key": "x"}'),
    ("not JSON", b'{"q": "unterminated'),
    ("not a JSON object", b'["q", "a"]'),
    ("missing field 'a'", json.dumps({"q": "no answer", "key": "m"}).encode()),
    ("empty problem", json.dumps({"q": "   ", "a": "1", "key": "e"}).encode()),
    ("empty answer", json.dumps({"q": "Why?", "a": "", "key": "f"}).encode()),
]


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.fixture
def mixed_jsonl(tmp_path):
    """Good records interleaved with one bad record of every kind, plus a blank line."""
    lines = []
    for good, (_, bad) in zip(GOOD, BAD_LINES):
        lines += [json.dumps(good).encode(), bad]
    lines.append(b"   ")
    return _write_jsonl(tmp_path / "mixed.jsonl", lines)


def _build_mixed(path, data_dir, **kw):
    return ts.build_dataset(path, layout="prompts", data_dir=data_dir, name="mixed",
                            problem_field="q", answer_field="a", **kw)


# --- building and reading ---------------------------------------------------------------------


def test_bad_records_are_skipped_and_counted_by_reason(mixed_jsonl, tmp_path):
    builder = _build_mixed(mixed_jsonl, tmp_path / "tfds", id_field="key")
    skipped = builder.info.metadata["skipped"]
    assert skipped == {reason: 1 for reason, _ in BAD_LINES}
    stored = json.load(open(os.path.join(builder.data_dir, "metadata.json")))
    assert stored["skipped"] == skipped
    source = ts.open_source(tmp_path / "tfds", "mixed")
    assert [source[i] for i in range(len(source))] == [
        {"problem": g["q"], "answer": g["a"], "id": g["key"]} for g in GOOD]


def test_line_index_is_the_default_id(mixed_jsonl, tmp_path):
    _build_mixed(mixed_jsonl, tmp_path / "tfds")
    source = ts.open_source(tmp_path / "tfds", "mixed")
    assert [source[i]["id"] for i in range(len(source))] == [str(2 * i + 1) for i in range(6)]


def test_parquet_source_with_bad_text_and_a_corrupt_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    problems = [b"P0", b"P1", b"bad \xff", b"P3", b"P4", b"P5"]
    table = pa.table({"problem": pa.array(problems, pa.binary()),
                      "answer": [str(i) for i in range(6)], "id": [f"r{i}" for i in range(6)]})
    path = str(tmp_path / "prompts.parquet")
    pq.write_table(table, path, row_group_size=2, write_page_checksum=True)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)  # Rows 4 and 5.
    with open(path, "r+b") as f:  # Flip the bytes of that chunk's data: its checksum fails.
        f.seek(column.data_page_offset + column.total_compressed_size - 4)
        f.write(b"\x00\x00\x00\x00")
    builder = ts.build_dataset(path, layout="prompts", data_dir=tmp_path / "tfds", id_field="id")
    assert builder.info.metadata["skipped"] == {"not valid UTF-8": 1, "unreadable row group": 2}
    source = ts.open_source(tmp_path / "tfds", "prompts")
    assert [source[i] for i in range(len(source))] == [
        {"problem": f"P{i}", "answer": str(i), "id": f"r{i}"} for i in (0, 1, 3)]


def test_several_files_become_one_dataset_with_file_prefixed_ids(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "A", "answer": "1"}).encode()])
    b = _write_jsonl(tmp_path / "b.jsonl", [json.dumps({"problem": "B", "answer": "2"}).encode()])
    ts.build_dataset([a, b], layout="prompts", data_dir=tmp_path / "tfds", name="ab")
    source = ts.open_source(tmp_path / "tfds", "ab")
    assert [source[i]["id"] for i in range(len(source))] == ["a.jsonl:1", "b.jsonl:1"]


def test_rebuild_reuses_the_written_dataset(mixed_jsonl, tmp_path):
    first = _build_mixed(mixed_jsonl, tmp_path / "tfds")
    shard = next(p for p in os.listdir(first.data_dir) if ".array_record" in p)
    stamp = os.stat(os.path.join(first.data_dir, shard)).st_mtime_ns
    again = _build_mixed(mixed_jsonl, tmp_path / "tfds")
    assert again.data_dir == first.data_dir
    assert os.stat(os.path.join(again.data_dir, shard)).st_mtime_ns == stamp
    assert again.info.metadata["skipped"] == first.info.metadata["skipped"]


def test_rebuild_from_a_changed_source_under_the_same_name_is_an_error(mixed_jsonl, tmp_path):
    _build_mixed(mixed_jsonl, tmp_path / "tfds")
    with open(mixed_jsonl, "ab") as f:
        f.write(json.dumps({"q": "new", "a": "1"}).encode() + b"\n")
    with pytest.raises(ValueError, match="built from another source"):
        _build_mixed(mixed_jsonl, tmp_path / "tfds")


def test_a_source_without_usable_records_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [b"not json", b'{"problem": "P"}'])
    with pytest.raises(ValueError, match="no usable records"):
        ts.build_dataset(path, layout="prompts", data_dir=tmp_path / "tfds")


def test_missing_inputs_and_unknown_layouts_are_named(mixed_jsonl, tmp_path):
    with pytest.raises(FileNotFoundError, match="math source file not found"):
        ts.build_dataset(tmp_path / "nope.jsonl", layout="aime24", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="call build_dataset first"):
        ts.open_source(tmp_path, "nope")
    with pytest.raises(ValueError, match="unknown math set layout 'aime26'"):
        ts.build_dataset(mixed_jsonl, layout="aime26", data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()


def test_tensorflow_is_never_imported(tmp_path):
    src = _write_jsonl(tmp_path / "p.jsonl", [json.dumps({"problem": "P", "answer": "1"}).encode()])
    script = textwrap.dedent(f"""
        import sys
        from topd_jax.data import tfds_sources as ts
        ts.build_dataset({src!r}, layout="prompts", data_dir={str(tmp_path / "tfds")!r})
        source = ts.open_source({str(tmp_path / "tfds")!r}, "p")
        assert source[0] == {{"problem": "P", "answer": "1", "id": "1"}}, source[0]
        assert [r["id"] for r in next(iter(ts.loader(source, batch_size=2)))] == ["1", "1"]
        bad = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        assert not bad, bad
        print("NO_TF")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "NO_TF" in run.stdout, run.stderr[-2000:]


# --- the real eval files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sources(tmp_path_factory):
    if not os.path.isdir(DATA):
        pytest.skip(f"real eval files not present at {DATA}")
    data_dir = tmp_path_factory.mktemp("real_tfds")
    builders = {layout: ts.build_dataset(os.path.join(DATA, f), layout=layout, data_dir=data_dir,
                                         name=layout) for layout, (f, _) in REAL.items()}
    return data_dir, builders


@pytest.mark.parametrize("layout", list(REAL))
def test_real_eval_file_builds_every_row(layout, real_sources):
    data_dir, builders = real_sources
    assert sum(builders[layout].info.metadata["skipped"].values()) == 0
    source = ts.open_source(data_dir, layout)
    assert len(source) == REAL[layout][1]
    plain, _ = math_sets.read_records(os.path.join(DATA, REAL[layout][0]), layout)
    for i in (0, len(source) - 1):  # The TFDS records are those of the plain reader.
        rec = source[i]
        assert all(isinstance(v, str) and v for v in rec.values())
        assert rec == dataclasses.asdict(plain[i])
    if layout == "math500":
        assert not any(source[i]["problem"].startswith("Return your") for i in range(20))
    if layout == "amc23":
        assert source[0]["answer"] == "27"
    if layout == "aime25":
        assert source[0]["id"] == "1"


# --- the Grain loader: sharding and resume ----------------------------------------------------

SOURCE = [{"id": str(i)} for i in range(10)]


def _ids(batch):
    return [r["id"] for r in batch]


def _stream(source=SOURCE, **kw):
    return iter(ts.loader(source, **kw))


def _take(stream, n):
    return [_ids(next(stream)) for _ in range(n)]


@pytest.mark.parametrize("hosts, sizes", [(2, [5, 5]), (4, [3, 3, 2, 2])])
def test_process_shards_partition_the_records_and_each_epoch_covers_its_shard(hosts, sizes):
    shards = []
    for i, size in enumerate(sizes):  # one record a batch: two epochs of process i's shard
        records = sum(_take(_stream(batch_size=hosts, seed=3, process_index=i, process_count=hosts), 2 * size), [])
        first, second = records[:size], records[size:]
        assert len(set(first)) == size and sorted(second) == sorted(first)  # each epoch: the shard once
        assert sorted(first, key=int) == [str(k) for k in range(i, 10, hosts)]  # every n-th record from i
        shards.append(set(first))
    assert set.union(*shards) == {r["id"] for r in SOURCE} and sum(map(len, shards)) == 10  # a partition


def test_each_epoch_of_a_shard_is_a_seeded_permutation_and_epochs_differ():
    stream = _stream(batch_size=5, seed=0)
    epochs = [sum(_take(stream, 2), []) for _ in range(3)]
    assert all(sorted(e, key=int) == [str(i) for i in range(10)] for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_batches_are_deterministic_and_depend_on_the_seed():
    a, b, c = (_take(_stream(batch_size=4, seed=s), 5) for s in (0, 0, 1))
    assert a == b and a != c


def test_unshuffled_loader_streams_each_shard_in_record_order():
    stream = _stream(batch_size=4, shuffle=False, process_index=1, process_count=2)
    assert _take(stream, 3) == [["1", "3"], ["5", "7"], ["9", "1"]]


@pytest.mark.parametrize("process_index", [0, 1])
def test_a_saved_state_resumes_the_uninterrupted_stream(process_index):
    kw = dict(batch_size=4, seed=7, process_index=process_index, process_count=2)
    expected = _take(_stream(**kw), 9)
    first = _stream(**kw)
    got = _take(first, 4)
    state = first.get_state()
    restarted = _stream(**kw)
    restarted.set_state(state)
    assert got + _take(restarted, 5) == expected


def test_batch_size_must_split_evenly_over_processes():
    with pytest.raises(ValueError, match="not a positive multiple of process_count 4"):
        ts.loader(SOURCE, batch_size=6, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index 2 not in"):
        ts.loader(SOURCE, batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="10 records cannot be shared by 16 processes"):
        ts.loader(SOURCE, batch_size=16, process_index=0, process_count=16)


def test_loader_over_a_built_source_returns_text_records(real_sources):
    data_dir, _ = real_sources
    source = ts.open_source(data_dir, "aime25")
    ids = sum((_ids(next(_stream(source, batch_size=8, process_index=i, process_count=2))) for i in range(2)), [])
    assert len(set(ids)) == 8 and all(isinstance(i, str) for i in ids)


def test_records_keep_a_subset_and_resume_after_the_run_folder_moved(mixed_jsonl, tmp_path):
    _build_mixed(mixed_jsonl, tmp_path / "a", id_field="key")
    subset = ts.open_source(tmp_path / "a", "mixed", keys=[4, 1, 3])
    assert [subset[i]["id"] for i in range(3)] == ["k4", "k1", "k3"] and len(subset) == 3
    assert [r["id"] for r in subset.read([2, 0, 2])] == ["k3", "k4", "k3"]  # the batched read
    with pytest.raises(ValueError, match="record keys outside"):
        ts.open_source(tmp_path / "a", "mixed", keys=[6])
    stream = _stream(subset, batch_size=2, seed=1)
    _take(stream, 2)
    state = stream.get_state()
    expected = _take(stream, 3)
    os.rename(tmp_path / "a", tmp_path / "b")  # the state names no file
    moved = _stream(ts.open_source(tmp_path / "b", "mixed", keys=[4, 1, 3]), batch_size=2, seed=1)
    moved.set_state(state)
    assert _take(moved, 3) == expected


_KILLED_RUN = textwrap.dedent("""
    import os
    import sys

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    data_dir, ckpt, process_id, port, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import grain
    from topd_jax.data import tfds_sources as ts
    from topd_jax.trainer.checkpointing import Checkpointer

    stream = iter(ts.loader(ts.open_source(data_dir, "mixed"), batch_size=4, seed=5,
                            process_index=jax.process_index(), process_count=jax.process_count()))
    checkpointer = Checkpointer(ckpt, every=1, keep=2)
    step = 0
    if checkpointer.latest_step() is not None:  # resume: the step and this process's stream state
        step = checkpointer.latest_step()
        assert checkpointer.restore_other(step, {"prompts": grain.checkpoint.CheckpointRestore(stream)}) == ["prompts"]
    while step < steps:
        ids = [r["id"] for r in next(stream)]
        step += 1
        checkpointer.save(step, {}, {"meta": {"step": step}}, other={"prompts": grain.checkpoint.CheckpointSave(stream)})
        print("batch", step, *ids, flush=True)
    checkpointer.close()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_resume_their_streams_exactly_after_kill_9(mixed_jsonl, tmp_path):
    """Two JAX processes (jax.distributed on localhost) each read their shard, saving the Grain
    state with one Orbax checkpoint every batch; both killed (SIGKILL) mid-run and started again,
    each reads from the newest complete checkpoint on exactly the batches of an uninterrupted run."""
    _build_mixed(mixed_jsonl, tmp_path / "tfds", id_field="key")
    steps = 16

    def run(ckpt, kill_after=None):
        port, logs = _free_port(), [tmp_path / f"stderr{i}.txt" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path / "tfds"), str(ckpt), str(i),
                                   str(port), str(steps)], stdout=subprocess.PIPE, stderr=open(logs[i], "w"),
                                  text=True) for i in range(2)]
        lines = [[], []]
        for line in procs[0].stdout:  # the processes' own lines: 'batch STEP ID ID'
            lines[0] += [line.split()[1:]] if line.startswith("batch ") else []
            if kill_after is not None and len(lines[0]) == kill_after:
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                break
        lines[1] = [line.split()[1:] for line in procs[1].stdout if line.startswith("batch ")]
        for p in procs:
            p.wait(timeout=120)
        errors = "\n".join(log.read_text()[-1500:] for log in logs)
        return [p.returncode for p in procs], [{int(s): ids for s, *ids in out} for out in lines], errors

    codes, straight, errors = run(tmp_path / "straight")
    assert codes == [0, 0] and all(sorted(s) == list(range(1, steps + 1)) for s in straight), errors
    shards = [set(sum(s.values(), [])) for s in straight]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {g["key"] for g in GOOD}
    assert sorted(os.listdir(tmp_path / "straight" / str(steps) / "prompts")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]  # Grain's state, one file a process
    codes, before, _ = run(tmp_path / "killed", kill_after=4)
    assert codes == [-signal.SIGKILL] * 2
    assert all(b[s] == a[s] for a, b in zip(straight, before) for s in b)
    codes, after, errors = run(tmp_path / "killed")
    assert codes == [0, 0], errors
    for a, b in zip(straight, after):  # from the newest complete checkpoint (step 3 at least) on
        assert 4 <= min(b) < steps and sorted(b) == list(range(min(b), steps + 1))
        assert all(b[s] == a[s] for s in b)


def test_a_source_edited_after_its_build_is_a_one_line_error_naming_the_file(mixed_jsonl, tmp_path):
    from topd_jax.configuration import ConfigError

    _build_mixed(mixed_jsonl, tmp_path / "tfds")
    with open(mixed_jsonl, "ab") as f:
        f.write(json.dumps({"q": "edited", "a": "1"}).encode() + b"\n")
    with pytest.raises(ConfigError) as info:
        _build_mixed(mixed_jsonl, tmp_path / "tfds")
    message = str(info.value)
    assert "\n" not in message and str(mixed_jsonl) in message
    assert "its sha256 differ" in message and "edited since it was built" in message and "data.data_dir" in message
