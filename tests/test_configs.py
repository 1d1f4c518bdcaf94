"""configs/topd_loss.yaml, the key table of docs/method.md, and TopdConfig's one-line errors."""

import dataclasses
import pathlib
import re

import pytest
import yaml

from topd_jax.configuration import ConfigError
from topd_jax.losses import TopdConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
YAML_PATH = ROOT / "configs" / "topd_loss.yaml"
METHOD_PATH = ROOT / "docs" / "method.md"
FIELDS = [field.name for field in dataclasses.fields(TopdConfig)]


def method_key_table() -> dict[str, list[str]]:
    """Rows of docs/method.md's configuration-key table: key -> its cells."""
    text = METHOD_PATH.read_text(encoding="utf-8")
    section = text.split("## Configuration keys", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def one_line_error(values) -> str:
    with pytest.raises(ConfigError) as info:
        TopdConfig.from_dict(values)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_yaml_parses_into_the_dataclass_defaults_exactly():
    values = yaml.safe_load(YAML_PATH.read_text(encoding="utf-8"))
    assert TopdConfig.from_dict(values) == TopdConfig()
    # Not just equal after coercion: the YAML spells every default with its own type.
    for key, value in values.items():
        default = getattr(TopdConfig(), key)
        assert type(value) is type(default) or type(value) is dict and isinstance(default, dict), (key, value)


def test_every_field_is_in_the_yaml_and_in_the_method_key_table():
    values = yaml.safe_load(YAML_PATH.read_text(encoding="utf-8"))
    assert list(values) == FIELDS  # same keys, same order as the dataclass, no stale ones
    table = method_key_table()
    assert sorted(table) == sorted(FIELDS)


def test_method_key_table_states_each_default():
    table = method_key_table()
    for key in FIELDS:
        default = getattr(TopdConfig(), key)
        expected = "null" if default is None else str(default)
        assert table[key][1] == f"`{expected}`", (key, table[key][1], expected)


def test_every_yaml_key_has_a_comment_above_it():
    lines = YAML_PATH.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+:", line):
            assert i > 0 and lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_unknown_key_names_it_and_the_closest_valid_key():
    message = one_line_error({"suppres_weight": 0.5})
    assert "'suppres_weight'" in message
    assert "did you mean 'suppress_weight'" in message


def test_wrong_type_names_key_expected_type_and_value_given():
    message = one_line_error({"max_candidates": "8"})
    assert message.startswith("max_candidates:")
    assert "expected int" in message and "'8'" in message and "(str)" in message


def test_bool_is_not_a_number():
    message = one_line_error({"traj_weight": True})
    assert message.startswith("traj_weight:") and "expected float" in message and "True" in message


def test_wrong_literal_lists_the_allowed_values():
    message = one_line_error({"threshold_mode": "median"})
    assert message.startswith("threshold_mode:")
    assert all(mode in message for mode in ("'reference'", "'quantile'", "'absolute'"))
    assert "'median'" in message


def test_bad_value_names_the_problem():
    message = one_line_error({"candidate_quantile": 1.5})
    assert "candidate_quantile must be in [0, 1], got 1.5" in message


def test_inconsistent_values_name_the_missing_key():
    assert "tau must be set when threshold_mode='absolute'" in one_line_error({"threshold_mode": "absolute"})


def test_ints_are_accepted_for_float_keys():
    assert TopdConfig.from_dict({"traj_weight": 2}).traj_weight == 2.0


def test_unknown_preset_lists_the_valid_presets():
    with pytest.raises(ConfigError) as info:
        TopdConfig.preset("nope")
    message = str(info.value)
    assert "\n" not in message and "'nope'" in message
    assert all(name in message for name in ("'opd'", "'opd_suppress'", "'topd'"))


def test_presets_differ_from_the_yaml_defaults_only_where_documented():
    assert TopdConfig.preset("topd") == TopdConfig()
    assert TopdConfig.preset("opd") == dataclasses.replace(TopdConfig(), suppress_weight=1.0, traj_weight=0.0)
    assert TopdConfig.preset("opd_suppress") == dataclasses.replace(TopdConfig(), traj_weight=0.0)


def test_yaml_is_generated_from_the_dataclass_docstring():
    # configs/topd_loss.yaml is not a hand-kept copy: it is exactly what loss_yaml writes
    # from TopdConfig's docstring and defaults (regenerate it as its header says).
    from topd_jax.configuration import section_docs
    from topd_jax.trainer.config import loss_yaml

    assert YAML_PATH.read_text(encoding="utf-8") == loss_yaml()
    assert [key for key, _ in section_docs(TopdConfig) if key != "--"] == FIELDS
