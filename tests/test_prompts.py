"""Prompt sources: random, synthetic and TFDS (per-host) batches, and a trainer step on TFDS prompts."""

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
    lines = [json.dumps({"problem": " ".join(["What", "is", "1+1?"] + ["w1"] * (i % 3)), "answer": "2"})
             for i in range(12)]
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


def test_tfds_prompts_split_each_global_batch_over_hosts_and_count_skips(hf_dir, problems_file, tmp_path):
    tokenizer = load_tokenizer(hf_dir)
    kw = dict(layout="prompts", data_dir=tmp_path / "tfds", prompt_length=16, batch_size=4, seed=0)
    hosts = [TfdsPrompts(problems_file, tokenizer, process_index=i, process_count=2, **kw) for i in range(2)]
    assert hosts[0].skipped["not JSON"] == 1 and hosts[0].skipped["empty problem"] == 1
    assert hosts[0].skipped["longer than prompt_length=16 tokens"] == 1
    one = TfdsPrompts(problems_file, tokenizer, process_index=0, process_count=1, **kw)
    for index in range(5):  # 12 usable prompts: batches 3 and 4 wrap into the second epoch
        local = [h.batch(index) for h in hosts]
        assert all(t.shape == (2, 16) for t, _ in local)
        np.testing.assert_array_equal(np.concatenate([t for t, _ in local]), one.batch(index)[0])


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
