"""The supported decoder families, picked by the `architectures` entry of config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from types import ModuleType
from typing import Any, Literal, Mapping

from topd_jax.configuration import ConfigError
from topd_jax.models import llama, qwen2, qwen3, qwen3_moe
from topd_jax.models.config import ROPE_KEYS, ModelConfig, extra_from_hf, rope_to_hf

BY_ARCHITECTURE: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (qwen3, qwen3_moe, qwen2, llama)}
SUPPORTED_ARCHITECTURES = tuple(sorted(BY_ARCHITECTURE))
_BY_FAMILY = {m.MODEL_TYPE: m for m in BY_ARCHITECTURE.values()}


def family_module(raw: Mapping[str, Any]) -> ModuleType:
    """The family file for a config.json dict, or a ConfigError listing the supported ones."""
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _BY_FAMILY:
        return _BY_FAMILY[raw["model_type"]]
    if len(archs) != 1 or archs[0] not in BY_ARCHITECTURE:
        raise ConfigError(f"unsupported architectures {archs!r} (model_type {raw.get('model_type')!r}); "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return BY_ARCHITECTURE[archs[0]]


def config_from_hf(raw: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict in either transformers layout."""
    cfg = family_module(raw).config_from_hf(raw)
    return dataclasses.replace(cfg, **extra_from_hf(raw))


def read_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from `path/config.json` (or a config.json file path)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return config_from_hf(raw)


def config_to_hf(cfg: ModelConfig, *, dtype: str | None = None,
                 layout: Literal["v5", "v4"] | None = None) -> dict[str, Any]:
    """config.json dict for `cfg`: the carried-over source keys, overwritten by the model's own.

    `layout` picks the RoPE keys' layout; by default the source's (v5 for configs built in code).
    `dtype` ("bfloat16", "float32", ...) is written to `dtype` and, when present, `torch_dtype`.
    """
    module = _BY_FAMILY[cfg.family]
    extra = json.loads(cfg.hf_extra)
    layout = layout or cfg.hf_rope_layout
    for key in (*ROPE_KEYS, *getattr(module, "HF_ALIASES", ()), "transformers_version"):
        extra.pop(key, None)
    out = {**extra, **module.config_to_hf(cfg), **rope_to_hf(cfg.rope, layout)}
    if dtype is not None:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    return dict(sorted(out.items()))
