"""Loop multiplicities: how many times each computation of an HLO module runs per execution.

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

`parse(text)` is the one entry point: the parsed computations (`hlo_parse`) with their
multiplicity, the computations inside fusions and the per-element reducers, and every while
loop's trip count.
"""

from __future__ import annotations

import functools
import re
from typing import Union

from topd_jax.hardware.hlo_parse import Computation, Instruction, Module, parameter_number
from topd_jax.hardware.hlo_parse import computations as read_computations

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
        number = parameter_number(instruction)
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
    computations, entry = read_computations(hlo_text)
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


def as_module(hlo: Hlo) -> Module:
    return hlo if isinstance(hlo, Module) else parse(hlo)


__all__ = ["Hlo", "as_module", "parse", "trip_count"]
