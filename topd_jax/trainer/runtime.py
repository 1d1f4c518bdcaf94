"""Process start-up: multi-host initialisation and the device meshes, both from the TrainConfig.

Two meshes over the same devices: the training mesh (`mesh`, where the update and the teacher's
scoring run and the state lives) and the inference mesh (`inference`, where sampling and branching
decode: tensor and expert parallel weights, so a decode step moves activations, not weights).

`initialize_distributed` must run before anything touches the JAX backend (jax.devices(), the
first array): after that, JAX has committed to a single-process view of the devices.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh

from topd_jax.models.config import ModelConfig
from topd_jax.models.sharding import make_mesh
from topd_jax.trainer.config import DistributedConfig, InferenceConfig, MeshConfig

_initialized = False  # set by initialize_distributed; jax.distributed.is_initialized is the other witness


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "") or 0)
    except ValueError:
        return 0


def multi_process_launch(env: Mapping[str, str] | None = None) -> str | None:
    """The environment variable that shows a multi-process launch, or None for a single process.

    JAX_COORDINATOR_ADDRESS set; a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists > 1 host);
    SLURM_NTASKS > 1; Open MPI's OMPI_COMM_WORLD_SIZE > 1.
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "TPU_WORKER_HOSTNAMES"
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if _count(env, name) > 1:
            return name
    return None


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Call jax.distributed.initialize when the config asks for it; True if this call initialised.

    on: always; auto: when `multi_process_launch()` finds a launcher, or the config names a
    coordinator or more than one process; off: never. Unset (null) addresses, counts and ids are
    left to JAX's cluster auto-detection. A second call (or one after JAX was initialised
    elsewhere) does nothing and returns False; check jax.process_count() for the process count.
    """
    global _initialized
    if cfg.initialize == "off":
        return False
    if cfg.initialize == "auto":
        configured = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
        if not configured and multi_process_launch() is None:
            return False
    if _initialized or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
    _initialized = True
    return True


def mesh_from_config(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor, expert) mesh of `cfg` over `devices` (default: all, every host)."""
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(**cfg.resolve(len(devices)), devices=devices)


# `inference.layout: auto`: tensor parallelism up to this many devices (one host's chips on a
# GPU server or a TPU v5p/v6e tray; beyond it a decode step's all-reduces cross slower links).
AUTO_MAX_TENSOR = 8


def _largest_power_of_two_dividing(*values: int, at_most: int) -> int:
    size = 1
    while size * 2 <= at_most and all(v % (size * 2) == 0 for v in values):
        size *= 2
    return size


def auto_inference_sizes(num_devices: int, student: ModelConfig, teacher: ModelConfig) -> dict[str, int]:
    """The mesh sizes of `inference.layout: auto` (docs/plan.md has the figures behind them).

        tensor = the largest power of two <= AUTO_MAX_TENSOR dividing the device count and both
                 models' kv heads (each KV cache splits over tensor instead of being replicated)
        expert = for an MoE teacher, the largest power of two dividing the devices left and its
                 experts (its experts are read E / (expert x tensor) per device); else 1
        data   = the devices left; fsdp = 1 (no per-token weight gathers)
    """
    tensor = _largest_power_of_two_dividing(num_devices, student.num_kv_heads, teacher.num_kv_heads,
                                            at_most=AUTO_MAX_TENSOR)
    left = num_devices // tensor
    expert = _largest_power_of_two_dividing(left, teacher.num_experts, at_most=left) if teacher.num_experts else 1
    return {"data": left // expert, "fsdp": 1, "tensor": tensor, "expert": expert}


def inference_mesh(cfg: InferenceConfig, train_mesh: Mesh, student: ModelConfig, teacher: ModelConfig) -> Mesh:
    """The mesh of the no-gradient phases over the training mesh's devices: the training mesh
    itself (layout train), `cfg.mesh` (layout mesh) or `auto_inference_sizes` (layout auto)."""
    if cfg.layout == "train":
        return train_mesh
    devices = list(train_mesh.devices.flat)
    sizes = cfg.mesh.resolve(len(devices)) if cfg.layout == "mesh" else \
        auto_inference_sizes(len(devices), student, teacher)
    if all(train_mesh.shape[axis] == size for axis, size in sizes.items()):
        return train_mesh
    return make_mesh(**sizes, devices=devices)
