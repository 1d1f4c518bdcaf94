"""`python -m topd_jax.export`: a training checkpoint's student as a checkpoint transformers loads;
an export is swapped in whole, so a kill -9 at any point leaves the previous one intact."""

import hashlib
import logging
import os
import signal
import subprocess
import sys

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "export_worker.py")


def run_id_of(run_dir, step):
    from topd_jax.trainer.checkpointing import Checkpointer

    with Checkpointer(run_dir / "checkpoints", every=0, keep=1, read_only=True) as checkpointer:
        return checkpointer.restore_json(step, "meta")["run_id"]


def snapshot(folder):
    """{name: sha256} of every file of `folder`."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A 2-step run with a tokenizer (the synthetic task's), checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("synthetic")
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={out}", "steps=2", "preset=opd",
                       "data.source=synthetic", "data.prompt_length=14", "rollout.max_new_tokens=4",
                       "checkpoint.every=1", "logging.progress=false", "logging.tensorboard=false"]) == 0
    return out


@pytest.mark.parametrize("point", ["tokenizer", "weights", "staged", "swapped", "parked"])
def test_a_kill_9_at_any_point_of_an_export_leaves_the_previous_export_intact(synthetic_run, tmp_path, point):
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(synthetic_run), "--out", str(out), "--step", "1"]) == 0
    (out / "README.md").write_text("my notes\n")
    (out / "generation_config.json").write_text("{}\n")  # stale: no export of this run writes one
    old = snapshot(out)
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(old)
    proc = subprocess.run([sys.executable, WORKER, point, str(synthetic_run), str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if point == "swapped":  # the new export landed whole; the old one waits beside it to be removed
        assert snapshot(out) != old and snapshot(out)["README.md"] == old["README.md"]
    elif point == "parked":  # no atomic exchange: between the renames the old one is parked, complete
        assert not out.exists()
    else:
        assert snapshot(out) == old
    assert any(name.startswith(".hf.") for name in os.listdir(tmp_path))  # what the kill left beside it

    assert export.main(["--checkpoint", str(synthetic_run), "--out", str(out), "--step", "1"]) == 0
    assert os.listdir(tmp_path) == ["hf"]  # the next export cleaned up
    new = snapshot(out)
    assert "generation_config.json" not in new  # an export's own stale file is replaced, not kept
    assert new == {name: h for name, h in old.items() if name != "generation_config.json"}


def test_an_export_says_what_it_replaces_and_refuses_a_folder_that_holds_no_export(run_dir, tmp_path, capsys,
                                                                                  caplog):
    out = tmp_path / "hf"
    with caplog.at_level(logging.INFO):
        assert export.main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    run = run_id_of(run_dir, 2)
    assert capsys.readouterr().out == f"exported step 2 of {run_dir} (run {run}) to {out}\n"
    # Orbax's "Given directory is read only" WARNING was a second line on every success.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    (out / "notes.txt").write_text("mine")
    assert export.main(["--checkpoint", str(run_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (f"exported step 2 of {run_dir} (run {run}) to {out}; replaced the earlier export there "
                            "(config.json, model.safetensors), kept notes.txt\n")
    assert captured.err == ""  # no library warning on the success path
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    assert export.main(["--checkpoint", str(run_dir), "--out", str(user)]) == 2
    assert capsys.readouterr().err == (f"error: --out {user} is a folder with files but no export in it (no "
                                       "config.json); an export replaces its folder's model files, so pick a new or "
                                       "empty folder\n")
    assert os.listdir(user) == ["thesis.tex"]


def test_an_out_path_that_cannot_be_written_is_refused_before_reading_the_checkpoint(run_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    import topd_jax.export as module

    monkeypatch.setattr(module, "export_step", lambda *a, **k: pytest.fail("the checkpoint was read"))
    (tmp_path / "file").write_text("x")
    assert module.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "file" / "hf")]) == 2
    assert capsys.readouterr().err == f"error: Not a directory: {tmp_path / 'file'}\n"


def test_two_exports_into_one_out_at_once_do_not_both_succeed(run_dir, tmp_path, capsys):
    from topd_jax.fileio import directory_lock

    out = tmp_path / "hf"
    with directory_lock(out):  # another export is writing --out right now
        assert export.main(["--checkpoint", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {out} is being written by another process right now (pid {os.getpid()}, lock "
                       f"{tmp_path / '.hf.lock'}); wait for it to finish or write elsewhere\n")
        assert not out.exists()
    assert os.listdir(tmp_path) == []  # the lock file goes with its holder
    assert export.main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_directory_lock_is_exclusive_and_free_again_once_released(tmp_path):
    from topd_jax.fileio import DirectoryBusy, directory_lock

    with directory_lock(tmp_path / "x"):
        with pytest.raises(DirectoryBusy):
            with directory_lock(tmp_path / "x"):
                pass
        with directory_lock(tmp_path / "y"):  # another folder: its own lock
            pass
    with directory_lock(tmp_path / "x"):
        pass


def test_an_export_while_training_reads_a_step_retention_cannot_delete(run_dir, tmp_path, capsys, monkeypatch):
    """The trainer's retention deletes old steps while export reads one: the export reads a
    snapshot of hard links, so a step deleted mid-read still exports whole, and says so."""
    import shutil

    from topd_jax.trainer.checkpointing import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "before")]) == 0  # no trainer: direct
    trainer = Trainer(load_config(str(run / "config.yaml"), [f"output_dir={run}"]))  # holds the run, as training
    try:
        capsys.readouterr()
        with monkeypatch.context() as patch:  # no hard links here (another file system): refused, one line
            patch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(18, os.strerror(18))))
            assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run / 'checkpoints'} belongs to a run that is training right now (pid "
                              f"{os.getpid()} on host ") and "export after the run ends" in err
        assert err.count("\n") == 1 and not (tmp_path / "refused").exists()
        restore = Checkpointer.restore

        def retention_deletes_it_first(self, step, *args, **kwargs):
            shutil.rmtree(run / "checkpoints" / str(step), ignore_errors=True)  # the trainer's retention, mid-read
            return restore(self, step, *args, **kwargs)

        monkeypatch.setattr(Checkpointer, "restore", retention_deletes_it_first)
        assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "during")]) == 0
        assert capsys.readouterr().out.startswith(f"exported step 2 of {run} (run {run_id_of(run_dir, 2)}) to ")
        assert snapshot(tmp_path / "during") == snapshot(tmp_path / "before")
        assert not (run / "checkpoints" / "2").exists()  # deleted under the read, and exported whole all the same
        assert not [e for e in os.listdir(run) if e.startswith(export.SNAPSHOT_PREFIX)]  # removed after the read
    finally:
        trainer.close()
