"""Known accelerator chips: the one table of per-chip figures, and the lookup by `device_kind`.

Both the plan (its roofline and fit check, `plan/report.py`) and the trainer's MFU
(`trainer/flops.py`, `device_peak_flops`) read their figures here.

TPU figures are per chip from the public Cloud TPU documentation (the page is cited per chip):
HBM capacity, dense bf16 peak FLOP/s, HBM bandwidth and bidirectional inter-chip interconnect
(ICI) bandwidth. For the other chips (TPU v2, v3 and 7x; NVIDIA GPUs) only the dense bf16 peak is
tabled: their other figures are None (`Chip.roofline_known` is False), so the plan treats them as
an unknown chip and the trainer still gets their MFU. Where a topology exposes more than one device
per chip (v4 compiles per TensorCore, 2 per chip), `Chip.per_device` divides the figures evenly
among them.

`chip_of_device` / `chip_of_kind` match a chip by its `device_kinds`, each a lowercase substring
of `jax.Device.device_kind`, trying the chips in table order: more specific names come first
("h100 pcie" before "h100", "l40s" before "nvidia l4", "v5 lite" before "tpu v5").
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip: peak_flops (dense bf16 FLOP/s); hbm_bytes, hbm_bandwidth and ici_bandwidth
    (bytes/s), None where not tabled; device_kinds: lowercase substrings of its
    `jax.Device.device_kind`; accelerator_prefix (TPUs the plan compiles for): the Cloud TPU
    accelerator-type name of a slice of n chips is `accelerator_type(n)`."""

    name: str
    peak_flops: float
    device_kinds: tuple[str, ...]
    hbm_bytes: float | None = None
    hbm_bandwidth: float | None = None
    ici_bandwidth: float | None = None
    cores_per_chip_in_name: int = 1  # v4-8 / v5p-8 count TensorCores (2 per chip); v5e / v6e count chips
    accelerator_prefix: str | None = None

    @property
    def roofline_known(self) -> bool:
        """Whether HBM capacity and both bandwidths are tabled: the plan's fit check and roofline."""
        return None not in (self.hbm_bytes, self.hbm_bandwidth, self.ici_bandwidth)

    def accelerator_type(self, chips: int) -> str:
        if self.accelerator_prefix is None:
            raise ValueError(f"chip {self.name!r} has no Cloud TPU accelerator type")
        return f"{self.accelerator_prefix}-{chips * self.cores_per_chip_in_name}"

    def per_device(self, devices_per_chip: int) -> "Chip":
        """The figures of one of `devices_per_chip` devices sharing a chip evenly."""
        if devices_per_chip == 1:
            return self
        n = devices_per_chip
        split = lambda x: None if x is None else x / n  # noqa: E731
        return dataclasses.replace(self, hbm_bytes=split(self.hbm_bytes), peak_flops=self.peak_flops / n,
                                   hbm_bandwidth=split(self.hbm_bandwidth), ici_bandwidth=split(self.ici_bandwidth))


# In lookup order (module docstring): more specific device kinds first.
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("tpu7x", 2307e12, ("tpu7x",)),
    # https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s (bf16), HBM 32 GB at 1640 GBps (1638 in
    # the page's newer revision), bidirectional ICI 800 GBps per chip.
    Chip("v6e", 918e12, ("v6 lite", "v6e"), 32 * GIB, 1640e9, 800e9, 1, "v6e"),
    # https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s (bf16), HBM2 16 GB at 819 GBps,
    # bidirectional ICI 400 GBps per chip (1600 Gbps in the page's older revision).
    Chip("v5e", 197e12, ("v5 lite", "v5e"), 16 * GIB, 819e9, 400e9, 1, "v5litepod"),
    # https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s (bf16), HBM 95 GiB at 2765 GBps,
    # bidirectional ICI 1200 GBps per chip (4800 Gbps in the page's older revision).
    # v5p reports itself as "TPU v5".
    Chip("v5p", 459e12, ("v5p", "tpu v5"), 95 * GIB, 2765e9, 1200e9, 2, "v5p"),
    # https://cloud.google.com/tpu/docs/v4 : 275 TFLOP/s (bf16), HBM2 32 GiB at 1200 GBps. That page
    # gives no per-chip ICI figure; 6 ICI links of 45 GB/s one way each (90 GB/s bidirectional):
    # https://jax-ml.github.io/scaling-book/tpus/ -> 6 x 90 = 540 GB/s bidirectional per chip.
    Chip("v4", 275e12, ("tpu v4",), 32 * GIB, 1200e9, 540e9, 2, "v4"),
    Chip("v3", 123e12, ("tpu v3",)),
    Chip("v2", 45e12, ("tpu v2",)),
    Chip("b200", 2250e12, ("b200",)),
    Chip("h200", 989e12, ("h200",)),  # also GH200
    Chip("h100 pcie", 756e12, ("h100 pcie",)),
    Chip("h100", 989e12, ("h100",)),  # SXM
    Chip("h800", 989e12, ("h800",)),
    Chip("a100", 312e12, ("a100",)),
    Chip("a800", 312e12, ("a800",)),
    Chip("l40s", 362e12, ("l40s",)),
    Chip("l4", 121e12, ("nvidia l4",)),
    Chip("a10g", 70e12, ("a10g",)),
)}


def chip_of_kind(device_kind: str) -> Chip | None:
    """The known chip of a `device_kind` string (module docstring), or None (e.g. a CPU)."""
    kind = device_kind.lower()
    for chip in CHIPS.values():
        if any(k in kind for k in chip.device_kinds):
            return chip
    return None


def chip_of_device(device: Any) -> Chip | None:
    """The known chip of a device by its `device_kind`, or None."""
    return chip_of_kind(str(getattr(device, "device_kind", "")))


__all__ = ["CHIPS", "GIB", "Chip", "chip_of_device", "chip_of_kind"]
