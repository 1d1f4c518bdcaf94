"""Two processes on localhost (jax.distributed, 4 CPU devices each) train like one of 8 devices,
with lockstep rollouts and with the continuous pool (whose bookkeeping every process runs on
all-gathered values)."""

import json
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
                               str(port), *RUN, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(num_processes)]
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
    two_metrics, two_params, _ = launch(tmp_path / "two", 2, f"rollout.mode={mode}", "rollout.eos_ids=[1,2,3,4,5,6]")
    one_metrics, one_params, _ = launch(tmp_path / "one", 1, f"rollout.mode={mode}", "rollout.eos_ids=[1,2,3,4,5,6]")
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


def test_two_processes_fill_one_continuous_pool_from_their_tfds_shards(tmp_path):
    """A per-host source (TFDS through Grain) gives each process its shard of a batch; the pool
    gathers them, so both processes hold the same prompts and slots at every step (without the
    gather, each would queue only its own shard)."""
    from flax import nnx

    from test_eval import VOCAB, tiny_tokenizer
    from topd_jax.models.checkpoint import save_pretrained
    from topd_jax.models.decoder import CausalLM
    from topd_jax.trainer.config import RandomModelConfig

    hf = tmp_path / "hf"
    save_pretrained(CausalLM(RandomModelConfig(vocab_size=VOCAB).model_config(), rngs=nnx.Rngs(0)), hf)
    tiny_tokenizer(hf)
    problems = tmp_path / "train.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"What is 1+1? w{10 + i}", "answer": "2"}) + "\n"
                                for i in range(24)))
    _, _, views = launch(tmp_path / "two", 2, "rollout.mode=continuous", f"student.path={hf}", f"teacher.path={hf}",
                         "data.source=tfds", f"data.path={problems}", "data.prompt_length=16")
    assert len(json.loads(views[0].replace("'", '"'))) == 3  # one view per step
    assert views[0] == views[1]
