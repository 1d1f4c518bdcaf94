"""Typed construction of frozen config dataclasses from plain dicts (YAML, CLI overrides).

Every error is one line naming the bad key: an unknown key also names the closest valid one, a
wrong type names the key, the expected type and the value given. Supported field types: bool,
int, float, str, None, Literal, unions of these, `tuple[T, ...]` (from a list or tuple),
`dict[str, T]` (from a mapping), Any, and nested config dataclasses (from a mapping). Keys of
nested dataclasses are reported with their full dotted path, e.g. `rollout.max_new_tokens`.
`parse_yaml` and `apply_override` read YAML files and `section.key=value` command-line overrides;
`read_text` reads a config file (not UTF-8: one line naming the byte offset) and
`check_overrides` refuses a key given twice on one command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def is_dataclass_type(tp: Any) -> bool:
    """Whether `tp` is a dataclass class (a nested config section), not an instance."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """The type as error messages spell it: `'a' | 'b'`, `tuple[int, ...]`, `int | None`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, dict):
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if is_dataclass_type(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """value as type tp, or ConfigError. ints are accepted for floats; bools never for numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(args, value)))
    elif origin is dict:
        if isinstance(value, Mapping):
            key_type, value_type = typing.get_args(tp) or (Any, Any)
            return {_coerce(f"{key} key", k, key_type): _coerce(f"{key}.{k}", v, value_type)
                    for k, v in value.items()}
    elif is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=f"{key}.")
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def check(*checks: tuple[str, bool, str, Any]) -> None:
    """The one validation style of every config dataclass (trainer, loss, model): each check is
    (field, ok, requirement, value); the first that fails is the one-line ConfigError
    "field must be requirement, got value". Nested in a section, `from_dict` turns the field
    into its dotted key ("rollout.top_p must be in (0, 1], got 2.0")."""
    for name, ok, requirement, value in checks:
        if not ok:
            raise ConfigError(f"{name} must be {requirement}, got {value!r}")


def check_keys(cls: type, keys: typing.Iterable[str], *, prefix: str = "") -> None:
    """ConfigError for the first key that is not a field of dataclass `cls`, naming the closest."""
    fields = sorted(f.name for f in dataclasses.fields(cls))
    for key in keys:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.0)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}")


def coerce_fields(cls: type, values: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """`values` checked against the fields of dataclass `cls` and converted to their types."""
    check_keys(cls, values, prefix=prefix)
    hints = typing.get_type_hints(cls)
    return {key: _coerce(prefix + key, value, hints[key]) for key, value in values.items()}


def _with_prefix(message: str, prefix: str, fields: set[str]) -> str:
    # __post_init__ checks start their message with the field name ("top_p must be ..."); nested,
    # that name becomes the dotted key ("rollout.top_p must be ...").
    if not prefix:
        return message
    first = message.split(" ", 1)[0].rstrip(":")
    return prefix + message if first in fields else f"{prefix.rstrip('.')}: {message}"


def from_dict(cls: type[C], values: Mapping[str, Any], *, prefix: str = "") -> C:
    """Build dataclass `cls` from `values`, validating every key and type (see module docstring)."""
    kwargs = coerce_fields(cls, values, prefix=prefix)
    try:
        return cls(**kwargs)
    except ValueError as err:
        fields = {f.name for f in dataclasses.fields(cls)}
        raise ConfigError(_with_prefix(str(err), prefix, fields)) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as a plain dict of dicts, lists and scalars (for YAML and logs)."""
    return _plain(config)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: 1e-5 is a float (1.1: a string) and only true/false are
    booleans (1.1: also on/off/yes/no, which would turn `initialize: off` into False); a key given
    twice in one mapping is an error (PyYAML keeps the last one, so an edit could silently lose)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    char: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d+)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data (see _Loader), or a one-line ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{at}") from None


def read_text(path: str | os.PathLike, what: str = "config file") -> str:
    """The UTF-8 text of file `path` (a leading byte-order mark dropped), or a one-line
    ConfigError naming the file and the byte offset where it stops being UTF-8."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise ConfigError(f"{path}: not valid UTF-8 text: byte 0x{data[start]:02x} at byte offset {start} (line "
                          f"{line}); save the {what} as UTF-8") from None


def override_key(override: str) -> str:
    """The dotted key an override sets (`rollout.top_k` of `rollout.top_k=5`)."""
    return override.partition("=")[0].strip()


def check_overrides(overrides: typing.Iterable[str]) -> None:
    """A one-line ConfigError when two overrides set the same key, or one sets a section and
    another a key inside it (`loss={window: 3} loss.window=4`): the last would win silently."""
    seen: dict[str, str] = {}
    for override in overrides:
        key = override_key(override)
        for other, first in seen.items():
            if key == other or key.startswith(other + ".") or other.startswith(key + "."):
                raise ConfigError(f"overrides {first!r} and {override!r} both set {max(key, other, key=len)!r} on "
                                  "the command line (the last would win silently); give each key once")
        seen[key] = override


def check_command_line(config: str | os.PathLike | None, overrides: typing.Iterable[str]) -> None:
    """What a command line's `--config FILE key=value ...` must pass before the config is read:
    FILE is UTF-8 text (`read_text`), no key is given twice (`check_overrides`)."""
    if config is not None:
        read_text(config)
    check_overrides(overrides)


def apply_override(values: dict[str, Any], override: str, cls: type) -> None:
    """Set one `dotted.key=value` override (value in YAML) in the raw nested dict `values` of
    dataclass `cls`, in place; the dict is validated later by from_dict."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError(f"override {override!r} must look like key=value or section.key=value")
    # Walk the schema so `steps.x=1` says steps is not a section; unknown names are left to
    # from_dict, which suggests the closest key.
    for depth, part in enumerate(parts[:-1]):
        if part not in {f.name for f in dataclasses.fields(cls)}:
            break
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) is dict:
            break
        if not is_dataclass_type(tp):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])!r} is not a section "
                              f"(it takes {type_name(tp)})")
        cls = tp
    node = values
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])!r} holds {child!r}, not a mapping")
        node = child
    node[parts[-1]] = parse_yaml(text, f"override {override!r}")



def section_docs(cls: type) -> list[tuple[str, str]]:
    """The key list of a config dataclass's docstring as ("--" for a `-- section` line, or key,
    text) pairs, in order: the docstring's first paragraph is skipped, a line starting with a
    field's name (indented 4) opens its entry, deeper lines continue it."""
    entries: list[tuple[str, str]] = []
    fields = {f.name for f in dataclasses.fields(cls)}
    body = (cls.__doc__ or "").split("\n\n", 1)[1]
    for line in body.splitlines():
        text = line.strip()
        if not text:
            continue
        head = text.split(maxsplit=1)
        if text.startswith("-- "):
            entries.append(("--", text[3:]))
        elif head[0] in fields and line.startswith("    " + head[0]):
            entries.append((head[0], head[1] if len(head) > 1 else ""))
        elif entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {text}")
    return entries


def documented_yaml(cls: type, header: str, width: int = 100) -> str:
    """A YAML file of `cls`'s defaults: `header`, then per docstring entry (`section_docs`) its
    text as a comment and `key: default`. Every field must be documented, in field order (a
    missing one is an error here)."""
    import textwrap

    entries = section_docs(cls)
    documented = [key for key, _ in entries if key != "--"]
    fields = [f.name for f in dataclasses.fields(cls)]
    if documented != fields:
        raise ValueError(f"{cls.__name__}'s docstring documents {documented}, but its fields are {fields}")
    defaults = cls()
    out = [header, "\n"]
    for key, text in entries:
        if key == "--":
            out.append(f"# {'-' * 64} {text}\n\n")
            continue
        value = getattr(defaults, key)
        out.append(textwrap.fill(text, width, initial_indent="# ", subsequent_indent="# ") + "\n")
        out.append(f"{key}: {'null' if value is None else value}\n\n")
    return "".join(out).rstrip("\n") + "\n"


def _field_docs(cls: type) -> dict[str, str]:
    """{field: description} from a docstring laid out as `name   description` lines with indented
    continuation lines (the convention of every config dataclass here)."""
    docs: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    current, column = None, 0
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"^(\s*)(\w+)\s{2,}(\S.*)$", line)
        if match and match.group(2) in names and match.group(2) not in docs:
            current, column = match.group(2), len(match.group(1))
            docs[current] = match.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > column:
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def describe_keys(cls: type, instance: Any = None, prefix: str = "") -> list[str]:
    """Two lines per key of dataclass `cls` (nested sections dotted), for --help:

        rollout.max_new_tokens: int = 32
            generated tokens per rollout (>= 1)

    Defaults are those of `instance` (default: `cls()`), so a section's own default factory shows."""
    lines: list[str] = []
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    instance = cls() if instance is None else instance
    for field in dataclasses.fields(cls):
        tp, value = hints[field.name], getattr(instance, field.name)
        if is_dataclass_type(tp):
            lines.extend(describe_keys(tp, value, f"{prefix}{field.name}."))
            continue
        lines.append(f"  {prefix}{field.name}: {type_name(tp)} = {to_dict(value)!r}")
        if field.name in docs:
            lines.append(f"      {docs[field.name]}")
    return lines
