"""A run owns its output_dir: a second trainer is refused naming the first (two real processes),
a stale lock after kill -9 never blocks the resume, a user's file is never overwritten, and
Ctrl-C (a real SIGINT) saves a complete checkpoint like SIGTERM (docs/faults.md)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from topd_jax import train
from topd_jax.trainer.checkpointing import Checkpointer
from topd_jax.trainer.config import load_config
from topd_jax.trainer.loop import Trainer
from topd_jax.trainer.rundir import LOCK_FILE, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["rollout.max_new_tokens=8", "data.prompt_length=5", "loss.window=3", "loss.max_candidates=2",
        "logging.progress=false", "logging.tensorboard=false"]


def cli(output_dir, *extra):
    return [sys.executable, "-m", "topd_jax.train", "--config", "configs/tiny_cpu.yaml", f"output_dir={output_dir}",
            *TINY, *extra]


def start(output_dir, *extra):
    return subprocess.Popen(cli(output_dir, *extra), cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met; exit {proc.poll()}: {proc.stderr.read() if proc.poll() else ''}")


def metric_lines(output_dir):
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_second_trainer_is_refused_naming_the_first_and_a_killed_ones_lock_never_blocks(tmp_path):
    first = start(tmp_path, "steps=500", "checkpoint.every=0", "seed=1")
    lock = tmp_path / LOCK_FILE
    try:
        wait_for(lambda: lock.exists() and f"pid={first.pid} " in lock.read_text(), first)
        first.send_signal(signal.SIGSTOP)  # it holds the lock; it need not use the CPU meanwhile
        before = sorted(os.listdir(tmp_path))
        second = subprocess.run(cli(tmp_path, "steps=3", "seed=2", "optimizer.learning_rate=0.01"), cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"error: output_dir {tmp_path} is in use by another run: pid {first.pid} on host ")
        assert "started 20" in line and line.endswith("wait for it to finish, stop it, or pick another output_dir")
        assert sorted(os.listdir(tmp_path)) == before  # the second run wrote nothing
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert f"pid={first.pid}" in lock.read_text()  # the stale record stays ...
    trainer = Trainer(load_config("configs/tiny_cpu.yaml", [f"output_dir={tmp_path}", *TINY, "steps=2",
                                                            "checkpoint.every=0", "seed=1"]))
    try:  # ... and blocks nothing: the same command resumes (nothing was saved: it starts over)
        assert trainer.step == 0 and f"pid={os.getpid()}" in lock.read_text()
    finally:
        trainer.close()


def test_the_lock_is_exclusive_while_held_and_free_once_released(tmp_path):
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(ValueError, match=f"is in use by another run: pid {os.getpid()} on host"):
        RunLock.acquire(tmp_path)  # a second open file description: refused as another process is
    lock.release()
    RunLock.acquire(tmp_path).release()
    assert os.listdir(tmp_path) == [LOCK_FILE]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl"])
def test_a_file_no_run_wrote_is_never_overwritten(tmp_path, capsys, name):
    mine = "# my commented config\nsteps: 3  # three\n" if name == "config.yaml" else '{"mine": 1}\n'
    (tmp_path / name).write_text(mine)
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", *TINY, "steps=1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: output_dir {tmp_path} holds {name} that no run wrote (no {LOCK_FILE} or checkpoints/ "
                    "beside it); a run would overwrite it: pick another output_dir or move the file")
    assert (tmp_path / name).read_text() == mine and os.listdir(tmp_path) == [name]


def test_a_run_refused_at_start_up_leaves_no_folder_and_no_lock(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={out}", *TINY,
                       "teacher.random.vocab_size=96"]) == 2
    assert "vocab_size" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_ctrl_c_saves_a_complete_checkpoint_and_exits_with_one_line(tmp_path):
    proc = start(tmp_path, "steps=500", "checkpoint.every=0")
    wait_for(lambda: metric_lines(tmp_path) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    steps = Checkpointer(tmp_path / "checkpoints", every=0, keep=3, read_only=True).all_steps()
    [step] = steps
    assert [line.split(" ", 2)[2] for line in out.strip().splitlines()] == [
        f"SIGINT: saved a complete checkpoint at step {step} in {tmp_path / 'checkpoints'}; exiting (rerun the same "
        "command to resume)"]
    assert os.listdir(tmp_path / "checkpoints") == [str(step)]  # no orbax tmp folder left
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    proc = start(tmp_path, "steps=500", "checkpoint.every=0")
    wait_for(lambda: metric_lines(tmp_path) >= 1, proc)
    # Signals that arrive before Python runs the handler count once: repeat until it exits.
    for _ in range(600):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        if proc.poll() is not None:
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines()[-1] == ("SIGINT again: exiting now without saving; the last complete checkpoint "
                                            "is kept")
    assert "Traceback" not in err


def test_an_interrupt_while_the_trainer_is_built_stops_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    from topd_jax.trainer import loop

    def interrupted(config):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
        raise AssertionError("not interrupted")

    monkeypatch.setattr(loop, "check_inputs", interrupted)
    out = tmp_path / "run"
    assert train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={out}", *TINY, "steps=1"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"SIGINT: stopped before the first step; nothing new to save (a complete checkpoint in {out} is kept)"]
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_sigterm_after_the_last_step_exits_with_a_line(tmp_path, capsys, monkeypatch):
    close = Trainer.close

    def close_under_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        close(self)

    monkeypatch.setattr(Trainer, "close", close_under_sigterm)
    argv = ["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", *TINY, "steps=1", "preset=opd"]
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"SIGTERM after the last step: the run is complete (step 1/1 saved in {tmp_path}); exiting"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
