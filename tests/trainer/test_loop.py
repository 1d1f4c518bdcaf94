"""The trainer loop: exact resume, kill -9 during an async save, SIGTERM, metrics and events."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from topd_jax.trainer.checkpointing import Checkpointer
from topd_jax.trainer.config import load_config
from topd_jax.trainer.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "trainer", "worker.py")
RUN = ["steps=4", "checkpoint.every=1", "checkpoint.keep=3", "rollout.prompts_per_step=8",
       "rollout.max_new_tokens=10", "data.prompt_length=5", "loss.window=4", "loss.max_candidates=2",
       "logging.progress=false", "optimizer.schedule=cosine", "optimizer.warmup_steps=1"]
TIMING = ("time_", "tokens_per_s", "mfu")


def config(output_dir, *extra):
    return load_config("configs/tiny_cpu.yaml", [f"output_dir={output_dir}", *RUN, *extra])


def cli_run(*extra):
    """RUN with `extra` in place of the keys it sets: the command line refuses a key given twice."""
    keys = {e.partition("=")[0] for e in extra}
    return [*(r for r in RUN if r.partition("=")[0] not in keys), *extra]


def metrics_of(output_dir):
    """metrics.jsonl without the wall-clock fields."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


def params_of(trainer):
    return jax.tree.map(np.asarray, trainer.state.params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 uninterrupted steps: (metrics rows, final params)."""
    out = tmp_path_factory.mktemp("straight")
    trainer = Trainer(config(out))
    trainer.run()
    trainer.close()
    return metrics_of(out), params_of(trainer)


def resume_and_compare(out, straight):
    trainer = Trainer(config(out))
    trainer.run()
    trainer.close()
    rows, ref_rows = metrics_of(out), straight[0]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows == ref_rows
    jax.tree.map(np.testing.assert_array_equal, params_of(trainer), straight[1])


def test_two_steps_stop_and_resume_equals_four_straight_steps(tmp_path, straight):
    first = Trainer(config(tmp_path))
    first.run(until=2)
    first.close()
    assert Checkpointer(tmp_path / "checkpoints", every=1, keep=3).latest_step() == 2
    resume_and_compare(tmp_path, straight)
    with Checkpointer(tmp_path / "checkpoints", every=1, keep=3, read_only=True) as checkpointer:
        ids = {checkpointer.restore_json(step, "meta")["run_id"] for step in (2, 4)}
    assert len(ids) == 1 and first.run_id in ids  # one run, named alike before and after its resume
    with open(tmp_path / "events.log") as f:
        assert "resumed from step 2" in f.read()


def test_kill_9_during_an_async_save_resumes_from_the_last_complete_checkpoint(tmp_path, straight):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, WORKER, "kill", str(tmp_path), "3", *RUN], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    partial = [p for p in os.listdir(checkpoints) if not p.isdigit()]
    latest = Checkpointer(checkpoints, every=1, keep=3).latest_step()
    # The step-3 save was cut off: its partial directory is never taken for a checkpoint.
    assert latest == 2 or (latest == 3 and not partial), (latest, os.listdir(checkpoints))
    assert len(metrics_of(tmp_path)) == 3  # step 3 was logged before the kill; resume recomputes it
    resume_and_compare(tmp_path, straight)


def signal_after_two_steps(run, signum, *overrides):
    """Train the tiny config (500 steps) into `run` in a subprocess, send `signum` once two steps
    are logged, and require a clean exit (status 0)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "topd_jax.train", "--config", "configs/tiny_cpu.yaml", f"output_dir={run}",
           *cli_run("steps=500", "checkpoint.every=0", *overrides)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]


def test_sigterm_leaves_a_complete_checkpoint_and_exits_cleanly(tmp_path):
    signal_after_two_steps(tmp_path, signal.SIGTERM)
    logged = len(metrics_of(tmp_path))
    assert 2 <= logged < 500
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=0, keep=3)
    assert checkpointer.all_steps() == [logged]
    assert checkpointer.restore_json(None, "meta")["step"] == logged
    assert "SIGTERM" in (tmp_path / "events.log").read_text()
    # The checkpoint restores into a trainer that continues from it.
    trainer = Trainer(config(tmp_path, "steps=500", "checkpoint.every=0"))
    assert trainer.step == logged and trainer.data_position == logged
    trainer.close()


def test_sighup_saves_a_complete_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """The terminal closed: SIGHUP is SIGTERM (save after the step in progress, exit 0), and the
    resumed run equals one that was never stopped."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    signal_after_two_steps(run, signal.SIGHUP, "logging.tensorboard=true")
    logged = len(metrics_of(run))
    assert 2 <= logged < 500
    checkpoints = run / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == [str(logged)]  # complete, and nothing half-written beside it
    assert Checkpointer(checkpoints, every=0, keep=3).restore_json(None, "meta")["step"] == logged
    assert (f"SIGHUP: saved a complete checkpoint at step {logged} in {checkpoints}; exiting (rerun the same "
            "command to resume)") in (run / "events.log").read_text()
    resumed, straight = Trainer(config(run, "steps=500", "checkpoint.every=0")), Trainer(
        config(reference, "steps=500", "checkpoint.every=0"))
    try:
        assert resumed.step == logged
        resumed.run(until=logged + 1)
        straight.run(until=logged + 1)
        assert metrics_of(run) == metrics_of(reference)
        jax.tree.map(np.testing.assert_array_equal, params_of(resumed), params_of(straight))
    finally:
        resumed.close()
        straight.close()


def test_sighup_under_nohup_stays_ignored():
    from topd_jax.trainer.preemption import PREEMPTION

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with PREEMPTION:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == PREEMPTION._handle
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with PREEMPTION:
            assert signal.getsignal(signal.SIGHUP) == PREEMPTION._handle
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_metrics_hold_every_section_6_diagnostic_and_the_time_split(straight):
    row = straight[0][-1]
    for key in ("loss", "loss_opd", "loss_traj", "low_divergence_share", "loss_ot_spearman", "suppressed_fraction",
                "ot_hist_candidates", "ot_hist_reference", "window_length_mean", "rollout_length_mean", "eos_rate",
                "teacher_agreement", "grad_norm", "skipped", "tokens"):
        assert key in row, key
    assert len(row["ot_hist_candidates"]) == 20


def test_time_split_tokens_per_second_and_mfu_are_logged(tmp_path):
    trainer = Trainer(config(tmp_path, "steps=1", "logging.peak_flops=1.0e+9"))
    trainer.run()
    trainer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        row = json.loads(f.readline())
    phases = [row[f"time_{p}"] for p in ("sample", "score", "branch", "train")]
    assert all(t > 0 for t in phases) and sum(phases) <= row["time_step"] + 1e-6
    assert row["tokens"] == 8 * 10 and row["tokens_per_s"] == pytest.approx(80 / row["time_step"])
    assert 0 < row["mfu"] < 1
    assert os.listdir(tmp_path / "tensorboard")


def test_a_config_that_cannot_split_the_batch_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="do not split over the 8 batch shards"):
        Trainer(config(tmp_path, "rollout.prompts_per_step=6"))


def test_student_and_teacher_must_share_a_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(config(tmp_path, "teacher.random.vocab_size=96"))


def test_random_models_are_identical_on_every_mesh(tmp_path):
    a = Trainer(config(tmp_path / "a", "mesh.data=1"), devices=jax.devices()[:1])
    b = Trainer(config(tmp_path / "b", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    jax.tree.map(np.testing.assert_array_equal, params_of(a), params_of(b))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(a.teacher, nnx.Param)),
                 jax.tree.map(np.asarray, nnx.state(b.teacher, nnx.Param)))
    a.close(), b.close()
