"""Per-chip figures read from a compiled program's optimised HLO text, loop-aware.

    module = parse(compiled.as_text())     # one parse: computations, instructions, multiplicity
    flops(module)                          # dot / convolution / Mosaic-kernel FLOPs
    hbm_bytes(module)                      # bytes top-level instructions read and write
    collective_bytes(module)               # {"all-gather": b, "reduce-scatter": b, "all-reduce": b, "all-to-all": b}
    uncounted_kernels(module)              # custom calls with no FLOPs rule: {name: times run}

The compiled module is the SPMD-partitioned program of one device, so its shapes are per chip.

**Multiplicity.** XLA's cost analysis counts a while loop's body once, whatever its trip count.
Here every computation gets the number of times it runs per execution of the program: the
entry computation 1; the body of a `while` of trip count n, n times its caller (its condition
n + 1 times); fused computations, called computations (`call`, async `-start`), conditional
branches and reducers as many times as their caller (every branch of a `conditional` counts as
if it ran: an upper bound, XLA's cost analysis takes the costliest branch). Nested loops
multiply. XLA:TPU does not write a trip count into the compiled text (XLA:GPU's
`"known_trip_count"` backend_config is used where present), so it is read from the
loop's structure, as XLA's own `ComputeWhileLoopTripCount` does for the canonical counted loop a
`lax.scan` / `fori_loop` lowers to: the condition compares one element i of the loop tuple with a
constant N (`i < N`, `<=`, `>`, `>=`, `!=`; through copies, bitcasts and fusions), the loop's
initial tuple holds a constant c0 there and the body adds a constant step s to it; then
n = ceil((N - c0) / s). A loop of any other form (the decode loops, `i < N and any(alive)`) has
no known trip count and counts once, as in XLA; the plan's `measure.DecodeStep` covers those.

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

Every function taking a module also takes the HLO text (parsed on the spot). Text without
computation headers (a few instruction lines) is read as one entry computation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Union

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
_FLOAT = re.compile(r"^(f\d+|bf16|f8e\w+|f4e\w+|c\d+)$")
# `%name = <type> opcode(<operands>), attributes`, optionally ROOT; <type> may be a tuple.
_INSTRUCTION = re.compile(r"^\s+(?P<root>ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
                          r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
# An array type (its layout, e.g. `{1,0:T(8,128)(2,1)S(1)}`, follows): `bf16[128,64]`.
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CALLEE = re.compile(r"\b(calls|to_apply|condition|body|branch_computations|true_computation|false_computation|"
                     r"called_computations|select|scatter)=(\{[^{}]*\}|%?[\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ALIASING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
             "opt-barrier", "after-all", "add-dependency", "partition-id", "replica-id", "domain",
             "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "async-done",
             "async-update", "async-start", "call-done", "call-start", "send-done", "recv-done", "copy-start"}
_LAYOUT = re.compile(r"\{[^{}]*\}")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO type: element type, per-chip dims, and its bytes."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> int:
        bits = _BITS.get(self.dtype, 8 if _FP8.match(self.dtype) else None)
        return 0 if bits is None else math.prod(self.dims) * bits // 8

    @property
    def is_float(self) -> bool:
        return bool(_FLOAT.match(self.dtype))


def _arrays(type_text: str) -> tuple[Array, ...]:
    return tuple(Array(t, tuple(int(d) for d in filter(None, dims.split(",")))) for t, dims in
                 _ARRAY.findall(type_text))


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `name = type opcode(operands), attributes`.

    arrays: the arrays of its result type (a tuple flattened, in order); operands: operand names;
    typed_operands: for each operand the arrays written before its name in the operand list
    (empty when the text names operands only, as compiled modules do); attributes: the text
    after the operand list (continuation lines included); callees: (attribute, computation)."""

    name: str
    opcode: str
    type_text: str
    arrays: tuple[Array, ...]
    operands: tuple[str, ...]
    typed_operands: tuple[tuple[Array, ...], ...]
    attributes: str
    callees: tuple[tuple[str, str], ...]
    root: bool = False

    @functools.cached_property
    def _unquoted(self) -> str:
        return _STRING.sub('""', self.attributes)

    def attribute(self, key: str) -> str | None:
        """The value of a `key=value` attribute ({...} groups kept whole; not inside strings), or None."""
        match = re.search(rf"\b{re.escape(key)}=(\{{[^{{}}]*\}}|[^,\s]+)", self._unquoted)
        return match[1] if match else None

    @property
    def op_name(self) -> str:
        match = _OP_NAME.search(self.attributes)
        return match[1] if match else ""


@dataclasses.dataclass(frozen=True)
class Computation:
    """A named computation: its instructions in order; `by_name` finds one by name."""

    name: str
    instructions: tuple[Instruction, ...]
    entry: bool = False

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @functools.cached_property
    def users(self) -> dict[str, tuple[Instruction, ...]]:
        found: dict[str, list[Instruction]] = {}
        for i in self.instructions:
            for o in dict.fromkeys(i.operands):
                found.setdefault(o, []).append(i)
        return {k: tuple(v) for k, v in found.items()}

    @property
    def root(self) -> Instruction | None:
        return next((i for i in self.instructions if i.root), self.instructions[-1] if self.instructions else None)

    @functools.cached_property
    def _parameters(self) -> dict[int | None, Instruction]:
        return {_parameter_number(i): i for i in self.instructions if i.opcode == "parameter"}

    def parameter(self, index: int) -> Instruction | None:
        """The computation's parameter(index) instruction, or None."""
        return self._parameters.get(index)

    def operand_arrays(self, instruction: Instruction, k: int) -> tuple[Array, ...]:
        """The arrays of operand k of `instruction`: written inline, else its definition's type."""
        if instruction.typed_operands[k]:
            return instruction.typed_operands[k]
        defined = self.by_name.get(instruction.operands[k])
        return defined.arrays if defined is not None else ()


def _parameter_number(instruction: Instruction) -> int | None:
    match = re.match(r"\s*(\d+)", instruction.attributes)
    return int(match[1]) if match else None


@dataclasses.dataclass(frozen=True)
class Module:
    """A parsed HLO module (module docstring).

    computations: by name; entry: the entry computation's name; multiplicity: times each
    computation runs per execution of the program (0: never called); fused: computations inside a
    fusion or a custom call (their instructions are not top-level buffers); applied: scalar
    computations applied per element (reducers, comparators); trip_counts: (while instruction
    name, its op_name, trip count or None) for every while loop, in text order."""

    computations: dict[str, Computation]
    entry: str
    multiplicity: dict[str, int]
    fused: frozenset[str]
    applied: frozenset[str]
    trip_counts: tuple[tuple[str, str, int | None], ...]

    def instructions(self):
        """(computation, instruction, multiplicity) of every instruction run at least once."""
        for comp in self.computations.values():
            m = self.multiplicity.get(comp.name, 0)
            if m:
                for instruction in comp.instructions:
                    yield comp, instruction, m


def _split_operands(rest: str) -> tuple[str, str]:
    """The operand list (up to its closing parenthesis) and the attributes after it."""
    depth = 0
    for k, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return rest[:k], rest[k + 1:].lstrip(", ")
            depth -= 1
    return rest, ""


def _top_level_items(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:k])
            start = k + 1
    items.append(text[start:])
    return [item for item in (i.strip() for i in items) if item]


def _instruction(match: re.Match, continuation: str) -> Instruction:
    operand_text, attributes = _split_operands(match["rest"])
    attributes += continuation
    names, typed = [], []
    if match["op"] not in ("parameter", "constant"):
        for item in _top_level_items(re.sub(r"/\*.*?\*/", "", operand_text)):
            name = re.search(r"%([\w.\-]+)\s*$", item) or re.search(r"([\w.\-]+)\s*$", item)
            names.append(name[1] if name else item)
            typed.append(_arrays(item[:name.start()] if name else ""))
    else:
        attributes = operand_text + ")" + (", " + attributes if attributes else "")
    callees = []
    for key, value in _CALLEE.findall(_STRING.sub('""', attributes)):
        callees += [(key, name) for name in re.findall(r"%?([\w.\-]+)", value)]
    return Instruction(match["name"], match["op"], match["type"], _arrays(match["type"]), tuple(names), tuple(typed),
                       attributes, tuple(callees), bool(match["root"]))


def _computations(hlo_text: str) -> tuple[dict[str, Computation], str]:
    """Computations of the text by name, and the entry's name (module docstring)."""
    loose: list = ["", False, []]  # instructions outside any computation: a fragment's
    blocks, current = [loose], None  # [name, is entry, [(instruction match, continuation lines)]]
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header is not None and not line.startswith("HloModule") and "=" not in line.split("(", 1)[0]:
            current = [header["name"], bool(header["entry"]), []]
            blocks.append(current)
            continue
        if current is not None and line.rstrip() == "}":
            current = None
            continue
        lines = (current if current is not None else loose)[2]
        match = _INSTRUCTION.match(line)
        if match is not None:
            lines.append((match, []))
        elif lines and line.strip():  # a long attribute continued on the next line
            lines[-1][1].append(" " + line.strip())
    entry = next((name for name, is_entry, _ in blocks if is_entry), "")
    loose[1] = not entry
    computations = {name: Computation(name, tuple(_instruction(m, "".join(c)) for m, c in lines), is_entry)
                    for name, is_entry, lines in blocks if lines or is_entry}
    return computations, entry


# ---------------------------------------------------------------------------- trip counts
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _value(computations, comp: Computation, name: str, args=None, depth: int = 0):
    """The scalar `name` of `comp` as an int constant or ("element", i, offset): element i of the
    computation's tuple parameter plus a constant; None for anything else. `args` maps a fused
    computation's parameter numbers to (computation, name) of the fusion's operands."""
    instruction = comp.by_name.get(name)
    if instruction is None or depth > 32:
        return None
    op = instruction.opcode
    if op == "constant":
        match = re.match(r"\s*(-?\d+)\s*\)", instruction.attributes)
        return int(match[1]) if match and not instruction.arrays[0].dims else None
    if op == "parameter":
        number = _parameter_number(instruction)
        if args is not None and number in args:
            outer, outer_name, outer_args = args[number]
            return _value(computations, outer, outer_name, outer_args, depth + 1)
        return None
    if op == "get-tuple-element":
        source = comp.by_name.get(instruction.operands[0])
        index = instruction.attribute("index")
        if source is not None and source.opcode == "parameter" and args is None and index is not None:
            return ("element", int(index), 0)
        return None
    if op in ("copy", "bitcast", "reshape", "convert") and instruction.operands:
        return _value(computations, comp, instruction.operands[0], args, depth + 1)
    if op == "fusion":
        callee = next((c for key, c in instruction.callees if key == "calls"), None)
        fused = computations.get(callee)
        if fused is None or fused.root is None:
            return None
        inner = {k: (comp, o, args) for k, o in enumerate(instruction.operands)}
        return _value(computations, fused, fused.root.name, inner, depth + 1)
    if op in ("add", "subtract") and len(instruction.operands) == 2:
        a, b = (_value(computations, comp, o, args, depth + 1) for o in instruction.operands)
        sign = 1 if op == "add" else -1
        if isinstance(a, tuple) and isinstance(b, int):
            return ("element", a[1], a[2] + sign * b)
        if op == "add" and isinstance(a, int) and isinstance(b, tuple):
            return ("element", b[1], b[2] + a)
        if isinstance(a, int) and isinstance(b, int):
            return a + sign * b
    return None


def _compare(computations, comp: Computation, name: str, args=None, depth: int = 0):
    """The root predicate of a loop condition as (direction, element i, bound): `x_i dir bound`."""
    instruction = comp.by_name.get(name)
    if instruction is None or depth > 8:
        return None
    if instruction.opcode == "fusion":
        fused = computations.get(next((c for key, c in instruction.callees if key == "calls"), None))
        if fused is None or fused.root is None:
            return None
        inner = {k: (comp, o, args) for k, o in enumerate(instruction.operands)}
        return _compare(computations, fused, fused.root.name, inner, depth + 1)
    if instruction.opcode in ("copy", "bitcast") and instruction.operands:
        return _compare(computations, comp, instruction.operands[0], args, depth + 1)
    if instruction.opcode != "compare" or len(instruction.operands) != 2:
        return None
    direction = instruction.attribute("direction")
    a, b = (_value(computations, comp, o, args) for o in instruction.operands)
    if isinstance(b, tuple) and isinstance(a, int):
        a, b, direction = b, a, _FLIP.get(direction)
    if not (isinstance(a, tuple) and isinstance(b, int)) or direction is None:
        return None
    return direction, a[1], b - a[2]


def trip_count(computations: dict[str, Computation], caller: Computation, loop: Instruction) -> int | None:
    """Iterations of `loop` (a while instruction of `caller`) when it is a counted loop, else None
    (module docstring: `x_i dir N` in the condition, constant c0 initially, constant step s).
    A trip count XLA wrote into the loop's backend_config (`"known_trip_count":{"n":"36"}`, as
    XLA:GPU does; XLA:TPU does not) is taken as it is."""
    known = _KNOWN_TRIP_COUNT.search(loop.attributes)
    if known is not None:
        return int(known[1])
    callees = dict(loop.callees)
    cond, body = computations.get(callees.get("condition")), computations.get(callees.get("body"))
    if cond is None or body is None or cond.root is None or body.root is None or len(loop.operands) != 1:
        return None
    predicate = _compare(computations, cond, cond.root.name)
    init = caller.by_name.get(loop.operands[0])
    if predicate is None or init is None or init.opcode != "tuple" or body.root.opcode != "tuple":
        return None
    direction, i, bound = predicate
    if i >= len(init.operands) or i >= len(body.root.operands):
        return None
    start = _value(computations, caller, init.operands[i])
    step = _value(computations, body, body.root.operands[i])
    if not isinstance(start, int) or not isinstance(step, tuple) or step[1] != i or step[2] == 0:
        return None
    s = step[2]
    if direction == "LT" and s > 0:
        return max(0, -(-(bound - start) // s))
    if direction == "LE" and s > 0:
        return max(0, -(-(bound + 1 - start) // s))
    if direction == "GT" and s < 0:
        return max(0, -(-(start - bound) // -s))
    if direction == "GE" and s < 0:
        return max(0, -(-(start - bound + 1) // -s))
    if direction == "NE" and (bound - start) % s == 0 and (bound - start) // s >= 0:
        return (bound - start) // s
    return None


def parse(hlo_text: str) -> Module:
    """The module of an HLO text (module docstring): computations and their multiplicity."""
    computations, entry = _computations(hlo_text)
    edges: dict[str, list[tuple[str, int]]] = {}  # callee -> [(caller, factor)]
    fused, applied, trips = set(), set(), []
    for comp in computations.values():
        for instruction in comp.instructions:
            if not instruction.callees:
                continue
            n = None
            if instruction.opcode == "while":
                n = trip_count(computations, comp, instruction)
                trips.append((instruction.name, instruction.op_name, n))
            for key, callee in instruction.callees:
                factor = 1
                if instruction.opcode == "while" and n is not None:
                    factor = n if key == "body" else n + 1
                edges.setdefault(callee, []).append((comp.name, factor))
                if instruction.opcode in ("fusion", "custom-call"):
                    fused.add(callee)
                elif key in ("to_apply", "select", "scatter") and instruction.opcode not in ("call", "call-start"):
                    applied.add(callee)

    @functools.cache
    def times(name: str) -> int:
        if name == entry:
            return 1
        return sum(times(caller) * factor for caller, factor in edges.get(name, ()) if caller != name)

    @functools.cache
    def inside_fusion(name: str) -> bool:
        return name in fused or any(inside_fusion(caller) for caller, _ in edges.get(name, ()) if caller != name)

    names = list(computations)
    return Module(computations, entry, {n: times(n) for n in names},
                  frozenset(n for n in names if inside_fusion(n)), frozenset(applied), tuple(trips))


Hlo = Union[str, Module]


def _module(hlo: Hlo) -> Module:
    return hlo if isinstance(hlo, Module) else parse(hlo)


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
    module = _module(hlo)
    return float(sum(m * (instruction_flops(c, i) or 0.0) for c, i, m in module.instructions()))


def uncounted_kernels(hlo: Hlo) -> dict[str, int]:
    """Custom calls whose FLOPs are not known (counted 0): {kernel name: times run per execution}."""
    found: dict[str, int] = {}
    for comp, instruction, m in _module(hlo).instructions():
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
    module = _module(hlo)
    return float(sum(m * instruction_hbm_bytes(module, c, i) for c, i, m in module.instructions()
                     if c.name not in module.fused and c.name not in module.applied))


# ---------------------------------------------------------------------------- collectives, buffers
def collective_bytes(hlo: Hlo) -> dict[str, int]:
    """Per-chip bytes of each collective kind, loops counted per iteration (module docstring)."""
    totals = dict.fromkeys(KINDS, 0)
    for comp, instruction, m in _module(hlo).instructions():
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
    module = _module(hlo)
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


__all__ = ["KINDS", "Array", "Computation", "Instruction", "Module", "array_bytes", "collective_bytes",
           "convolution_flops", "dot_flops", "flops", "hbm_bytes", "instruction_flops", "kernel_flops",
           "kernel_name", "largest_arrays", "parse", "trip_count", "uncounted_kernels"]
