"""What the chips are and what a compiled program asks of them: a leaf package (jax, numpy and
the standard library only) that both the plan and the trainer import.

Modules (import them directly; this package imports none of them):
  chips  the one table of known chips (HBM, peak bf16 FLOP/s, HBM and ICI bandwidth) and the
         lookup of a device's chip by its `device_kind`
  hlo    per-device FLOPs, HBM bytes and collective bytes read from the optimised HLO text,
         loops counted per iteration: the one import for users, re-exporting
           hlo_parse   the HLO text parser (Array, Instruction, Computation, Module)
           hlo_loops   trip counts and each computation's multiplicity; `parse`
           hlo_counts  FLOPs, HBM bytes, collective bytes, the largest arrays
"""
