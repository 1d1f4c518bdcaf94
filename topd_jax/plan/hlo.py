"""Per-chip collective bytes, read from a compiled program's optimised HLO text.

    collective_bytes(compiled.as_text())  # {"all-gather": b, "reduce-scatter": b, "all-reduce": b, "all-to-all": b}

The compiled module is the SPMD-partitioned program of one device, so its shapes are per chip.
Every instruction of every computation is read once; an instruction whose opcode is a collective
(`all-gather`, `reduce-scatter`, `all-reduce`, `all-to-all`, their asynchronous `-start` forms,
`ragged-all-to-all`; `-done` halves and other ops are skipped) adds

    bytes = max over its result and operand arrays of (elements x element size)

to its kind: the full (unsharded-side) buffer the collective moves through this chip: the
gathered result of an all-gather, the summed operand of a reduce-scatter or all-reduce, the
exchanged buffer of an all-to-all. That is the volume each chip handles, not the bytes on a
link (a ring all-gather sends (n - 1) / n of it). Like XLA's cost analysis, an instruction inside a
loop body counts once, not once per iteration.

`largest_arrays(text, n)` lists the n largest arrays the program materialises: results of the
instructions outside fused computations (a fusion's inside lives in registers and VMEM), without
parameters and the ops that only alias other buffers (tuple, get-tuple-element, bitcast, while,
conditional, call, -done halves), largest first, each with the JAX op that made it (HLO metadata).
It names the buffers that dominate `temp`; it is not the allocator's exact live set.
"""

from __future__ import annotations

import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_OPCODES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
}
# Bits per element of the HLO primitive types.
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}
_FP8 = re.compile(r"^f8e\w+$|^f4e\w+$")
# `%name = <type> opcode(<operands>), attributes`, optionally ROOT; <type> may be a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def array_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type, e.g. ("bf16", "128,2560") -> 655360; 0 for non-array types."""
    bits = _BITS.get(dtype, 8 if _FP8.match(dtype) else None)
    if bits is None:
        return 0
    count = 1
    for d in filter(None, dims.split(",")):
        count *= int(d)
    return count * bits // 8


def _largest_array(text: str) -> int:
    return max((array_bytes(t, d) for t, d in _ARRAY.findall(text)), default=0)


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ALIASING = {"parameter", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call", "opt-barrier",
             "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "async-done",
             "send-done", "recv-done"}
_LAYOUT = re.compile(r"\{[^{}]*\}")


def largest_arrays(hlo_text: str, n: int = 10) -> list[tuple[int, str, str, str]]:
    """The n largest materialised arrays (module docstring): (bytes, type, opcode, JAX op name)."""
    lines = hlo_text.splitlines()
    fused = {name for line in lines if " fusion(" in line for name in _CALLS.findall(line)}
    found, inside_fused = [], False
    for line in lines:
        header = _HEADER.match(line)
        if header is not None and "=" not in line.split("(", 1)[0]:
            inside_fused = header["name"] in fused
            continue
        match = _INSTRUCTION.match(line)
        if inside_fused or match is None or match["op"] in _ALIASING:
            continue
        size = _largest_array(match["type"])
        if size:
            name = _OP_NAME.search(line)
            found.append((size, _LAYOUT.sub("", match["type"]), match["op"], name[1] if name else ""))
    return sorted(found, key=lambda item: -item[0])[:n]


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Per-chip bytes of each collective kind in an optimised HLO module (module docstring)."""
    totals = dict.fromkeys(KINDS, 0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None or match["op"] not in _OPCODES:
            continue
        operands = match["rest"].split("), ", 1)[0]  # the operand list ends before the attributes
        totals[_OPCODES[match["op"]]] += max(_largest_array(match["type"]), _largest_array(operands))
    return totals


__all__ = ["KINDS", "array_bytes", "collective_bytes", "largest_arrays"]
