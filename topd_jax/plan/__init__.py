"""Plan a run before renting the slice: compile every phase of a train step for a TPU topology.

    python -m topd_jax.plan --config CONFIG --topology v5p:4x4x2 [--lengths SPEC] [key=value ...]

Modules (import them directly; this package imports none of them, so `--help` starts fast):
  topology  a TPU topology's compile-only devices and their chip (`topd_jax.hardware.chips`)
  measure   the trainer's phases compiled on abstract inputs: per-device memory, FLOPs, bytes
            (read from the HLO text by `topd_jax.hardware.hlo`, loops counted per iteration)
  figures   per-device figures of compiled programs and of abstract sharded arrays
  steps     one step of each decode loop compiled alone (the loops have no trip count)
  bound     what each phase must cost at least, from the shapes
  lengths   the rollouts' length distribution (`--lengths`) and its expectations
  modes     the sample phase per rollout mode (static, continuous) at those lengths
  report    the printed table, the JSON and the fit check
  cli       the command line (docs/plan.md)
"""
