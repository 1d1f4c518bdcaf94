"""Process start-up: multi-host initialisation and the device mesh, both from the TrainConfig.

`initialize_distributed` must run before anything touches the JAX backend (jax.devices(), the
first array): after that, JAX has committed to a single-process view of the devices.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh

from topd_jax.models.sharding import make_mesh
from topd_jax.trainer.config import DistributedConfig, MeshConfig

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
