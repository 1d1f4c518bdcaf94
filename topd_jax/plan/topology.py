"""The devices of a TPU topology, compiled for without a TPU, and their chip.

A topology name is `<chip>:<shape>`, e.g. `v5p:4x4x2` (32 chips), `v6e:8x8` (64), `v5e:4x4` (16):
the chip and the slice's chip grid, as in Cloud TPU's `--topology`. `topology_devices` asks
libtpu for that slice's devices (`jax.experimental.topologies.get_topology_desc`): compile-only
devices that `jax.jit(...).lower(...).compile()` targets on a machine without any TPU.
`local` means the devices of this machine (on a TPU VM, its real chips).

The chips and their figures are the table in `topd_jax.hardware.chips`; a topology names one
of its TPU chips whose figures are all tabled (`Chip.roofline_known`) and that has a Cloud TPU
accelerator type (`TOPOLOGY_CHIPS`). Where a topology exposes more than one device per chip (v4
compiles per TensorCore, 2 per chip), `Chip.per_device` divides the figures evenly among them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from topd_jax.errors import first_line
from topd_jax.hardware.chips import CHIPS, Chip, chip_of_device

TOPOLOGY_CHIPS: dict[str, Chip] = {name: CHIPS[name] for name in sorted(CHIPS)
                                   if CHIPS[name].roofline_known and CHIPS[name].accelerator_prefix}
KNOWN = "known chips: " + ", ".join(TOPOLOGY_CHIPS) + " (e.g. v5p:4x4x2, v6e:8x8, v5e:4x4), or local"
_SHAPE = re.compile(r"^\d+(x\d+){1,2}$")


# The chip grid of a slice: v4 and v5p chips are wired in a 3-D torus (slices AxBxC), v5e and
# v6e in a 2-D one (slices AxB), as Cloud TPU's --topology names them.
GRID_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_EXAMPLES = {3: "2x2x1, 2x2x2, 2x2x4, 4x4x4", 2: "2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16"}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """`v5p:4x4x2` -> (the v5p Chip, (4, 4, 2)); a one-line ValueError for anything else: an
    unknown chip, a malformed shape, a grid of the wrong dimension for the chip (GRID_DIMS), a
    side of 0."""
    chip, _, shape = name.partition(":")
    if chip not in TOPOLOGY_CHIPS or not _SHAPE.match(shape):
        raise ValueError(f"unknown topology {name!r}; {KNOWN}")
    grid = tuple(int(n) for n in shape.split("x"))
    dims = GRID_DIMS.get(chip)
    if dims is not None and len(grid) != dims:
        raise ValueError(f"topology {name!r}: {chip} slices are {dims}-D chip grids "
                         f"({'x'.join('ABC'[:dims])}, e.g. {_EXAMPLES[dims]}), not {len(grid)}-D")
    if 0 in grid:
        raise ValueError(f"topology {name!r}: every side of the chip grid must be >= 1")
    return TOPOLOGY_CHIPS[chip], grid


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

    `local`: jax.devices() and their chip where the plan's figures for it are all known (None
    for CPUs, GPUs and other chips with a peak FLOP/s only). Otherwise the compile-only devices
    of the TPU slice from libtpu (installed by the `tpu` extra; no TPU is opened, so this works
    with JAX_PLATFORMS=cpu). Errors are one line.
    """
    import jax

    if name == "local":
        devices = list(jax.devices())
        chip = chip_of_device(devices[0])
        return devices, chip if chip is not None and chip.roofline_known else None
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


__all__ = ["GRID_DIMS", "KNOWN", "TOPOLOGY_CHIPS", "compile_only_env", "parse_topology", "topology_devices"]
