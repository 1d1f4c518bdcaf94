"""Faults and bad input: each is one line `error: ...` and exit 2, a corrupt checkpoint falls
back to the newest readable step, and nothing fails silently (docs/faults.md)."""

import errno
import glob
import json
import os
import shutil

import pytest

from topd_jax import export, train
from topd_jax.errors import TrainingError
from topd_jax.models.families import config_to_hf
from topd_jax.trainer.config import RandomModelConfig, load_config
from topd_jax.trainer.loop import Trainer
from topd_jax.trainer.metrics import MetricsLogger

TINY = ["--config", "configs/tiny_cpu.yaml", "rollout.max_new_tokens=8", "data.prompt_length=5", "loss.window=3",
        "loss.max_candidates=2", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1"]


def tiny_config(output_dir, *extra):
    return load_config("configs/tiny_cpu.yaml", [f"output_dir={output_dir}", *TINY[2:], *extra])


def one_line_error(capsys, argv, main=train.main) -> str:
    """Run a CLI; assert exit 2 and a single `error: ` line on stderr; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run with checkpoints at steps 1 and 2 (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main([*TINY, f"output_dir={out}", "steps=2"]) == 0
    return out


def copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def truncate_a_params_file(step_dir):
    """Cut every data file of the step's params in half (which file holds an array varies)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "truncated params data": truncate_a_params_file,
    "deleted params/_METADATA": lambda step_dir: os.remove(os.path.join(step_dir, "params", "_METADATA")),
    "deleted meta/metadata": lambda step_dir: os.remove(os.path.join(step_dir, "meta", "metadata")),
}


# --------------------------------------------------------------------------- corrupt or mismatched checkpoints


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupt_newest_step_is_moved_aside_and_the_run_resumes_from_the_older_one(trained, tmp_path, damage):
    out = copy_run(trained, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "2")
    trainer = Trainer(tiny_config(out, "steps=2"))
    try:
        assert trainer.step == 1
        [notice] = trainer.notices
        assert notice.startswith(f"checkpoint step 2 in {out / 'checkpoints'} is unreadable: ") and "\n" not in notice
        [moved] = glob.glob(str(out / "checkpoints" / "2.corrupt-*"))
        assert os.path.basename(moved) in notice  # never deleted: the user can look at it
        assert trainer.checkpointer.all_steps() == [1]
        trainer.run(until=1)  # nothing to train; writes the notice to events.log
    finally:
        trainer.close()
    assert "step 2" in (out / "events.log").read_text() and "unreadable" in (out / "events.log").read_text()


def test_a_run_resumed_past_a_corrupt_step_trains_and_saves_that_step_again(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    truncate_a_params_file(out / "checkpoints" / "2")
    trainer = Trainer(tiny_config(out, "steps=2"))
    try:
        trainer.run()
        assert trainer.step == 2 and trainer.checkpointer.all_steps() == [1, 2]
    finally:
        trainer.close()
    assert len(glob.glob(str(out / "checkpoints" / "2.corrupt-*"))) == 1
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0  # the new step 2 reads


def test_export_of_a_corrupt_run_says_which_step_it_used_and_moves_nothing(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    truncate_a_params_file(out / "checkpoints" / "2")
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "exported step 1 of" in captured.out
    assert "step 2" in captured.err and "unreadable" in captured.err
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]  # a reader never renames
    assert "step 2" in one_line_error(capsys, ["--checkpoint", str(out), "--out", str(tmp_path / "x"), "--step", "2"],
                                      export.main)


def test_no_readable_step_at_all_is_one_line(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    for step in ("1", "2"):
        os.remove(out / "checkpoints" / step / "meta" / "metadata")
    line = one_line_error(capsys, [*TINY, f"output_dir={out}", "steps=2"])
    assert "no readable checkpoint" in line and "steps 2, 1 unreadable" in line
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]  # nothing moved when nothing restores


def test_resuming_with_another_model_shape_names_both_shapes(trained, capsys):
    line = one_line_error(capsys, [*TINY, f"output_dir={trained}", "steps=2", "student.random.hidden_size=48"])
    assert line == (f"error: checkpoint step 2 in {trained / 'checkpoints'}: params/embed_tokens has shape (128, 32) "
                    "but the config builds (128, 48)")


def test_resuming_with_a_changed_config_is_refused_and_keeps_config_yaml(trained, capsys):
    before = (trained / "config.yaml").read_text()
    line = one_line_error(capsys, [*TINY, f"output_dir={trained}", "steps=2", "preset=opd",
                                   "optimizer.learning_rate=0.01"])
    assert "optimizer.learning_rate: 0.001 -> 0.01; preset: 'topd' -> 'opd'" in line
    assert "checkpoint.resume_changed=true" in line
    assert (trained / "config.yaml").read_text() == before


def test_resume_changed_records_the_change_and_keeps_the_earlier_config(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    before = (out / "config.yaml").read_text()
    trainer = Trainer(tiny_config(out, "steps=2", "optimizer.learning_rate=0.002", "checkpoint.resume_changed=true"))
    try:
        assert trainer.step == 2
        trainer.run()  # already at steps: writes config and events only
    finally:
        trainer.close()
    assert "optimizer.learning_rate: 0.001 -> 0.002" in (out / "events.log").read_text()
    assert (out / "config.before-2.yaml").read_text() == before
    assert "learning_rate: 0.002" in (out / "config.yaml").read_text()


def test_changing_only_steps_compute_or_logging_resumes_without_a_flag(trained, tmp_path):
    out = copy_run(trained, tmp_path)
    trainer = Trainer(tiny_config(out, "steps=5", "logging.progress=true", "checkpoint.keep=2", "model.remat=full"))
    trainer.close()
    assert trainer.step == 2 and not trainer.resume_changes


# --------------------------------------------------------------------------- one run per folder


def tree_bytes(root):
    """{relative path: content} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_resume_false_over_an_earlier_run_is_refused_and_changes_no_byte(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    before = tree_bytes(out)
    line = one_line_error(capsys, [*TINY, f"output_dir={out}", "steps=2", "checkpoint.resume=false"])
    assert line == (f"error: output_dir {out} holds an earlier run (steps 1, 2 in {out / 'checkpoints'}) and "
                    "checkpoint.resume=false would mix a new run into it: pick a new output_dir, or pass "
                    "checkpoint.earlier_run=move to move the earlier run aside to "
                    f"{out}.earlier-<UTC time> (or drop checkpoint.resume=false to resume it)")
    assert tree_bytes(out) == before  # the lock file's record included
    assert not glob.glob(f"{out}.earlier-*")


def test_earlier_run_move_moves_the_earlier_run_aside_unchanged_and_starts_over(trained, tmp_path):
    from topd_jax.trainer.checkpointing import Checkpointer
    from topd_jax.trainer.rundir import LOCK_FILE

    out = copy_run(trained, tmp_path)
    before = {path: data for path, data in tree_bytes(out).items() if path != LOCK_FILE}
    trainer = Trainer(tiny_config(out, "steps=1", "checkpoint.resume=false", "checkpoint.earlier_run=move"))
    try:
        assert trainer.step == 0
        trainer.run()
    finally:
        trainer.close()
    [moved] = glob.glob(f"{out}.earlier-*")
    assert tree_bytes(moved) == before  # every file of the earlier run, byte for byte, and nothing else
    assert Checkpointer(out / "checkpoints", every=1, keep=3, read_only=True).all_steps() == [1]
    earlier = Checkpointer(os.path.join(moved, "checkpoints"), every=1, keep=3, read_only=True)
    assert earlier.restore_json(2, "meta")["run_id"] != trainer.run_id  # another run, named apart
    assert [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert f"moved the earlier run (checkpoints, config.yaml, metrics.jsonl) to {moved}" in (
        out / "events.log").read_text()


# --------------------------------------------------------------------------- bad input: one line, nothing written


@pytest.mark.parametrize("overrides, message", [
    (["rollout.prompts_per_step=6", "mesh.data=8"], "6 rollouts per step (prompts_per_step x num_samples) do not split "
                                                    "over the 8 batch shards"),
    (["mesh.data=3"], "mesh data=3 fsdp=1 tensor=1 expert=1 needs 3 devices, but there are 8"),
    (["teacher.random.vocab_size=256"], "student vocab_size 128 != teacher vocab_size 256"),
    (["rollout.eos_ids=[999]"], "rollout.eos_ids: [999] outside the models' vocabulary of 128 tokens [0, 128)"),
    (["optimizer.learning_rate=.inf"], "optimizer.learning_rate must be finite, got inf"),
    (["optimizer.learning_rate=.nan"], "optimizer.learning_rate must be > 0, got nan"),
    (["optimizer.learning_rate=0"], "optimizer.learning_rate must be > 0, got 0.0"),
    (["student.path=/no/such/model"], "student.path /no/such/model: "),
    (["loss.locator=oracle"], "loss.locator 'oracle' reads fork labels, but data.source 'random' has none "
                              "(sources with labels: synthetic)"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    line = one_line_error(capsys, [*TINY, f"output_dir={out}", *overrides])
    assert message in line
    assert not out.exists()


def test_a_student_path_with_only_pickle_files_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config_to_hf(RandomModelConfig().model_config())))
    (model / "pytorch_model.bin").write_bytes(b"never unpickled")
    line = one_line_error(capsys, [*TINY, f"output_dir={tmp_path / 'run'}", f"student.path={model}"])
    assert f"student.path {model}" in line and "only pickle checkpoint files (pytorch_model.bin)" in line


def test_a_duplicated_yaml_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\nrollout:\n  top_k: 1\n  top_k: 5\n")
    line = one_line_error(capsys, ["--config", str(path)])
    assert line == f"error: {path}: invalid YAML: duplicate key 'top_k' (first at line 3) at line 4, column 3"


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert one_line_error(capsys, [*TINY, f"output_dir={blocker / 'run'}"]) == f"error: Not a directory: {blocker}/run"
    # Root ignores permission bits, so a read-only directory is simulated at the OS call.
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    line = one_line_error(capsys, [*TINY, f"output_dir={tmp_path / 'ro'}", "steps=1"])
    assert line.startswith("error: Permission denied: ") and str(tmp_path / "ro") in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="outside the models' vocabulary"):
        train.main([*TINY, f"output_dir={tmp_path}", "rollout.eos_ids=[999]", "--debug"])


# --------------------------------------------------------------------------- failures while training


def test_a_full_disk_is_one_line_naming_the_last_complete_checkpoint(trained, tmp_path, capsys, monkeypatch):
    out = copy_run(trained, tmp_path)
    real = MetricsLogger.log

    def full(self, step, metrics):
        if step == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "metrics.jsonl"))
        return real(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", full)
    line = one_line_error(capsys, [*TINY, f"output_dir={out}", "steps=3"])
    assert line == (f"error: No space left on device: {out / 'metrics.jsonl'} (the disk is full); the last complete "
                    f"checkpoint is step 2 in {out / 'checkpoints'}; the next run resumes from it")


class _FullDiskFile:
    """A file whose write raises ENOSPC when `full(data)`: the disk filled up at that write."""

    def __init__(self, f, full):
        self._f, self._full = f, full

    def write(self, data):
        if self._full(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("tensorboard", ["true", "false"])
@pytest.mark.parametrize("writer", ["metrics.jsonl", "events.log", "checkpoints"])
def test_a_full_disk_in_any_writer_is_the_same_one_line(trained, tmp_path, capsys, monkeypatch, writer, tensorboard):
    from topd_jax.trainer import metrics as metrics_module
    from topd_jax.trainer.checkpointing import Checkpointer

    out = copy_run(trained, tmp_path)
    full = {"metrics.jsonl": lambda path, data: path.endswith("metrics.jsonl") and '"step": 3' in data,
            "events.log": lambda path, data: path.endswith("events.log") and "resumed from step 2" in data}.get(writer)
    if full is not None:
        def open_on_a_full_disk(path, *args, **kwargs):
            return _FullDiskFile(open(path, *args, **kwargs), lambda data: full(os.fspath(path), data))

        monkeypatch.setattr(metrics_module, "open", open_on_a_full_disk, raising=False)
        where = out / writer
    else:
        def save(self, step, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.directory}/{step}.orbax-checkpoint-tmp")

        monkeypatch.setattr(Checkpointer, "save", save)
        where = f"{out / 'checkpoints'}/3.orbax-checkpoint-tmp"
    argv = [a for a in TINY if not a.startswith("logging.tensorboard=")]
    line = one_line_error(capsys, [*argv, f"output_dir={out}", "steps=3", f"logging.tensorboard={tensorboard}"])
    assert line == (f"error: No space left on device: {where} (the disk is full); the last complete checkpoint is "
                    f"step 2 in {out / 'checkpoints'}; the next run resumes from it")


def test_a_full_disk_under_tensorboard_ends_the_process_with_one_line_and_resumes_exactly(trained, tmp_path):
    """tensorboardX's own writer thread died on ENOSPC and left the main thread blocked on its
    queue for good; the event file is now written in the main thread, so the error ends the run."""
    import subprocess
    import sys

    out = copy_run(trained, tmp_path)
    reference = copy_run(trained, tmp_path / "reference")
    code = """if True:
        import errno, os, sys
        from tensorboardX import record_writer
        from tensorboardX.proto.event_pb2 import Event
        from topd_jax import train
        from topd_jax.errors import exit_quietly

        real = record_writer.RecordWriter.write

        def write(self, data):  # the disk fills up at step 3's first TensorBoard record
            if Event.FromString(data).step == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
            return real(self, data)

        record_writer.RecordWriter.write = write
        exit_quietly(train.main(sys.argv[1:]))
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [a for a in TINY if not a.startswith("logging.tensorboard=")]
    proc = subprocess.run([sys.executable, "-c", code, *argv, f"output_dir={out}", "steps=3",
                           "logging.tensorboard=true"], cwd=root, env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in err if line.startswith("error: ")] == [err[-1]] and "Traceback" not in proc.stderr
    assert err[-1].startswith(f"error: No space left on device: {out / 'tensorboard'}/events.out.tfevents.")
    assert err[-1].endswith(f"(the disk is full); the last complete checkpoint is step 2 in {out / 'checkpoints'}; "
                            "the next run resumes from it")
    # Space freed: the rerun resumes from step 2 and computes step 3 as a run that never failed.
    for run in (out, reference):
        assert train.main([*argv, f"output_dir={run}", "steps=3", "logging.tensorboard=true"]) == 0

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time_", "tokens_per_s", "mfu"))}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(out)] == [1, 2, 3] and rows(out) == rows(reference)


def test_a_closed_terminal_silences_the_console_but_not_the_run_files(tmp_path, monkeypatch):
    """After SIGHUP the terminal is gone and every console write fails with EIO: the run still
    logs its steps and notices to its files (and so reaches its save)."""
    import sys

    class ClosedTerminal:
        def write(self, text):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def flush(self):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def isatty(self):
            return True

    with MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=True) as logger:
        logger.log(1, {"loss": 1.0})
        monkeypatch.setattr(sys, "stderr", ClosedTerminal())
        monkeypatch.setattr(sys, "stdout", ClosedTerminal())
        logger.log(2, {"loss": 2.0})
        logger.warn("SIGHUP: saved")
        logger.log(3, {"loss": 3.0})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "SIGHUP: saved" in (tmp_path / "events.log").read_text()


def test_a_full_disk_inside_an_orbax_save_is_recognised(trained, tmp_path, monkeypatch):
    from topd_jax.trainer.checkpointing import Checkpointer

    out = copy_run(trained, tmp_path)

    def save(self, step, *args, **kwargs):  # TensorStore's form: a ValueError carrying the OS text
        raise ValueError(f"Error writing to {out}/checkpoints/{step}: [Errno 28] No space left on device")

    monkeypatch.setattr(Checkpointer, "save", save)
    trainer = Trainer(tiny_config(out, "steps=3"))
    try:
        with pytest.raises(TrainingError, match=r"^No space left on device \(the disk is full\) while writing a "
                                                r"checkpoint; the last complete checkpoint is step 2 in "):
            trainer.run()
    finally:
        trainer.close()


def test_steps_that_are_all_skipped_stop_the_run(tmp_path, capsys):
    line = one_line_error(capsys, [*TINY, f"output_dir={tmp_path}", "steps=4", "optimizer.learning_rate=1e30",
                                   "optimizer.max_grad_norm=null", "optimizer.max_consecutive_skips=1"])
    assert "1 consecutive steps had a non-finite loss or gradients and were skipped" in line
    assert "optimizer.max_consecutive_skips=1" in line and "last complete checkpoint is step" in line
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(row) for row in f]
    assert rows[-1]["skipped"] and len(rows) < 4


def test_help_lists_every_config_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in ("rollout.max_new_tokens: int = 32", "optimizer.max_consecutive_skips: int = 10",
                 "checkpoint.resume_changed: bool = False", "teacher.random.hidden_size: int = 64"):
        assert line in out
    assert "generated tokens per rollout (>= 1)" in out


def test_export_refuses_weights_that_are_not_finite(trained, tmp_path, capsys):
    import dataclasses

    import jax
    import jax.numpy as jnp

    out = copy_run(trained, tmp_path)
    trainer = Trainer(tiny_config(out, "steps=3"))
    try:
        nan = jax.tree.map(lambda x: x * jnp.nan, trainer.state.params)
        trainer.state = dataclasses.replace(trainer.state, params=nan, step=trainer.state.step + 1)
        trainer.save(force=True)
    finally:
        trainer.close()
    line = one_line_error(capsys, ["--checkpoint", str(out), "--out", str(tmp_path / "hf")], export.main)
    assert f"checkpoint step 3 in {out / 'checkpoints'}: params/" in line and "holds NaN or inf" in line
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert export.main(["--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--step", "2"]) == 0


def test_experiments_help_describes_every_option_with_its_default(capsys):
    import re

    from topd_jax.experiments.__main__ import main

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = [e for e in re.split(r"\n  (?=-)", options) if e.strip() and not e.lstrip().startswith("-h")]
    assert len(entries) >= 4
    for entry in entries:
        flag, _, rest = entry.strip().partition(" ")
        text = " ".join(rest.split())
        assert "(default: " in text, flag
        assert len(text.split("(default: ")[0].split()) >= 3, f"{flag} has no help text"


def test_run_files_and_export_folders_follow_the_umask(trained, tmp_path):
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.yaml", "metrics.jsonl", "events.log"):
        if (trained / name).exists():
            assert stat.S_IMODE(os.stat(trained / name).st_mode) == 0o666 & ~mask, name
    existing = tmp_path / "hf"
    existing.mkdir()
    os.chmod(existing, 0o755)
    assert export.main(["--checkpoint", str(trained), "--out", str(existing)]) == 0
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o755  # not changed to 0700
    assert stat.S_IMODE(os.stat(existing / "model.safetensors").st_mode) == 0o666 & ~mask


def test_eval_of_a_run_without_a_readable_checkpoint_is_one_line(trained, tmp_path, capsys):
    from topd_jax import eval as ev

    out = copy_run(trained, tmp_path)
    for step in ("1", "2"):
        truncate_a_params_file(out / "checkpoints" / step)
    data = tmp_path / "data"
    data.mkdir()
    (data / "aime25.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    line = one_line_error(capsys, ["--checkpoint", str(out), "--datasets", "aime25", "--data-dir", str(data),
                                   "--tokenizer", str(out), "--out", str(tmp_path / "eval")], ev.main)
    assert line.startswith(f"error: no readable checkpoint in {out / 'checkpoints'}")


def test_a_jsonl_source_without_a_tokenizer_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"problem": "What is 1+1?"}) + "\n")
    line = one_line_error(capsys, [*TINY, f"output_dir={tmp_path / 'run'}", "data.source=jsonl",
                                   f"data.path={prompts}"])
    assert "data.source 'jsonl' needs a tokenizer" in line and not (tmp_path / "run" / "config.yaml").exists()


def test_eval_with_a_directory_that_is_no_tokenizer_is_one_line(trained, tmp_path, capsys):
    from topd_jax import eval as ev

    data = tmp_path / "data"
    data.mkdir()
    (data / "aime25.jsonl").write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    line = one_line_error(capsys, ["--checkpoint", str(trained), "--datasets", "aime25", "--data-dir", str(data),
                                   "--tokenizer", str(tmp_path), "--out", str(tmp_path / "eval")], ev.main)
    assert line.startswith(f"error: tokenizer {tmp_path}: not a loadable tokenizer directory")


def test_library_tracebacks_are_held_back_while_a_cli_reports_one_line(capsys, caplog):
    import logging

    from topd_jax.errors import run_cli

    def body():
        try:
            raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device")
        except ValueError:  # what Orbax's background save thread logs, stack and all
            logging.getLogger("absl").exception("Failed to run Handler Commit operations")
        logging.getLogger("absl").warning("a warning stays")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with caplog.at_level(logging.WARNING):
        assert run_cli(body) == 2
    assert [r.getMessage() for r in caplog.records] == ["a warning stays"]
    assert capsys.readouterr().err == "error: No space left on device (the disk is full)\n"


def test_yaml_merge_keys_may_still_override_what_they_merge():
    from topd_jax.configuration import parse_yaml

    assert parse_yaml("base: &b {top_k: 1}\nrollout:\n  <<: *b\n  top_k: 5\n", "c.yaml")["rollout"] == {"top_k": 5}


def test_topd_debug_in_the_environment_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPD_DEBUG", "1")
    with pytest.raises(Exception, match="must be finite"):
        train.main([*TINY, f"output_dir={tmp_path}", "optimizer.learning_rate=.inf"])
