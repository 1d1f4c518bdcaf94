"""`python -m topd_jax.train`: every preset runs the tiny config; config errors are one line."""

import json
import os
import subprocess
import sys

import pytest

from topd_jax import train

SHORT = ["steps=2", "rollout.max_new_tokens=8", "data.prompt_length=5", "loss.window=3", "loss.max_candidates=2",
         "logging.progress=false", "checkpoint.every=1"]


@pytest.mark.parametrize("preset", ["opd", "opd_suppress", "topd"])
def test_each_preset_trains_the_tiny_config_for_two_steps(tmp_path, preset, capsys):
    rc = train.main(["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", f"preset={preset}", *SHORT])
    assert rc == 0
    assert "step 2/2" in capsys.readouterr().out
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["skipped"] == 0 for r in rows)
    assert ("low_divergence_share" in rows[0]) == (preset != "opd")
    assert (rows[0]["loss_traj"] > 0) == (preset == "topd")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    with open(tmp_path / "config.yaml") as f:
        assert f"preset: {preset}" in f.read()


@pytest.mark.parametrize("args, message", [
    (["rollout.max_new_token=3"], "unknown config key 'rollout.max_new_token'; did you mean 'rollout.max_new_tokens'?"),
    (["steps=two"], "steps: expected int, got 'two' (str)"),
    (["loss.windw=3"], "did you mean 'loss.window'"),
    (["preset=topdd"], "preset"),
    (["steps"], "key=value"),
])
def test_config_errors_are_one_line_naming_the_key(args, message, capsys):
    assert train.main(["--config", "configs/tiny_cpu.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_module_entry_point_reports_a_missing_config_file():
    proc = subprocess.run([sys.executable, "-m", "topd_jax.train", "--config", "no/such.yaml"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no/such.yaml" in proc.stderr
