"""topd_jax.hardware.chips: the one chip table and its lookup by device_kind (the plan's roofline
and the trainer's MFU both read it)."""

import types

import pytest

from topd_jax.hardware import chips


def _device(kind):
    return types.SimpleNamespace(device_kind=kind)


def test_tpu_chips_carry_every_figure_and_others_a_peak_only():
    full = {c.name for c in chips.CHIPS.values() if c.roofline_known}
    assert full == {"v4", "v5e", "v5p", "v6e"}
    assert all(c.accelerator_prefix for c in chips.CHIPS.values() if c.name in full)
    for chip in chips.CHIPS.values():
        assert chip.peak_flops > 0
        if chip.name not in full:
            assert chip.hbm_bytes is None and chip.hbm_bandwidth is None and chip.ici_bandwidth is None
    v5p = chips.CHIPS["v5p"]
    assert (v5p.hbm_bytes, v5p.peak_flops, v5p.hbm_bandwidth, v5p.ici_bandwidth) == (95 * chips.GIB, 459e12, 2765e9,
                                                                                    1200e9)
    assert v5p.accelerator_type(16) == "v5p-32" and chips.CHIPS["v5e"].accelerator_type(4) == "v5litepod-4"
    with pytest.raises(ValueError, match="no Cloud TPU accelerator type"):
        chips.CHIPS["h100"].accelerator_type(8)


def test_per_device_splits_the_figures_evenly():
    v4 = chips.CHIPS["v4"]
    half = v4.per_device(2)
    assert half.hbm_bytes == 16 * chips.GIB and half.peak_flops == v4.peak_flops / 2
    assert (half.hbm_bandwidth, half.ici_bandwidth) == (v4.hbm_bandwidth / 2, v4.ici_bandwidth / 2)
    assert v4.per_device(1) is v4
    h100 = chips.CHIPS["h100"].per_device(2)
    assert h100.peak_flops == 989e12 / 2 and h100.hbm_bytes is None


def test_device_kinds():
    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
             "TPU v6 lite": "v6e", "TPU7x": "tpu7x", "TPU v3": "v3", "NVIDIA H100 80GB HBM3": "h100",
             "NVIDIA H100 PCIe": "h100 pcie", "NVIDIA GH200 480GB": "h200", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA L40S": "l40s", "NVIDIA L4": "l4", "cpu": None, "Some Accelerator": None}
    for kind, name in kinds.items():
        chip = chips.chip_of_device(_device(kind))
        assert (chip and chip.name) == name, kind
        assert chips.chip_of_kind(kind) is chip
    assert chips.chip_of_device(object()) is None  # no device_kind at all


def test_every_device_kind_finds_its_own_chip():
    """The table's order puts a more specific kind before any kind it contains."""
    for chip in chips.CHIPS.values():
        for kind in chip.device_kinds:
            assert chips.chip_of_kind(kind) is chip, kind
