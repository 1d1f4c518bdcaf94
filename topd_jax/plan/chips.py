"""Known TPU chips and the devices of a topology, compiled for without a TPU.

A topology name is `<chip>:<shape>`, e.g. `v5p:4x4x2` (32 chips), `v6e:8x8` (64), `v5e:4x4` (16):
the chip and the slice's chip grid, as in Cloud TPU's `--topology`. `topology_devices` asks
libtpu for that slice's devices (`jax.experimental.topologies.get_topology_desc`): compile-only
devices that `jax.jit(...).lower(...).compile()` targets on a machine without any TPU.
`local` means the devices of this machine (on a TPU VM, its real chips).

Figures are per chip from the public Cloud TPU documentation (the page is cited per chip):
HBM capacity, dense bf16 peak FLOP/s, HBM bandwidth and bidirectional inter-chip interconnect
(ICI) bandwidth. Where a topology exposes more than one device per chip (v4 compiles per
TensorCore, 2 per chip), `Chip.per_device` divides the figures evenly among them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: hbm_bytes, peak_flops (dense bf16 FLOP/s), hbm_bandwidth and ici_bandwidth
    (bytes/s); device_kinds: `jax.Device.device_kind` of the chip (lowercase); accelerator_type:
    the Cloud TPU accelerator-type name of a slice of n chips."""

    name: str
    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float
    device_kinds: tuple[str, ...]
    cores_per_chip_in_name: int  # v4-8 / v5p-8 count TensorCores (2 per chip); v5e / v6e count chips
    accelerator_prefix: str

    def accelerator_type(self, chips: int) -> str:
        return f"{self.accelerator_prefix}-{chips * self.cores_per_chip_in_name}"

    def per_device(self, devices_per_chip: int) -> "Chip":
        """The figures of one of `devices_per_chip` devices sharing a chip evenly."""
        if devices_per_chip == 1:
            return self
        n = devices_per_chip
        return dataclasses.replace(self, hbm_bytes=self.hbm_bytes / n, peak_flops=self.peak_flops / n,
                                   hbm_bandwidth=self.hbm_bandwidth / n, ici_bandwidth=self.ici_bandwidth / n)


CHIPS: dict[str, Chip] = {
    # https://cloud.google.com/tpu/docs/v4 : 275 TFLOP/s (bf16), HBM2 32 GiB at 1200 GBps. That page
    # gives no per-chip ICI figure; 6 ICI links of 45 GB/s one way each (90 GB/s bidirectional):
    # https://jax-ml.github.io/scaling-book/tpus/ -> 6 x 90 = 540 GB/s bidirectional per chip.
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 540e9, ("tpu v4",), 2, "v4"),
    # https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s (bf16), HBM2 16 GB at 819 GBps,
    # bidirectional ICI 400 GBps per chip (1600 Gbps in the page's older revision).
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9, ("tpu v5 lite", "tpu v5e"), 1, "v5litepod"),
    # https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s (bf16), HBM 95 GiB at 2765 GBps,
    # bidirectional ICI 1200 GBps per chip (4800 Gbps in the page's older revision).
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9, ("tpu v5p", "tpu v5"), 2, "v5p"),
    # https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s (bf16), HBM 32 GB at 1640 GBps (1638 in
    # the page's newer revision), bidirectional ICI 800 GBps per chip.
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 800e9, ("tpu v6 lite", "tpu v6e"), 1, "v6e"),
}
KNOWN = "known chips: " + ", ".join(CHIPS) + " (e.g. v5p:4x4x2, v6e:8x8, v5e:4x4), or local"
_SHAPE = re.compile(r"^\d+(x\d+){1,2}$")


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """`v5p:4x4x2` -> (the v5p Chip, (4, 4, 2)); a one-line ValueError for anything else."""
    chip, _, shape = name.partition(":")
    if chip not in CHIPS or not _SHAPE.match(shape):
        raise ValueError(f"unknown topology {name!r}; {KNOWN}")
    return CHIPS[chip], tuple(int(n) for n in shape.split("x"))


def chip_of_device(device: Any) -> Chip | None:
    """The known chip of a device by its device_kind (most specific name first), or None."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for chip in sorted(CHIPS.values(), key=lambda c: -max(len(k) for k in c.device_kinds)):
        if any(kind == k or kind.startswith(k + " ") for k in chip.device_kinds):
            return chip
    return None


def compile_only_env(chip: Chip, chips: int) -> None:
    """On a host without TPU chips, prepare libtpu for compiling only: name the slice it stands for
    (else it warns at length about a missing TPU metadata server) and skip its single-process
    lock (/tmp/libtpu_lockfile, which would make a second planning process fail while the first
    runs; with no chips there is nothing to guard). Variables already set are kept; on a TPU VM
    (a /dev/accel* or /dev/vfio device) nothing is set."""
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
        return
    for name, value in (("TPU_ACCELERATOR_TYPE", chip.accelerator_type(chips)), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_WORKER_ID", "0"), ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)


def topology_devices(name: str) -> tuple[list[Any], Chip | None]:
    """The devices of topology `name` and their chip, per device (see `Chip.per_device`).

    `local`: jax.devices() and their chip if known (None for CPUs and GPUs). Otherwise the
    compile-only devices of the TPU slice from libtpu (installed by the `tpu` extra; no TPU is
    opened, so this works with JAX_PLATFORMS=cpu). Errors are one line.
    """
    import jax

    if name == "local":
        devices = list(jax.devices())
        return devices, chip_of_device(devices[0])
    chip, shape = parse_topology(name)
    chips = 1
    for n in shape:
        chips *= n
    compile_only_env(chip, chips)
    from jax.experimental import topologies

    try:
        devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except RuntimeError as err:  # libtpu missing (RuntimeError) or a shape it refuses (JaxRuntimeError)
        raise ValueError(f"topology {name!r}: {first_line(err)}") from None
    per_chip = len(devices) // max(len({tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)}), 1)
    return devices, chip.per_device(per_chip)


def first_line(err: BaseException) -> str:
    """An exception's message on one line (XLA's messages run over many)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].strip()


__all__ = ["CHIPS", "GIB", "KNOWN", "Chip", "chip_of_device", "compile_only_env", "first_line", "parse_topology",
           "topology_devices"]
