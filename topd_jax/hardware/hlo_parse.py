"""The HLO text parser: a compiled program's optimised HLO text as computations of instructions.

    module = parse(compiled.as_text())     # `hlo_loops.parse`: this parse plus each computation's multiplicity

`computations(text)` reads the text into `Computation`s of `Instruction`s (result arrays, operand
names and the arrays written before them, attributes, called computations); `Array` is one array
of an HLO type with its bytes; `Module` is the parsed program the counters in `hlo_counts` read.
Text without computation headers (a few instruction lines) is read as one entry computation. The
compiled module is the SPMD-partitioned program of one device, so its shapes are per chip.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

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
        return {parameter_number(i): i for i in self.instructions if i.opcode == "parameter"}

    def parameter(self, index: int) -> Instruction | None:
        """The computation's parameter(index) instruction, or None."""
        return self._parameters.get(index)

    def operand_arrays(self, instruction: Instruction, k: int) -> tuple[Array, ...]:
        """The arrays of operand k of `instruction`: written inline, else its definition's type."""
        if instruction.typed_operands[k]:
            return instruction.typed_operands[k]
        defined = self.by_name.get(instruction.operands[k])
        return defined.arrays if defined is not None else ()


def parameter_number(instruction: Instruction) -> int | None:
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


def computations(hlo_text: str) -> tuple[dict[str, Computation], str]:
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


__all__ = ["Array", "Computation", "Instruction", "Module", "computations", "parameter_number"]
