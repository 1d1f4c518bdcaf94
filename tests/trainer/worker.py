"""A training process for the fault and multi-host tests (run as a script, not collected).

    python worker.py kill OUTPUT_DIR KILL_AT [overrides...]   # SIGKILL itself right after the
                                                              # async save of step KILL_AT started
    python worker.py multihost OUTPUT_DIR PROCESS_ID NUM_PROCESSES PORT [overrides...]
"""

import os
import sys

mode, output_dir = sys.argv[1], sys.argv[2]
if mode == "multihost":
    process_id, num_processes, port = map(int, sys.argv[3:6])
    overrides = sys.argv[6:]
    devices = 8 // num_processes
else:
    kill_at = int(sys.argv[3])
    overrides = sys.argv[4:]
    devices = 8
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from topd_jax.trainer.config import load_config  # noqa: E402
from topd_jax.trainer.loop import Trainer  # noqa: E402


def kill_during_save(trainer, step, metrics):
    if step == kill_at:
        # The save of this step was started asynchronously and has not been waited for.
        os.kill(os.getpid(), 9)


if mode == "kill":
    config = load_config("configs/tiny_cpu.yaml", [f"output_dir={output_dir}", *overrides])
    Trainer(config, callbacks=[kill_during_save]).run()
    sys.exit(3)  # not reached: the callback kills the process

distributed = []
if num_processes > 1:
    distributed = ["distributed.initialize=on", f"distributed.coordinator_address=localhost:{port}",
                   f"distributed.num_processes={num_processes}", f"distributed.process_id={process_id}"]
config = load_config("configs/tiny_cpu.yaml", [f"output_dir={output_dir}", *distributed, *overrides])
trainer = Trainer(config)
pool_views = []  # per step, a digest of what this process's pool holds: every process must agree
if trainer.pool is not None:
    import hashlib

    collect = trainer.pool.collect

    def collect_and_record(*args, **kwargs):
        out = collect(*args, **kwargs)
        pool = trainer.pool
        view = [pool.holds.tobytes()] + [t.tobytes() + m.tobytes() + str(g).encode() for t, m, g in pool.queue]
        pool_views.append(hashlib.sha256(b"".join(view)).hexdigest()[:16])
        return out

    trainer.pool.collect = collect_and_record
trainer.run()
trainer.close()
print(f"process {jax.process_index()}: pool views {pool_views}")


def gathered(params):
    from jax.experimental import multihost_utils

    return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(params)]


trained = gathered(trainer.state.params)
resumed = Trainer(config)  # restores the final checkpoint onto the mesh; nothing left to train
assert resumed.step == config.steps, resumed.step
restored = gathered(resumed.state.params)
resumed.close()
for a, b in zip(trained, restored):
    np.testing.assert_array_equal(a, b)
if jax.process_index() == 0:
    np.savez(os.path.join(output_dir, "params.npz"), *trained)
print(f"process {jax.process_index()}: {jax.process_count()} processes, {jax.device_count()} devices, ok")
