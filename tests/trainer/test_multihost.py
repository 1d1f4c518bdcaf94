"""Two processes on localhost (jax.distributed, 4 CPU devices each) train like one of 8 devices,
with lockstep rollouts and with the continuous pool (whose bookkeeping every process runs on
all-gathered values)."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from .test_loop import ROOT, TIMING, WORKER, metrics_of

RUN = ["steps=3", "checkpoint.every=2", "rollout.prompts_per_step=8", "rollout.max_new_tokens=10",
       "data.prompt_length=5", "loss.window=4", "loss.max_candidates=2", "logging.progress=false",
       "logging.tensorboard=false", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(output_dir, num_processes, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(output_dir), str(i), str(num_processes),
                               str(port), *RUN, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(num_processes)]
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:  # a hung collective (processes that disagree) must not outlive the test
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert f"{num_processes} processes, 8 devices, ok" in out
    with np.load(os.path.join(output_dir, "params.npz")) as f:
        params = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    views = [re.search(r"pool views (\[.*\])", out).group(1) for out, _ in outputs]
    return metrics_of(output_dir), params, views


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_two_processes_of_four_devices_agree_with_one_process_of_eight(tmp_path, mode):
    extra = (f"rollout.mode={mode}", "rollout.eos_ids=[1,2,3,4,5,6]")
    two_metrics, two_params, views = launch(tmp_path / "two", 2, *extra)
    # continuous: both processes' pools hold the same slots and queue at every step
    assert views[0] == views[1] and (mode == "static") == (views[0] == "[]")
    one_metrics, one_params, _ = launch(tmp_path / "one", 1, *extra)
    assert [r["step"] for r in two_metrics] == [1, 2, 3]
    for a, b in zip(two_metrics, one_metrics):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith(TIMING):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(two_params, one_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Both processes wrote one checkpoint set: steps 2 and 3 (the final step is always saved).
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "3"]

