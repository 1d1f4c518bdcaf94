"""Command line: will this train config fit a TPU slice? Compile every phase for its topology.

    python -m topd_jax.plan --config configs/paper_qwen3_30b_a3b_to_4b.yaml --topology v5p:4x4x2 \\
        student.path=../shared/models/qwen3-4b-instruct-2507 teacher.path=../shared/models/qwen3-30b-a3b-instruct-2507

Same config file and `key=value` overrides as `python -m topd_jax.train`. TOPOLOGY is a TPU slice
(`v5p:4x4x2`, `v6e:8x8`, `v5e:4x4`: chip and chip grid) compiled for on any machine through libtpu
(`pip install -e ".[tpu]"`; no TPU is opened), or `local` for this machine's devices. Models need
only their config.json (no weight file is read). Prints per-device memory, FLOPs, HBM bytes,
collective bytes and a roofline estimate per phase (sample, score, branch, train), and the sample
phase per rollout mode (static, continuous) side by side at the rollouts' lengths: --lengths max
(every rollout runs to max_new_tokens), lognormal:MEAN,SIGMA (E[length] = MEAN tokens before the
cap, SIGMA its log-space sigma) or PATH.json ({"lengths": [...], "counts": [...]}); exit status 1
with one line per phase that exceeds --headroom x HBM or does not compile, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from topd_jax.errors import ArgumentParser  # argparse's errors as one line, exit 2

    parser = ArgumentParser(prog="python -m topd_jax.plan", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML train config (default: every key at its default)")
    parser.add_argument("--topology", required=True, help="TPU topology (v5p:4x4x2, v6e:8x8, v5e:4x4, v4:2x2x2) or local")
    parser.add_argument("--headroom", type=float, default=0.9, help="fraction of HBM a phase may use (default 0.9)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--student-layers", type=int, metavar="N",
                        help="compile only the student's first N layers (shape studies; labelled in the output)")
    parser.add_argument("--teacher-layers", type=int, metavar="N", help="the same for the teacher")
    parser.add_argument("--no-decode-steps", action="store_true",
                        help="skip compiling one decode step of each loop alone")
    parser.add_argument("--phases", metavar="LIST",
                        help="compile only these of sample,score,branch,train (the others are lowered for shapes)")
    parser.add_argument("--lengths", default="max", metavar="SPEC",
                        help="rollout lengths: max (default), lognormal:MEAN,SIGMA or PATH.json (docs/plan.md)")
    parser.add_argument("--buffers", type=int, default=0, metavar="N",
                        help="also list each phase's N largest arrays of the compiled program")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may stand before or after the options


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.topology != "local":  # compile-only TPU devices: never open an accelerator here, and
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # cache nothing that cannot be loaded back
        os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
    from topd_jax.configuration import ConfigError, check_command_line
    from topd_jax.trainer.config import load_config

    if not 0 < args.headroom <= 1:
        print(f"error: --headroom must be in (0, 1], got {args.headroom}", file=sys.stderr)
        return 2
    from topd_jax.errors import one_line
    from topd_jax.fileio import check_writable, write_file
    from topd_jax.plan import topology

    phases = tuple(p.strip() for p in args.phases.split(",")) if args.phases else None
    try:
        if args.topology != "local":
            topology.parse_topology(args.topology)  # the chip's grid, before anything is read or compiled
        check_command_line(args.config, args.overrides)
        config = load_config(args.config, args.overrides)
        from topd_jax.trainer.inputs import check_bounds

        check_bounds(config)  # what training would refuse is refused before compiling it
        for flag in ("student_layers", "teacher_layers"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        if args.buffers < 0:
            raise ConfigError(f"--buffers must be >= 0, got {args.buffers}")
        if phases is not None:
            from topd_jax.plan.measure import PHASES

            unknown = [p for p in phases if p not in PHASES]
            if unknown or not phases:
                raise ConfigError(f"--phases: unknown phase {(unknown or [''])[0]!r}; choose from {','.join(PHASES)}")
        from topd_jax.plan.lengths import parse_lengths
        from topd_jax.plan.modes import check_mode

        lengths = parse_lengths(args.lengths)
        check_mode(config.rollout.mode)
        if args.json:  # before minutes of compiling, not after
            check_writable(args.json, directory=False)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    from topd_jax.plan import measure, report

    try:
        devices, chip = topology.topology_devices(args.topology)
        plan = measure.plan_step(config, devices, student_layers=args.student_layers,
                                 teacher_layers=args.teacher_layers, decode_steps=not args.no_decode_steps,
                                 buffers=args.buffers, only=phases, lengths=lengths,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(report.format_table(plan, chip, args.topology, args.headroom))
    if args.json:
        try:
            write_file(args.json, json.dumps(report.to_json(plan, chip, args.topology, args.headroom), indent=2) + "\n")
        except OSError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
    failed = report.failures(plan, chip, args.headroom)
    for line in failed:
        print(f"does not fit: {line}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["main", "parse_args"]
