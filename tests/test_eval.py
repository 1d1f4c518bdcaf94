"""eval: sampling, grading and aggregation of math benchmarks; the `python -m topd_jax.eval` command line."""

import json
import os

import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from topd_jax import eval as ev
from topd_jax.data.math_sets import MathRecord
from topd_jax.models.checkpoint import save_pretrained
from topd_jax.models.decoder import CausalLM
from topd_jax.models.tokenizer import load_tokenizer
from topd_jax.trainer.config import RandomModelConfig

VOCAB = 128
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = SPECIAL + ["user", "assistant", "system", "What", "is", "1+1?", "\\boxed{2}", "\\boxed{3}"]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]


def tiny_tokenizer(path):
    """A whitespace word-level tokenizer of VOCAB words with a chat template; EOS <|im_end|>."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   chat_template=TEMPLATE, additional_special_tokens=SPECIAL[1:])
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny qwen3 saved as a Hugging Face directory together with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("hf")
    model = CausalLM(RandomModelConfig(vocab_size=VOCAB).model_config(), rngs=nnx.Rngs(0))
    save_pretrained(model, path)
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(hf_dir):
    from topd_jax.models.checkpoint import load_pretrained
    import jax.numpy as jnp

    return load_pretrained(hf_dir, dtype=jnp.float32), load_tokenizer(hf_dir)


def records(n):
    return [MathRecord(id=str(i), problem="What is 1+1?", answer="2") for i in range(n)]


def fake_generation(texts_by_problem):
    """A generate_completions stand-in returning fixed texts (one list per problem, in order)."""
    calls = []

    def fake(model, tokenizer, problems, *, samples, **kwargs):
        calls.append((list(problems), samples, kwargs))
        out = [list(texts_by_problem[i % len(texts_by_problem)]) for i in range(len(problems))]
        return out, [[True] * samples for _ in problems]

    return fake, calls


def test_score_gives_exact_accuracy_avg_and_pass_at_k():
    right, wrong, unboxed = "so \\boxed{2}", "so \\boxed{3}", "it is 2"
    metrics = ev.grade(records(3), [[right, right, right], [wrong, right, wrong], [wrong, wrong, unboxed]],
                       [[True, True, False], [True, True, True], [True, True, True]])
    assert (metrics["n"], metrics["k"], metrics["num_correct"]) == (3, 3, 1)
    assert metrics["accuracy"] == pytest.approx(1 / 3)   # first samples: right, wrong, wrong
    assert metrics["avg@k"] == pytest.approx(4 / 9)
    assert metrics["pass@k"] == pytest.approx(2 / 3)
    assert metrics["boxed"] == pytest.approx(8 / 9) and metrics["finished"] == pytest.approx(8 / 9)
    assert metrics["problems"][2] == {"id": "2", "answer": "2", "extracted": ["3", "3", None],
                                      "correct": [False, False, False], "finished": [True, True, True],
                                      "completions": [wrong, wrong, unboxed]}


def test_score_refuses_ragged_or_missing_completions():
    with pytest.raises(ValueError, match="one row of completions per record"):
        ev.grade(records(2), [["a"]])
    with pytest.raises(ValueError, match="same number"):
        ev.grade(records(2), [["a"], ["a", "b"]])


def test_evaluate_passes_the_protocol_to_generation(monkeypatch):
    fake, calls = fake_generation([["\\boxed{2}", "\\boxed{5}"], ["\\boxed{7}", "\\boxed{2}"]])
    monkeypatch.setattr(ev, "generate_completions", fake)
    metrics = ev.evaluate(None, type("Tok", (), {"eos_token_id": 2})(), records(4), samples=2, temperature=0.7,
                          max_new_tokens=9, batch_size=3, seed=5)
    assert (metrics["accuracy"], metrics["avg@k"], metrics["pass@k"]) == (0.5, 0.5, 1.0)
    problems, samples, kwargs = calls[0]
    assert problems == ["What is 1+1?"] * 4 and samples == 2
    assert kwargs["eos_ids"] == (2,) and kwargs["instruction"] == ev.INSTRUCTION
    assert (kwargs["temperature"], kwargs["max_new_tokens"], kwargs["batch_size"], kwargs["seed"]) == (0.7, 9, 3, 5)


def test_evaluate_samples_a_real_model_end_to_end(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    metrics = ev.evaluate(model, tokenizer, records(3), samples=2, temperature=1.0, max_new_tokens=4, batch_size=2,
                          seed=0)
    assert (metrics["n"], metrics["k"], len(metrics["problems"])) == (3, 2, 3)
    assert all(0 <= metrics[m] <= 1 for m in ("accuracy", "avg@k", "pass@k", "boxed", "finished"))
    texts = [c for p in metrics["problems"] for c in p["completions"]]
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    assert len(set(texts)) > 1  # sampled, and not every row a copy of the padding prompt
    again = ev.evaluate(model, tokenizer, records(3), samples=2, temperature=1.0, max_new_tokens=4, batch_size=2,
                        seed=0)
    assert [p["completions"] for p in again["problems"]] == [p["completions"] for p in metrics["problems"]]


def test_greedy_evaluation_repeats_its_single_completion(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    metrics = ev.evaluate(model, tokenizer, records(2), samples=3, temperature=0.0, max_new_tokens=5, batch_size=4)
    for problem in metrics["problems"]:
        assert len(problem["completions"]) == 3 and len(set(problem["completions"])) == 1
        assert problem["completions"][0]  # five tokens decode to some text
    assert metrics["accuracy"] == metrics["avg@k"] == metrics["pass@k"]


def write_set(directory, answers):
    directory.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"problem": "What is 1+1?", "answer": a}) + "\n" for a in answers)
    (directory / "aime25.jsonl").write_text(rows + "not json\n")


def test_cli_writes_results_from_known_completions(hf_dir, tmp_path, monkeypatch, capsys):
    write_set(tmp_path / "data", ["2", "2", "3", "4"])
    fake, calls = fake_generation([["\\boxed{2}", "\\boxed{2}"], ["\\boxed{3}", "\\boxed{2}"]])
    monkeypatch.setattr(ev, "generate_completions", fake)
    out = tmp_path / "out"
    assert ev.main(["--checkpoint", str(hf_dir), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--samples", "2", "--temperature", "0.6", "--limit", "3", "--out", str(out),
                    "rollout.max_new_tokens=7"]) == 0
    # Problems 0..2 get texts 0, 1, 0 (answers 2, 2, 3): first samples right, wrong, wrong.
    results = json.loads((out / "results.json").read_text())
    metrics = results["datasets"]["aime25"]
    assert (metrics["n"], metrics["k"], metrics["num_correct"]) == (3, 2, 1)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["avg@k"] == pytest.approx(3 / 6)
    assert metrics["pass@k"] == pytest.approx(2 / 3) and metrics["skipped"] == {"not JSON": 1}
    assert results["settings"]["max_new_tokens"] == 7 and results["settings"]["eos_ids"] == [2]
    assert calls[0][2]["max_new_tokens"] == 7
    table = (out / "results.md").read_text()
    assert "| aime25 | 3 | 33.3 | 50.0 | 66.7 | 2 |" in table and table in capsys.readouterr().out
    samples = [json.loads(line) for line in (out / "aime25.samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [[True, True], [False, True], [False, False]]


def test_cli_end_to_end_on_a_tiny_checkpoint(hf_dir, tmp_path, capsys):
    write_set(tmp_path / "data", ["2", "5"])
    out = tmp_path / "out"
    assert ev.main(["--checkpoint", str(hf_dir), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--max-new-tokens", "3", "--out", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["datasets"]["aime25"]
    assert (metrics["n"], metrics["k"]) == (2, 1) and 0 <= metrics["accuracy"] <= 1
    assert "| dataset | n | accuracy (%) |" in capsys.readouterr().out
    assert len((out / "aime25.samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--datasets", "mmlu"], "unknown dataset 'mmlu'; known: aime24"),
    (["--datasets", "aime24"], "no aime24.jsonl for dataset 'aime24' in"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["bogus.key=1"], "unknown config key 'bogus'"),
    (["--data-dir", "EMPTY"], "has no usable aime25 records (skipped: {'not JSON': 1})"),
])
def test_cli_errors_are_one_line(hf_dir, tmp_path, capsys, args, message):
    write_set(tmp_path / "data", ["2"])
    write_set(tmp_path / "empty", [])
    base = ["--checkpoint", str(hf_dir), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out")]
    assert ev.main(base + [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_inputs_that_cannot_fit_the_model_are_one_line_before_its_weights_are_read(hf_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    import topd_jax.models.checkpoint as hf

    monkeypatch.setattr(hf, "load_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    write_set(tmp_path / "data", ["2"])
    base = ["--checkpoint", str(hf_dir), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "out")]
    words = WORDS + [f"x{i}" for i in range(72)]  # 200 tokens for a 128-token model
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", chat_template=TEMPLATE).save_pretrained(
        tmp_path / "big")
    assert ev.main(base + ["--tokenizer", str(tmp_path / "big")]) == 2
    assert capsys.readouterr().err == (f"error: tokenizer {tmp_path / 'big'} has token ids up to 199, but the "
                                       f"checkpoint {hf_dir} has vocab_size 128: not this model's tokenizer\n")
    assert ev.main(base + ["--max-new-tokens", "32760"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: aime25: its longest prompt (") and err.endswith(
        " positions, but the model's max_position_embeddings is 32768; lower --max-new-tokens\n")
    (tmp_path / "file").write_text("x")
    assert ev.main(base + ["--out", str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err == f"error: Not a directory: {tmp_path / 'file'}\n"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    write_set(tmp_path / "data", ["2"])
    assert ev.main(["--checkpoint", str(tmp_path), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--out", str(tmp_path / "out")]) == 2
    assert "neither a Hugging Face directory (config.json) nor a training run" in capsys.readouterr().err


def test_cli_exports_and_evaluates_a_training_run(tmp_path, capsys):
    """A run directory is exported to a temporary HF checkpoint; its tokenizer comes from --tokenizer
    (the tiny run trains a random student, so its config has no student.path)."""
    from topd_jax import train

    run = tmp_path / "run"
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={run}", "steps=1", "preset=opd",
                       "rollout.max_new_tokens=4", "logging.progress=false", "logging.tensorboard=false"]) == 0
    tiny_tokenizer(tmp_path / "tok")
    write_set(tmp_path / "data", ["2", "3"])
    out = tmp_path / "out"
    assert ev.main(["--checkpoint", str(run), "--tokenizer", str(tmp_path / "tok"), "--datasets", "aime25",
                    "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["max_new_tokens"] == 4  # the run's rollout.max_new_tokens
    assert results["datasets"]["aime25"]["n"] == 2
    assert ev.main(["--checkpoint", str(run), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--out", str(out)]) == 2
    assert "no tokenizer for" in capsys.readouterr().err


def test_every_dataset_is_checked_before_any_generation(hf_dir, tmp_path, monkeypatch, capsys):
    write_set(tmp_path / "data", ["2"])
    (tmp_path / "data" / "amc23.jsonl").write_text("not json\n")
    fake, calls = fake_generation([["\\boxed{2}"]])
    monkeypatch.setattr(ev, "generate_completions", fake)
    assert ev.main(["--checkpoint", str(hf_dir), "--datasets", "aime25,amc23", "--data-dir", str(tmp_path / "data"),
                    "--out", str(tmp_path / "out")]) == 2
    assert "has no usable amc23 records" in capsys.readouterr().err
    assert not calls  # aime25 was not generated for nothing


def test_results_are_written_after_each_dataset(hf_dir, tmp_path, monkeypatch):
    write_set(tmp_path / "data", ["2"])
    (tmp_path / "data" / "amc23.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    fake, _ = fake_generation([["\\boxed{2}"]])
    done = []

    def generate_then_stop(*args, **kwargs):
        if done:
            raise KeyboardInterrupt  # the user stops the second dataset
        done.append(1)
        return fake(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_completions", generate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--checkpoint", str(hf_dir), "--datasets", "aime25,amc23", "--data-dir", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["datasets"]) == ["aime25"] and results["complete"] is False
    assert "| aime25 | 1 |" in (tmp_path / "out" / "results.md").read_text()


def test_the_readme_chain_train_export_eval_runs_on_the_tiny_config(tmp_path, capsys):
    """README: train the tiny config on the synthetic task, export it (with the task's tokenizer),
    evaluate the export: no --tokenizer needed."""
    from topd_jax import export, train

    run, hf = tmp_path / "run", tmp_path / "exported"
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={run}", "steps=1", "data.source=synthetic",
                       "data.prompt_length=14", "rollout.max_new_tokens=4", "logging.progress=false",
                       "logging.tensorboard=false"]) == 0
    assert export.main(["--checkpoint", str(run), "--out", str(hf)]) == 0
    assert (hf / "tokenizer.json").is_file() and os.stat(hf).st_mode & 0o777 == 0o777 & ~_umask()
    write_set(tmp_path / "data", ["2", "3"])
    assert ev.main(["--checkpoint", str(hf), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["complete"] is True
    # the run directory itself works too: it is exported on the fly, tokenizer included
    assert ev.main(["--checkpoint", str(run), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--max-new-tokens", "4", "--out", str(tmp_path / "eval2")]) == 0
    assert "evaluating step 1 of" in capsys.readouterr().err


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_tokenizer_without_a_chat_template_falls_back_to_plain_prompts_with_one_warning(hf_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """Base models often ship no chat template: the prompts are then the plain text (a warning
    says so, results.json records it), not a traceback."""
    from topd_jax.models.tokenizer import encode_prompts

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>").save_pretrained(
        tmp_path / "base")
    base = load_tokenizer(tmp_path / "base")
    assert encode_prompts(base, ["What is 1+1?"], system="be brief", chat=False) == [
        base("be brief\n\nWhat is 1+1?")["input_ids"]]
    with pytest.raises(ValueError, match="has no chat_template"):
        encode_prompts(base, ["What is 1+1?"])  # only eval falls back, and says so
    write_set(tmp_path / "data", ["2"])
    fake, calls = fake_generation([["\\boxed{2}"]])
    monkeypatch.setattr(ev, "generate_completions", fake)
    assert ev.main(["--checkpoint", str(hf_dir), "--tokenizer", str(tmp_path / "base"), "--datasets", "aime25",
                    "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith(f"warning: tokenizer {tmp_path / 'base'} has no chat template: ")
    # n counts the usable problems only; the records passed over are said, not silently dropped
    data = tmp_path / "data" / "aime25.jsonl"
    assert err[0] == f"warning: aime25: 1 problems; skipped 1 record of {data} (not JSON: 1)"
    assert calls[0][2]["chat"] is False
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["chat"] is False


def test_an_out_folder_is_created_with_its_missing_parents(hf_dir, tmp_path, monkeypatch):
    """As docs/faults.md says: an output folder is made as `mkdir -p` makes it (a fresh clone has
    no eval/ yet); only a path under a file, a link to nothing or no permission is refused."""
    write_set(tmp_path / "data", ["2"])
    fake, _ = fake_generation([["\\boxed{2}"]])
    monkeypatch.setattr(ev, "generate_completions", fake)
    out = tmp_path / "results" / "2026" / "run1"
    assert ev.main(["--checkpoint", str(hf_dir), "--datasets", "aime25", "--data-dir", str(tmp_path / "data"),
                    "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["complete"] is True
