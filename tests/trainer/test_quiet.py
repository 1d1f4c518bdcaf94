"""Our own programs print no warning a user cannot act on: the oracle labeller's host callback
gets its operands replicated on purpose, so XLA's partitioner never gathers them to device 0
behind our back ("Involuntary full rematerialization", printed by XLA's C++ logging on fd 2)."""

import jax

from topd_jax.trainer.config import load_config
from topd_jax.trainer.loop import Trainer


def test_an_oracle_step_on_eight_devices_prints_no_resharding_warning(tmp_path, capfd):
    assert jax.device_count() == 8  # tests/conftest.py: the batch is split over 8 devices
    # Shapes no other test uses, so this process compiles the oracle's locate program here.
    config = load_config("configs/tiny_cpu.yaml", [
        f"output_dir={tmp_path / 'run'}", "steps=1", "data.source=synthetic", "data.prompt_length=14",
        "rollout.max_new_tokens=6", "loss.locator=oracle", "loss.window=3", "loss.max_candidates=3",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"])
    trainer = Trainer(config)
    try:
        trainer.run()
    finally:
        trainer.close()
    err = capfd.readouterr().err
    assert "rematerialization" not in err and "spmd_partitioner" not in err, err[-2000:]
