"""`python -m topd_jax.export`: a training checkpoint's student as a checkpoint transformers loads."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from topd_jax import export, train
from topd_jax.trainer.config import load_config
from topd_jax.trainer.loop import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={out}", "steps=2", "preset=opd",
                       "rollout.max_new_tokens=6", "logging.progress=false", "logging.tensorboard=false"]) == 0
    return out


def test_exported_student_gives_the_trained_logits_in_transformers(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert export.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    config = load_config(str(run_dir / "config.yaml"))
    trainer = Trainer(config)  # resumes the final checkpoint: the trained student
    assert trainer.step == 2
    student = nnx.merge(trainer.graphdef, trainer.state.params)
    tokens = np.array([[5, 9, 2, 77, 31, 4]])
    ours = np.asarray(jax.device_get(student(tokens)))
    trainer.close()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_export_of_a_named_step_and_errors(run_dir, tmp_path, capsys):
    assert export.main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "a"),
                        "--step", "2", "--dtype", "bfloat16"]) == 0
    assert export.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "b"), "--step", "7"]) == 2
    assert "no complete checkpoint 7" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
