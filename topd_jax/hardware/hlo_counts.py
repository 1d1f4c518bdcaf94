"""The counting of FLOPs, HBM bytes and collective bytes of a parsed HLO module (`hlo_loops.parse`).

Every figure is per chip and counts each instruction times its computation's multiplicity (the
loops counted per iteration, `hlo_loops`). Every function taking a module also takes the HLO text
(parsed on the spot).

**FLOPs** (`flops`), per chip: 2 x multiply-adds of every `dot` (prod(result dims) x
prod(lhs contracting dims)) and `convolution` (XLA's `GetConvolutionFlops`: input features /
feature groups x output features x batch / batch groups x the valid kernel-output position pairs
per spatial dimension; XLA:TPU writes most matmuls as convolutions), inside fusions too, times
the multiplicity; plus the FLOPs of Mosaic kernels (`custom-call` to `tpu_custom_call`, which
XLA's cost analysis counts only when the kernel carries a `cost_estimate`): the kernel's own
`cost_estimate` when it has one (e.g. `ragged_dot`), else `kernel_flops`' analytic rule (splash
attention), else 0: for a kernel with integer operands and results only (ragged_dot's group
metadata) and XLA's own bookkeeping calls (`_NO_FLOPS_TARGETS`); any other custom call is listed
by `uncounted_kernels`. Not counted: elementwise arithmetic, reductions and transcendentals (a few
percent of a transformer's FLOPs at these widths; XLA's "flops" counts one per element for them).

**HBM bytes** (`hbm_bytes`), per chip: for every instruction at the top level of a non-fused
computation, times the multiplicity, the bytes of its operands plus its result, with
  - a fusion read as XLA reads it: a fused parameter used only through `slice` / `dynamic-slice`
    counts the sliced bytes (a scan body reads one layer of the stacked weights, not all), the
    buffer a `dynamic-update-slice` root updates in place counts only the update, read and written;
  - top-level `dynamic-slice` / `dynamic-update-slice`: the slice / update, read and written;
  - an async `-start`: its operands and its largest result array (the output buffer; the others
    alias the operands or are sync flags); a Mosaic kernel's `cost_estimate` bytes where it has one;
  - not counted: parameter, constant, tuple, get-tuple-element, bitcast, while, conditional, call
    (their bodies are counted), opt-barrier, `copy-start` (a prefetch into on-chip memory: its
    consumer's read is counted, as XLA does), `-done` halves and other ops that only alias buffers
    (`_ALIASING`), and the scalar reducers applied inside reduce / all-reduce / scatter / sort.
Arrays in on-chip memory spaces (layout `S(n)`, VMEM) are counted like HBM, as XLA does. On
elementwise programs this equals XLA's "bytes accessed"; on matmuls and reductions XLA:TPU's is
larger: it counts an operand once per pass of its tiled emitter (docs/plan.md).

**Collectives** (`collective_bytes`): every collective instruction (`all-gather`,
`reduce-scatter`, `all-reduce`, `all-to-all`, their asynchronous `-start` forms,
`ragged-all-to-all`; `-done` halves and other ops are skipped) adds, times its multiplicity,

    bytes = max over its result and operand arrays of (elements x element size)

to its kind: the full (unsharded-side) buffer the collective moves through this chip: the
gathered result of an all-gather, the summed operand of a reduce-scatter or all-reduce, the
exchanged buffer of an all-to-all. That is the volume each chip handles, not the bytes on a
link (a ring all-gather sends (n - 1) / n of it). `collective-permute` is not counted.

`largest_arrays(module, n)` lists the n largest arrays the program materialises: results of the
instructions outside fused computations (a fusion's inside lives in registers and VMEM), without
parameters and the ops that only alias other buffers (tuple, get-tuple-element, bitcast, while,
conditional, call, -done halves), largest first, each with the JAX op that made it (HLO metadata).
It names the buffers that dominate `temp`; it is not the allocator's exact live set.
"""

from __future__ import annotations

import json
import math
import re

from topd_jax.hardware.hlo_loops import Hlo, as_module
from topd_jax.hardware.hlo_parse import Array, Computation, Instruction, Module

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_OPCODES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
}
_ALIASING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
             "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id", "domain",
             "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "async-done",
             "async-update", "async-start", "call-done", "call-start", "send-done", "recv-done", "copy-start"}
_LAYOUT = re.compile(r"\{[^{}]*\}")


# ---------------------------------------------------------------------------- FLOPs
def _conv_positions(kernel: int, output: int, inp: int, stride: int, pad_low: int, lhs_dilate: int,
                    rhs_dilate: int) -> int:
    """Pairs (kernel index k, output index o) of one spatial dimension that read an input element,
    as XLA's GetConvolutionFlops counts them: u = o * stride - pad_low + k * rhs_dilate must fall
    on an input element, 0 <= u <= (inp - 1) * lhs_dilate and u a multiple of lhs_dilate. Counted
    per k in closed form (o runs over a residue class mod lhs_dilate / gcd(stride, lhs_dilate))."""
    top, g = (inp - 1) * lhs_dilate, math.gcd(stride, lhs_dilate)
    period = lhs_dilate // g
    count = 0
    for k in range(kernel):
        c = k * rhs_dilate - pad_low  # u = o * stride + c
        if c % g:
            continue
        lo, hi = max(0, -(c // stride)), min(output - 1, (top - c) // stride)
        residue = (-c // g) * pow(stride // g, -1, period) % period if period > 1 else 0
        first = lo + (residue - lo) % period
        if first <= hi:
            count += (hi - first) // period + 1
    return count


def convolution_flops(instruction: Instruction, lhs: Array, rhs: Array) -> float:
    """FLOPs of one `convolution` (module docstring), from its dim_labels, window and groups."""
    labels = instruction.attribute("dim_labels")
    result = instruction.arrays[0] if instruction.arrays else None
    if not labels or result is None:
        return 0.0
    lhs_l, rest = labels.split("_", 1)
    rhs_l, out_l = rest.split("->")
    window = instruction.attribute("window") or ""
    fields = dict(re.findall(r"(\w+)=([\dx_\-]+)", window.strip("{}")))

    def per_dim(key, count, default):
        if key not in fields:
            return [default] * count
        return [int(v) for v in fields[key].split("x")]

    spatial = sum(ch.isdigit() for ch in lhs_l)
    strides = per_dim("stride", spatial, 1)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", spatial, 1), per_dim("rhs_dilate", spatial, 1)
    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * spatial
    positions = 1
    for d in range(spatial):
        key = str(d)
        positions *= _conv_positions(rhs.dims[rhs_l.index(key)], result.dims[out_l.index(key)],
                                     lhs.dims[lhs_l.index(key)], strides[d], pads[d], lhs_dil[d], rhs_dil[d])
    feature_groups = int(instruction.attribute("feature_group_count") or 1)
    batch_groups = int(instruction.attribute("batch_group_count") or 1)
    fma = (lhs.dims[lhs_l.index("f")] // feature_groups) * result.dims[out_l.index("f")] * \
        (lhs.dims[lhs_l.index("b")] // batch_groups) * positions
    return 2.0 * fma


def dot_flops(instruction: Instruction, lhs: Array) -> float:
    """2 x prod(result dims) x prod(lhs contracting dims) of one `dot`."""
    contracting = instruction.attribute("lhs_contracting_dims") or "{}"
    dims = [int(d) for d in re.findall(r"\d+", contracting)]
    return 2.0 * math.prod(instruction.arrays[0].dims) * math.prod(lhs.dims[d] for d in dims)


_SPLASH = re.compile(r"splash_(mha|mqa)_(fwd|dq|dkv)")
# Units of one causal splash kernel (a unit is one [T, S] x H matmul per head over the full,
# unmasked [T, S]): forward QK^T and PV; dq: QK^T (recompute), dO V^T, dS K; dkv: QK^T, dO V^T,
# dS^T Q, P^T dO.
_SPLASH_UNITS = {"fwd": 2, "dq": 3, "dkv": 4}
CAUSAL_DENSITY = 0.5


def kernel_flops(name: str, operands: tuple[tuple[Array, ...], ...], results: tuple[Array, ...],
                 metadata: str = "") -> float | None:
    """Analytic FLOPs of a Mosaic kernel XLA cannot see into, per chip; None when it has no rule.

    Splash attention (`splash_attention_kernel`, kernel names `splash_{mha,mqa}_{fwd,dq,dkv}...`):
    q [..., T, H] is the first floating-point operand and k [..., S, H] the second (k_layout 2,
    SEQ_MINOR, in the kernel's metadata: k [..., H, S]). One unit = 2 x prod(q dims) x S FLOPs
    (one T x S x H matmul per head, batch and head dims included); fwd = 2, dq = 3, dkv = 4
    units, and a fused backward (dkv also writing the unreduced dq [S // block, *q dims]: a
    result that is q's dims with one axis inserted) dq + dkv = 7, each times the causal density 1/2 (the kernel skips the blocks above the
    diagonal; with nb blocks per row it computes (1 + 1/nb) / 2 of them: 1/2 is the limit).
    """
    match = _SPLASH.search(name)
    if match is None:
        return None
    floats = [a[0] for a in operands if len(a) == 1 and a[0].is_float and len(a[0].dims) >= 2]
    if len(floats) < 2:
        return None
    q, k = floats[0], floats[1]
    seq_minor = re.search(r'k_layout\\?"\s*:\s*2\b', metadata) is not None
    s = k.dims[-1] if seq_minor else k.dims[-2]
    units = _SPLASH_UNITS[match[2]]
    if match[2] == "dkv" and any(r.dims[:j] + r.dims[j + 1:] == q.dims for r in results if len(r.dims) == len(q.dims) + 1
                                 for j in range(len(r.dims))):
        units += _SPLASH_UNITS["dq"]
    return units * CAUSAL_DENSITY * 2.0 * math.prod(q.dims) * s


def _cost_estimate(instruction: Instruction) -> dict | None:
    match = re.search(r'"cost_estimate"\s*:\s*(\{[^{}]*\})', instruction.attributes)
    if match is None:
        return None
    try:
        return {k: float(v) for k, v in json.loads(match[1]).items()}
    except (ValueError, TypeError):
        return None


def kernel_name(instruction: Instruction) -> str:
    """A custom call's name for people: the Mosaic kernel's name scope (`.../NAME/pallas_call`),
    else its op_name's last part, else the instruction's name; the custom-call target for
    non-Mosaic calls."""
    target = re.search(r'custom_call_target="([^"]*)"', instruction.attributes)
    if target and target[1] != "tpu_custom_call":
        return target[1]
    parts = [p for p in instruction.op_name.split("/") if p]
    if parts and parts[-1] == "pallas_call" and len(parts) > 1:
        return parts[-2]
    return parts[-1] if parts else re.sub(r"(\.\d+)+$", "", instruction.name)


# Custom-call targets XLA:TPU inserts for its own bookkeeping: no arithmetic to count.
_NO_FLOPS_TARGETS = {"AllocateBuffer", "AssumeGatherIndicesInBound", "ConcatBitcast", "GatherScatterIndicesBitpacked",
                     "PrepareAsyncCallStart", "PrepareAsyncCallDone", "ZeroCrop", "TopK", "Sharding",
                     "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost", "MoveToDevice",
                     "LayoutConstraint", "annotate_device_placement", "X64Combine", "X64SplitLow",
                     "X64SplitHigh", "InspectSharding"}


def _custom_call_flops(comp: Computation, instruction: Instruction) -> float | None:
    estimate = _cost_estimate(instruction)
    if estimate is not None and "flops" in estimate:
        return estimate["flops"]
    target = re.search(r'custom_call_target="([^"]*)"', instruction.attributes)
    if target and target[1] in _NO_FLOPS_TARGETS:
        return 0.0
    operands = tuple(comp.operand_arrays(instruction, k) for k in range(len(instruction.operands)))
    if not any(a.is_float for a in (*instruction.arrays, *(a for arrays in operands for a in arrays))):
        return 0.0  # integers only (e.g. ragged_dot's group metadata kernel): no floating-point work
    return kernel_flops(instruction.op_name + " " + instruction.name, operands, instruction.arrays,
                        instruction.attributes)


def instruction_flops(comp: Computation, instruction: Instruction) -> float | None:
    """FLOPs of one execution of `instruction` (module docstring); None for a custom call
    without a rule."""
    if instruction.opcode in ("dot", "convolution") and len(instruction.operands) >= 2:
        lhs, rhs = comp.operand_arrays(instruction, 0), comp.operand_arrays(instruction, 1)
        if not lhs or not rhs or not instruction.arrays:
            return 0.0
        if instruction.opcode == "dot":
            return dot_flops(instruction, lhs[0])
        return convolution_flops(instruction, lhs[0], rhs[0])
    if instruction.opcode == "custom-call":
        return _custom_call_flops(comp, instruction)
    return 0.0


def flops(hlo: Hlo) -> float:
    """Per-chip FLOPs of the module, loops counted per iteration (module docstring)."""
    module = as_module(hlo)
    return float(sum(m * (instruction_flops(c, i) or 0.0) for c, i, m in module.instructions()))


def uncounted_kernels(hlo: Hlo) -> dict[str, int]:
    """Custom calls whose FLOPs are not known (counted 0): {kernel name: times run per execution}."""
    found: dict[str, int] = {}
    for comp, instruction, m in as_module(hlo).instructions():
        if instruction.opcode == "custom-call" and instruction_flops(comp, instruction) is None:
            name = kernel_name(instruction)
            found[name] = found.get(name, 0) + m
    return found


# ---------------------------------------------------------------------------- HBM bytes
def _read_bytes(module: Module, comp: Computation, name: str, full: int, depth: int = 0) -> int:
    """Bytes a fused computation reads of its value `name` (a parameter, `full` bytes): the slices
    its `slice` / `dynamic-slice` users take, nothing where a `dynamic-update-slice` updates it in
    place, the nested fusion's reads, else all of it (once)."""
    root = comp.root
    total, whole = 0, root is not None and root.name == name  # flows out whole (a bitcast fusion)
    for user in comp.users.get(name, ()):
        positions = [k for k, o in enumerate(user.operands) if o == name]
        if user.opcode in ("slice", "dynamic-slice") and positions == [0]:
            total += sum(a.bytes for a in user.arrays)
        elif user.opcode == "dynamic-update-slice" and positions == [0]:
            pass
        elif user.opcode == "bitcast" and depth < 16:
            total += _read_bytes(module, comp, user.name, full, depth + 1)
        elif user.opcode == "fusion" and depth < 16:
            fused = module.computations.get(next((c for key, c in user.callees if key == "calls"), ""))
            params = [fused.parameter(k) for k in positions] if fused is not None else [None]
            if any(p is None for p in params):
                whole = True
                continue
            total += sum(_read_bytes(module, fused, p.name, full, depth + 1) for p in params)
        else:
            whole = True
    return full if whole else min(total, full)


def _written_bytes(comp: Computation, name: str, depth: int = 0) -> int:
    """Bytes a fused computation writes of its output value `name`: the update of an in-place
    `dynamic-update-slice`, else the whole value (a tuple: each element)."""
    instruction = comp.by_name.get(name)
    if instruction is None:
        return 0
    if instruction.opcode == "tuple" and depth < 16:
        return sum(_written_bytes(comp, o, depth + 1) for o in instruction.operands)
    if instruction.opcode == "bitcast" and depth < 16:
        return _written_bytes(comp, instruction.operands[0], depth + 1)
    if instruction.opcode == "dynamic-update-slice":
        return sum(a.bytes for a in comp.operand_arrays(instruction, 1))
    return sum(a.bytes for a in instruction.arrays)


def instruction_hbm_bytes(module: Module, comp: Computation, instruction: Instruction) -> int:
    """Bytes one execution of a top-level `instruction` reads and writes (module docstring)."""
    op = instruction.opcode
    if op in _ALIASING:
        return 0
    if op == "custom-call":
        estimate = _cost_estimate(instruction)
        if estimate is not None and "bytes_accessed" in estimate:
            return int(estimate["bytes_accessed"])
    operands = [sum(a.bytes for a in comp.operand_arrays(instruction, k)) for k in range(len(instruction.operands))]
    result = sum(a.bytes for a in instruction.arrays)
    if op == "fusion":
        fused = module.computations.get(next((c for key, c in instruction.callees if key == "calls"), ""))
        if fused is None or fused.root is None:
            return sum(operands) + result
        read = 0
        for k, size in enumerate(operands):
            p = fused.parameter(k)
            read += size if p is None else _read_bytes(module, fused, p.name, size)
        return read + _written_bytes(fused, fused.root.name)
    if op == "dynamic-slice":
        return 2 * result + sum(operands[1:])
    if op == "dynamic-update-slice":
        return 2 * operands[1] + sum(operands[2:])
    if op.endswith("-start"):
        return sum(operands) + max((a.bytes for a in instruction.arrays), default=0)
    return sum(operands) + result


def hbm_bytes(hlo: Hlo) -> float:
    """Per-chip bytes the module's top-level instructions read and write, loops counted per
    iteration (module docstring)."""
    module = as_module(hlo)
    return float(sum(m * instruction_hbm_bytes(module, c, i) for c, i, m in module.instructions()
                     if c.name not in module.fused and c.name not in module.applied))


# ---------------------------------------------------------------------------- collectives, buffers
def collective_bytes(hlo: Hlo) -> dict[str, int]:
    """Per-chip bytes of each collective kind, loops counted per iteration (module docstring)."""
    totals = dict.fromkeys(KINDS, 0)
    for comp, instruction, m in as_module(hlo).instructions():
        kind = _OPCODES.get(instruction.opcode)
        if kind is None:
            continue
        sizes = [a.bytes for a in instruction.arrays]
        for k in range(len(instruction.operands)):
            sizes += [a.bytes for a in comp.operand_arrays(instruction, k)]
        totals[kind] += m * max(sizes, default=0)
    return totals


def array_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type, e.g. ("bf16", "128,2560") -> 655360; 0 for non-array types."""
    return Array(dtype, tuple(int(d) for d in filter(None, dims.split(",")))).bytes


def largest_arrays(hlo: Hlo, n: int = 10) -> list[tuple[int, str, str, str]]:
    """The n largest materialised arrays (module docstring): (bytes, type, opcode, JAX op name)."""
    module = as_module(hlo)
    skip = _ALIASING - {"constant", "async-start", "call-start", "copy-start", "partition-id", "replica-id"}
    found = []
    for comp in module.computations.values():
        if comp.name in module.fused:
            continue
        for instruction in comp.instructions:
            if instruction.opcode in skip:
                continue
            size = max((a.bytes for a in instruction.arrays), default=0)
            if size:
                found.append((size, _LAYOUT.sub("", instruction.type_text), instruction.opcode, instruction.op_name))
    return sorted(found, key=lambda item: -item[0])[:n]



__all__ = ["CAUSAL_DENSITY", "KINDS", "array_bytes", "collective_bytes", "convolution_flops", "dot_flops", "flops",
           "hbm_bytes", "instruction_flops", "instruction_hbm_bytes", "kernel_flops", "kernel_name",
           "largest_arrays", "uncounted_kernels"]
