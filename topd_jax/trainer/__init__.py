"""The training loop around the TOPD objective: rollouts -> teacher scores -> loss -> update.

Modules (import them directly; this package imports none of them):
  config         TrainConfig: the typed YAML schema, `load_config` with dotted `key=value` overrides
  runtime        multi-host initialisation (`jax.distributed`) and the device mesh from the config
  step           the pure train step: one batch of rollouts -> loss, metrics and updated state
  placement      where each array of a step lives on the mesh, and the jitted update functions
  loop           the driver: data, rollouts, steps, logging and checkpoints
  checkpointing  save, resume and prune checkpoints (also on SIGTERM)
  metrics        per-step metrics, TensorBoard and progress output
  flops          FLOPs per step and the MFU estimate
"""
