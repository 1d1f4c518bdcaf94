"""topd_jax: Trajectory-aware On-Policy Distillation in JAX.

The data flow is the package layout: prompts -> rollouts -> teacher scores -> candidates and
look-ahead windows -> OT divergence -> loss -> update. `topd_jax.losses` holds the pure losses.
"""

__version__ = "0.1.0"
