"""topd_jax: Trajectory-aware On-Policy Distillation in JAX.

The data flow is the package layout: prompts -> rollouts -> teacher scores -> candidates and
look-ahead windows -> OT divergence -> loss -> update. `topd_jax.losses` holds the pure losses.
"""

__version__ = "0.1.0"

import os as _os

# With libtpu installed (the `tpu` and `test` extras) on a host that has no TPU chips, JAX would
# try to open a TPU before falling back to the CPU (a long error on every start). Unless the user
# chose the platforms, a host with neither TPU devices (/dev/accel*, /dev/vfio on TPU VMs) nor an
# NVIDIA GPU runs on the CPU directly. `topd_jax.plan` still compiles for TPU topologies there.
if "JAX_PLATFORMS" not in _os.environ and not any(
        _os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0", "/dev/nvidiactl")):
    _os.environ["JAX_PLATFORMS"] = "cpu"
