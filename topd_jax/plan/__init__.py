"""Plan a run before renting the slice: compile every phase of a train step for a TPU topology.

    python -m topd_jax.plan --config CONFIG --topology v5p:4x4x2 [key=value ...]

Modules (import them directly; this package imports none of them, so `--help` starts fast):
  chips    the known TPU chips (HBM, peak FLOP/s, HBM and ICI bandwidth) and a topology's devices
  measure  the trainer's phases compiled on abstract inputs: per-device memory, FLOPs, bytes
  hlo      per-device FLOPs, HBM bytes and collective bytes read from the optimised HLO text,
           loops counted per iteration
  report   the printed table, the JSON and the fit check
  cli      the command line (docs/plan.md)
"""
