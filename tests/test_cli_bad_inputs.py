"""Every bad input to every command line is one line `error: ...` on stderr and exit status 2,
before any work (docs/faults.md). One table drives train, export, eval, plan, the demo and the
experiments in-process: a new option gets its row.

A row is (command, argv, the substring its error line holds). Placeholders in argv and the
substring are replaced by this module's paths: FILE (a regular file), LINK (a symbolic link to
nothing), MISSING (a folder that does not exist), OUT (a new folder: never created by a refused
command), LATIN1 (a config file that is not UTF-8), HF (a tiny Hugging Face checkpoint with a
tokenizer), NAN (the same with a NaN in one tensor), DATA (a dataset folder with aime25.jsonl).
"""

import json
import os

import numpy as np
import pytest

from topd_jax import eval as ev
from topd_jax import export, train
from topd_jax.plan import cli as plan_cli

NAN_TENSOR = "model.layers.0.post_attention_layernorm.weight"
CONFIG = ["--config", "configs/tiny_cpu.yaml", "rollout.max_new_tokens=8", "data.prompt_length=5",
          "logging.progress=false", "logging.tensorboard=false"]
TINY = [*CONFIG, "output_dir=OUT"]
EVAL = ["--checkpoint", "HF", "--datasets", "aime25", "--data-dir", "DATA", "--out", "OUT"]
EXPORT = ["--checkpoint", "MISSING/run", "--out", "OUT"]
PLAN = ["--config", "configs/tiny_cpu.yaml", "--topology", "local"]


def _demo_main(argv):
    from topd_jax import demo

    return demo.main(argv)


def _experiments_main(argv):
    from topd_jax.experiments.__main__ import main

    return main(argv)


COMMANDS = {"train": train.main, "export": export.main, "eval": ev.main, "plan": plan_cli.main,
            "demo": _demo_main, "experiments": _experiments_main}

ROWS = [
    # ------------------------------------------------------------------ train
    ("train", ["--config", "LATIN1"], "LATIN1: not valid UTF-8 text: byte 0xe9 at byte offset 18 (line 2); save the "
                                      "config file as UTF-8"),
    ("train", [*TINY, "steps=2", "seed=1", "steps=3"], "overrides 'steps=2' and 'steps=3' both set 'steps' on the "
                                                       "command line (the last would win silently)"),
    ("train", [*TINY, "loss={window: 3}", "loss.window=4"], "both set 'loss.window' on the command line"),
    ("train", [*CONFIG, "output_dir=LINK"], "No such file or directory (the target of the symbolic link LINK): "),
    ("train", [*CONFIG, "output_dir=LINK/run"], "No such file or directory (the target of the symbolic link LINK): "),
    ("train", [*CONFIG, "output_dir=FILE/run"], "Not a directory: FILE/run"),
    ("train", [*TINY, "rollout.top_p=2"], "rollout.top_p must be in (0, 1]"),
    ("train", [*TINY, "steps=0"], "steps must be >= 1"),
    ("train", [*TINY, "--bogus"], "unrecognized arguments: --bogus (see python -m topd_jax.train --help)"),
    ("train", [*TINY, "teacher.path=NAN"], f"teacher.path NAN: NAN/model.safetensors: tensor {NAN_TENSOR!r} holds "
                                           "NaN or inf"),
    ("train", [*TINY, "student.path=NAN", "teacher.path=HF"], f"student.path NAN: NAN/model.safetensors: tensor "
                                                              f"{NAN_TENSOR!r} holds NaN or inf"),
    # ------------------------------------------------------------------ export
    ("export", ["--checkpoint", "MISSING/run", "--out", "FILE/hf"], "Not a directory: FILE"),
    ("export", ["--checkpoint", "MISSING/run", "--out", "FILE"], "Not a directory: FILE"),
    ("export", ["--checkpoint", "MISSING/run", "--out", "LINK"], "(the target of the symbolic link LINK)"),
    ("export", [*EXPORT, "--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),
    ("export", [*EXPORT, "--step", "two"], "argument --step: invalid int value: 'two'"),
    ("export", [*EXPORT, "--step", "-1"], "--step must be >= 0, got -1"),
    ("export", ["--out", "OUT"], "the following arguments are required: --checkpoint"),
    # ------------------------------------------------------------------ eval
    ("eval", [*EVAL, "--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    ("eval", [*EVAL, "--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("eval", [*EVAL, "--temperature", "inf"], "--temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ("eval", [*EVAL, "--temperature", "hot"], "argument --temperature: invalid float value: 'hot'"),
    ("eval", [*EVAL, "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    ("eval", [*EVAL, "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("eval", [*EVAL, "--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    ("eval", [*EVAL, "--samples", "0"], "--samples must be >= 1, got 0"),
    ("eval", [*EVAL, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("eval", [*EVAL, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("eval", [*EVAL, "--limit", "-2"], "--limit must be >= 1, got -2"),
    ("eval", [*EVAL, "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    ("eval", [*EVAL, "--dtype", "float7"], "argument --dtype: invalid choice: 'float7'"),
    ("eval", [*EVAL, "--out", "FILE/out/results"], "Not a directory: FILE"),
    ("eval", [*EVAL, "--out", "FILE"], "Not a directory: FILE"),
    ("eval", [*EVAL, "--out", "LINK"], "(the target of the symbolic link LINK)"),
    ("eval", [*EVAL, "--config", "LATIN1"], "LATIN1: not valid UTF-8 text: byte 0xe9 at byte offset 18"),
    ("eval", [*EVAL, "seed=1", "seed=2"], "overrides 'seed=1' and 'seed=2' both set 'seed'"),
    ("eval", [*EVAL, "--checkpoint", "NAN"], f"NAN/model.safetensors: tensor {NAN_TENSOR!r} holds NaN or inf"),
    # ------------------------------------------------------------------ plan
    ("plan", [*PLAN, "--topology", "v5p:4x4"], "topology 'v5p:4x4': v5p slices are 3-D chip grids (AxBxC, e.g. "
                                               "2x2x1, 2x2x2, 2x2x4, 4x4x4), not 2-D"),
    ("plan", [*PLAN, "--topology", "v4:2x2"], "v4 slices are 3-D chip grids"),
    ("plan", [*PLAN, "--topology", "v5e:2x2x2"], "topology 'v5e:2x2x2': v5e slices are 2-D chip grids (AxB, e.g. "
                                                 "2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16), not 3-D"),
    ("plan", [*PLAN, "--topology", "v6e:0x4"], "every side of the chip grid must be >= 1"),
    ("plan", [*PLAN, "--topology", "v9:2x2"], "unknown topology 'v9:2x2'"),
    ("plan", [*PLAN, "--headroom", "0"], "--headroom must be in (0, 1], got 0.0"),
    ("plan", [*PLAN, "--headroom", "nan"], "--headroom must be in (0, 1], got nan"),
    ("plan", [*PLAN, "--buffers", "-1"], "--buffers must be >= 0, got -1"),
    ("plan", [*PLAN, "--phases", "sample,decode"], "--phases: unknown phase 'decode'"),
    ("plan", [*PLAN, "--config", "LATIN1"], "LATIN1: not valid UTF-8 text"),
    ("plan", [*PLAN, "steps=1", "steps=2"], "both set 'steps'"),
    ("plan", ["--config", "configs/tiny_cpu.yaml"], "the following arguments are required: --topology"),
    # ------------------------------------------------------------------ demo
    ("demo", ["--out", "FILE/demo"], "Not a directory: FILE"),
    ("demo", ["--out", "FILE"], "Not a directory: FILE"),
    ("demo", ["--out", "LINK"], "(the target of the symbolic link LINK)"),
    ("demo", ["--out", "OUT", "--steps", "0"], "--steps must be >= 1, got 0 (see python -m topd_jax.demo --help)"),
    ("demo", ["--out", "OUT", "--learning-rate", "nan"], "--learning-rate must be > 0, got nan"),
    ("demo", ["--out", "OUT", "--methods", "opd,magic"], "unknown method 'magic'"),
    # ------------------------------------------------------------------ experiments
    ("experiments", ["reproduce", "--out", "FILE/results"], "Not a directory: FILE"),
    ("experiments", ["reproduce", "--out", "LINK"], "(the target of the symbolic link LINK)"),
    ("experiments", ["anatomy", "--out", "FILE"], "Not a directory: FILE"),
    ("experiments", ["reproduce", "--out", "OUT", "--seeds", "0,x"], "--seeds must be a comma list of numbers"),
    ("experiments", ["reproduce", "--out", "OUT", "--screen", "opd,magic"], "unknown method 'magic'"),
    ("experiments", ["reproduce", "--out", "OUT", "--steps", "0"], "--steps"),
]


def _tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_end|>", "What", "is", "1+1?"] + [f"w{i}" for i in range(vocab - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                            chat_template="{% for m in messages %}{{ m.content }} {% endfor %}").save_pretrained(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The placeholders' files, shared by every row (no row writes to them)."""
    from flax import nnx

    from topd_jax.models.checkpoint import save_pretrained
    from topd_jax.models.decoder import CausalLM
    from topd_jax.models.safetensors_io import SafetensorsFile
    from topd_jax.trainer.config import RandomModelConfig

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "file").write_text("not a folder\n")
    os.symlink(root / "nowhere", root / "link")
    (root / "latin1.yaml").write_bytes("steps: 2\nname: caf\u00e9\n".encode("latin-1"))
    (root / "data").mkdir()
    (root / "data" / "aime25.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    model = CausalLM(RandomModelConfig().model_config(), rngs=nnx.Rngs(0))
    for name in ("hf", "nan"):
        save_pretrained(model, root / name)
        _tokenizer(root / name, model.config.vocab_size)
    weights = SafetensorsFile(root / "nan" / "model.safetensors")
    offset = weights.data_start + weights.tensors[NAN_TENSOR]["data_offsets"][0]
    with open(root / "nan" / "model.safetensors", "r+b") as f:
        f.seek(offset)
        f.write(np.array([np.nan], weights.dtype(NAN_TENSOR)).tobytes())
    return {"FILE": root / "file", "LINK": root / "link", "MISSING": root / "missing", "LATIN1": root / "latin1.yaml",
            "HF": root / "hf", "NAN": root / "nan", "DATA": root / "data"}


def _resolve(text, paths, out):
    for name in sorted(paths, key=len, reverse=True):
        text = text.replace(name, str(paths[name]))
    return text.replace("OUT", str(out))


@pytest.fixture
def no_work(monkeypatch):
    """Any row that gets past the checks into the work fails the test instead of running it."""
    from topd_jax.experiments import anatomy, demo, protocol
    from topd_jax.plan import measure
    from topd_jax.trainer.loop import Trainer

    def work(*args, **kwargs):
        pytest.fail("a bad input reached the work")

    monkeypatch.setattr(Trainer, "run", work)
    monkeypatch.setattr(ev, "generate_completions", work)
    monkeypatch.setattr(measure, "plan_step", work)
    monkeypatch.setattr(demo, "run", work)
    monkeypatch.setattr(protocol, "reproduce", work)
    monkeypatch.setattr(anatomy, "measure", work)


@pytest.mark.parametrize("command, argv, message", ROWS, ids=[f"{c}:{' '.join(a[-2:])}" for c, a, _ in ROWS])
def test_bad_input_is_one_error_line_and_exit_2(paths, tmp_path, capsys, no_work, command, argv, message):
    out = tmp_path / "out"
    argv = [_resolve(a, paths, out) for a in argv]
    try:
        code = COMMANDS[command](argv)
    except SystemExit as stop:  # argparse's refusals exit from inside the parser
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _resolve(message, paths, out) in lines[0]
    assert not out.exists()  # refused before anything was written


def test_every_command_has_rows_and_every_row_a_command():
    assert {command for command, _, _ in ROWS} == set(COMMANDS)
