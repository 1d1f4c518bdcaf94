"""Per-chip figures read from a compiled program's optimised HLO text, loop-aware.

    module = parse(compiled.as_text())     # one parse: computations, instructions, multiplicity
    flops(module)                          # dot / convolution / Mosaic-kernel FLOPs
    hbm_bytes(module)                      # bytes top-level instructions read and write
    collective_bytes(module)               # {"all-gather": b, "reduce-scatter": b, "all-reduce": b, "all-to-all": b}
    uncounted_kernels(module)              # custom calls with no FLOPs rule: {name: times run}

The compiled module is the SPMD-partitioned program of one device, so its shapes are per chip.

The work is split along its seams, one module each:
  hlo_parse   the HLO text parser: `Array`, `Instruction`, `Computation`, `Module`
  hlo_loops   the loop multiplicities: trip counts of counted loops, times each computation runs
              per execution, and `parse`, which returns the module with them
  hlo_counts  the counting: FLOPs, HBM bytes, collective bytes, custom calls without a FLOPs
              rule, the largest materialised arrays
Each module's docstring states its rules. This module is the one place users import from
(`from topd_jax.hardware import hlo`); every name below is re-exported unchanged.

Every function taking a module also takes the HLO text (parsed on the spot). Text without
computation headers (a few instruction lines) is read as one entry computation.
"""

from __future__ import annotations

from topd_jax.hardware.hlo_counts import (CAUSAL_DENSITY, KINDS, array_bytes, collective_bytes, convolution_flops,
                                          dot_flops, flops, hbm_bytes, instruction_flops, instruction_hbm_bytes,
                                          kernel_flops, kernel_name, largest_arrays, uncounted_kernels)
from topd_jax.hardware.hlo_loops import Hlo, parse, trip_count
from topd_jax.hardware.hlo_parse import Array, Computation, Instruction, Module

__all__ = ["CAUSAL_DENSITY", "KINDS", "Array", "Computation", "Hlo", "Instruction", "Module", "array_bytes",
           "collective_bytes", "convolution_flops", "dot_flops", "flops", "hbm_bytes", "instruction_flops",
           "instruction_hbm_bytes", "kernel_flops", "kernel_name", "largest_arrays", "parse", "trip_count",
           "uncounted_kernels"]
