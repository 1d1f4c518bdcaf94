"""Prompt sources: random, synthetic and TFDS (per-host, through Grain) batches, a trainer step on TFDS
prompts, and a trainer resuming the TFDS prompt stream exactly."""

import json

import numpy as np
import pytest
from flax import nnx

from test_eval import VOCAB, tiny_tokenizer
from topd_jax.models.checkpoint import save_pretrained
from topd_jax.models.decoder import CausalLM
from topd_jax.models.tokenizer import load_tokenizer
from topd_jax.prompts import RandomPrompts, SyntheticPrompts, TfdsPrompts, left_pad
from topd_jax.trainer.config import RandomModelConfig, load_config
from topd_jax.trainer.flops import PhaseTimer
from topd_jax.trainer.loop import Trainer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_pretrained(CausalLM(RandomModelConfig(vocab_size=VOCAB).model_config(), rngs=nnx.Rngs(0)), path)
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [json.dumps({"problem": " ".join(["What", "is", "1+1?", f"w{10 + i}"] + ["w1"] * (i % 2)), "answer": "2"})
             for i in range(12)]  # twelve distinct prompts
    lines += ["{not json", json.dumps({"problem": "", "answer": "2"}),
              json.dumps({"problem": " ".join(["w2"] * 40), "answer": "2"})]  # too long for the prompts
    path.write_text("\n".join(lines) + "\n")
    return path


def test_left_pad_refuses_empty_and_overlong_rows():
    tokens, mask = left_pad([[5, 6], [7]], 3)
    assert tokens.tolist() == [[0, 5, 6], [0, 0, 7]] and mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="prompt 0 has 4 tokens"):
        left_pad([[1, 2, 3, 4]], 3)


def test_random_and_synthetic_batches_are_pure_functions_of_the_index():
    random = RandomPrompts(vocab_size=50, prompt_length=6, batch_size=4, seed=1)
    assert np.array_equal(random.batch(3)[0], random.batch(3)[0])
    assert not np.array_equal(random.batch(3)[0], random.batch(4)[0])
    synthetic = SyntheticPrompts(prompt_length=14, batch_size=4, seed=1)
    tokens, mask = synthetic.batch(2)
    assert mask[:, -1].all() and np.array_equal(tokens, synthetic.batch(2)[0])


def _rows(tokens):
    return [tuple(row) for row in tokens.tolist()]


def test_tfds_prompts_shard_the_records_over_hosts_and_count_skips(hf_dir, problems_file, tmp_path):
    tokenizer = load_tokenizer(hf_dir)
    kw = dict(layout="prompts", data_dir=tmp_path / "tfds", prompt_length=16, batch_size=4, seed=0)
    hosts = [TfdsPrompts(problems_file, tokenizer, process_index=i, process_count=2, **kw) for i in range(2)]
    assert hosts[0].skipped["not JSON"] == 1 and hosts[0].skipped["empty problem"] == 1
    assert hosts[0].skipped["longer than prompt_length=16 tokens"] == 1
    one = TfdsPrompts(problems_file, tokenizer, process_index=0, process_count=1, **kw)
    every = sum((_rows(one.batch(i)[0]) for i in range(3)), [])  # one epoch: the 12 usable prompts
    assert len(set(every)) == 12
    shards = []
    for host in hosts:  # a shard of 6 prompts, 2 a batch: batches 3 to 5 are its second epoch
        batches = [host.batch(i) for i in range(6)]
        assert all(t.shape == (2, 16) and m.shape == (2, 16) and m[:, -1].all() for t, m in batches)
        rows = sum((_rows(t) for t, _ in batches), [])
        assert len(set(rows[:6])) == 6 and sorted(rows[6:]) == sorted(rows[:6])
        shards.append(set(rows))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(every)


def test_tfds_prompts_read_in_order_and_restart_for_an_earlier_index(hf_dir, problems_file, tmp_path):
    kw = dict(layout="prompts", data_dir=tmp_path / "tfds", prompt_length=16, batch_size=4, seed=3)
    prompts = TfdsPrompts(problems_file, load_tokenizer(hf_dir), **kw)
    straight = [_rows(prompts.batch(i)[0]) for i in range(5)]
    assert prompts.position == 5
    assert _rows(prompts.batch(1)[0]) == straight[1] and prompts.position == 2  # restarted, read up to 1
    assert _rows(prompts.batch(4)[0]) == straight[4]  # read on from 2, batches 2 and 3 passed over
    with pytest.raises(ValueError, match="batch index must be >= 0"):
        prompts.batch(-1)


def test_a_resumed_trainer_continues_the_tfds_prompt_stream_exactly(hf_dir, problems_file, tmp_path):
    """The Grain stream's state is saved with the Orbax checkpoint and restored on resume: the
    prompts after the resume are the uninterrupted run's; a checkpoint without it (written before
    the stream was saved) resumes by reading up to the saved batch index, to the same prompts."""
    import shutil

    config = load_config("configs/tiny_cpu.yaml", [
        f"output_dir={tmp_path}", f"student.path={hf_dir}", f"teacher.path={hf_dir}", "data.source=tfds",
        f"data.path={problems_file}", "data.prompt_length=16", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.async_save=false"])
    trainer = Trainer(config)
    try:
        for _ in range(4):  # batches 0-3: past the first epoch of 12 prompts
            trainer.prompts.batch(trainer.data_position)
            trainer.data_position += 1
        assert trainer.save(force=True)
        uninterrupted = [_rows(trainer.prompts.batch(i)[0]) for i in (4, 5)]
    finally:
        trainer.close()
    state = tmp_path / "checkpoints" / "0" / "prompts" / "process_0-of-1.json"
    assert json.loads(state.read_text()) == {"next_index": 4}  # Grain's own state file: batches 0-3 read
    resumed = Trainer(config)
    try:
        assert resumed.data_position == 4 and resumed.prompts.position == 4  # the restored stream, no read-ahead
        assert [_rows(resumed.prompts.batch(i)[0]) for i in (4, 5)] == uninterrupted
    finally:
        resumed.close()
    shutil.rmtree(state.parent)  # a checkpoint from before the stream was saved with it
    older = Trainer(config)
    try:
        assert older.data_position == 4 and older.prompts.position == 0
        assert [_rows(older.prompts.batch(i)[0]) for i in (4, 5)] == uninterrupted
    finally:
        older.close()


def test_a_trainer_step_on_tfds_prompts(hf_dir, problems_file, tmp_path):
    config = load_config("configs/tiny_cpu.yaml", [
        f"output_dir={tmp_path}", f"student.path={hf_dir}", f"teacher.path={hf_dir}", "data.source=tfds",
        f"data.path={problems_file}", "data.prompt_length=16", "rollout.max_new_tokens=6", "loss.window=3",
        "loss.max_candidates=2", "logging.progress=false"])
    trainer = Trainer(config)
    metrics = trainer.train_step(PhaseTimer())
    trainer.close()
    assert np.isfinite(metrics["loss"]) and (tmp_path / "data" / "math_source").is_dir()


def test_jsonl_prompts_accept_a_bom_and_count_bad_lines_by_reason(hf_dir, tmp_path):
    from topd_jax.prompts import JsonlPrompts

    good = [json.dumps({"problem": f"What is {i}+1?"}) for i in range(7)]
    bad = ["{not json", json.dumps({"question": "no problem field"}), json.dumps({"problem": ""}),
           json.dumps(["a list"]), json.dumps({"problem": " ".join(["w2"] * 40)})]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(good[:1] + bad + good[1:]).encode() + b"\n")
    prompts = JsonlPrompts(path, load_tokenizer(hf_dir), field="problem", prompt_length=16, batch_size=2, seed=0)
    assert len(prompts.rows) == 7  # the first line, behind its BOM, is one of them
    assert dict(prompts.skipped) == {"not valid UTF-8 JSON": 1, "missing or empty 'problem'": 3,
                                     "longer than prompt_length=16 tokens": 1}


def test_the_trainer_reports_skipped_prompt_records_at_start_up(hf_dir, problems_file, tmp_path, capsys):
    config = load_config("configs/tiny_cpu.yaml", [
        f"output_dir={tmp_path}", f"student.path={hf_dir}", f"teacher.path={hf_dir}", "data.source=jsonl",
        f"data.path={problems_file}", "data.prompt_length=16", "logging.progress=false", "logging.tensorboard=false"])
    trainer = Trainer(config)
    try:
        trainer.run(until=0)  # start-up only
    finally:
        trainer.close()
    line = f"data: skipped 3 records of {problems_file} (longer than prompt_length=16 tokens: 1, " \
           "missing or empty 'problem': 1, not valid UTF-8 JSON: 1)"
    assert line in (tmp_path / "events.log").read_text()
    assert line in capsys.readouterr().out  # printed at start-up too


def test_every_data_source_is_one_entry_of_the_prompt_source_table():
    from typing import get_args, get_type_hints

    from topd_jax.prompts import PROMPT_SOURCES, PromptSource
    from topd_jax.trainer.config import DataConfig

    assert set(PROMPT_SOURCES) == set(get_args(get_type_hints(DataConfig)["source"]))  # the config's choices
    assert all(issubclass(s, PromptSource) for s in PROMPT_SOURCES.values())
    # Only the synthetic task can label forks (the oracle locator's input); it brings its tokenizer.
    assert [n for n, s in PROMPT_SOURCES.items() if s.labeller is not None] == ["synthetic"]
    source = PROMPT_SOURCES["synthetic"].from_config(DataConfig(source="synthetic", prompt_length=14), batch_size=2,
                                                     seed=0, vocab_size=64, tokenizer=None, data_dir="unused")
    tokens, mask = source.batch(0)
    positions = np.array([[0, 1], [2, 99]])
    labels = source.labeller(tokens, np.zeros((2, 4), np.int32), positions)
    assert labels.shape == (2, 2) and labels.dtype == np.int32 and labels[1, 1] == -1
    assert source.tokenizer is not None and PROMPT_SOURCES["random"].tokenizer is None
