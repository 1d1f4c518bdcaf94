"""Command line: write a training checkpoint's student as a Hugging Face checkpoint.

    python -m topd_jax.export --checkpoint runs/tiny_cpu --out exported/ [--step N] [--dtype bfloat16]

--checkpoint is a run's output_dir or its checkpoints/ directory; the newest checkpoint that
reads back is used unless --step names one (an unreadable newer step is reported, one line, and
left in place). Weights that are not all finite (a diverged run) are refused. Only the
student's parameters are read (not the optimizer state). The output holds config.json and
safetensors that transformers loads, plus the run's tokenizer when it has one: the files of the
student's directory (student.path), or the synthetic task's word-level tokenizer for a
data.source=synthetic run (a random-prompt run of random models has none; eval then needs
--tokenizer). Weights, config.json, tokenizer and generation config are staged in one folder
beside --out and swapped in by one atomic rename: a failed or killed export leaves an earlier
one exactly as it was (and keeps its permissions), and the next export removes what a killed
one left. Other files in --out (a README) are kept; a non-empty --out without config.json is
refused. One export writes an --out at a time (a lock file `.<name>.lock` beside it while it
runs): a second one meanwhile is refused in one line. The success line names the step and the
run that saved it (its run id) and says what the export replaced. A run that is training right
now is read from a snapshot of hard links to its steps, so its retention cannot delete the step
being read (where no snapshot can be made, the export is refused in one line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator, Sequence

from topd_jax.configuration import ConfigError
from topd_jax.errors import ArgumentParser, exit_quietly, run_cli
from topd_jax.fileio import check_writable, directory_lock, process_alive, recover_directory, replace_directory
from topd_jax.models.checkpoint import is_checkpoint_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export wrote: the checkpoint step, the run that saved it (its run id; None for a
    checkpoint from before run ids) and the checkpoints directory it was read from."""

    step: int
    run_id: str | None
    directory: str

    def describe(self, checkpoint: str | os.PathLike) -> str:
        """'step 2 of runs/x (run 20261207T135818Z-3f2a)'."""
        return f"step {self.step} of {os.fspath(checkpoint)}" + (f" (run {self.run_id})" if self.run_id else "")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None, report: Callable[[str], None] = lambda message: None) -> int:
    """Export the student of `checkpoint` (run dir or its checkpoints/) to `out`; returns the step
    (`export_step` for the run it belongs to as well)."""
    return export_step(checkpoint, out, step=step, dtype=dtype, report=report).step


def export_step(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                dtype: str | None = None, report: Callable[[str], None] = lambda message: None) -> Exported:
    """Export the student of `checkpoint` (run dir or its checkpoints/) to `out`.

    Without `step`, the newest step that reads back is used; each newer unreadable one is
    reported through `report` (one line) and left where it is (a reader never renames). Refused
    with a CheckpointError: a named step that is unreadable, and weights that are not all finite
    (a diverged run), so no NaN model is ever written. While a trainer holds the run, its steps
    are read from a hard-linked snapshot (`_steps_to_read`): its retention cannot delete them
    under the read.
    """
    import jax
    import numpy as np
    from flax import nnx

    from topd_jax.models.checkpoint import write_pretrained
    from topd_jax.models.config import DTYPES
    from topd_jax.trainer.checkpointing import CHECKPOINT_DIR, CheckpointError, leaf_name

    directory = os.fspath(checkpoint)
    if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with _steps_to_read(directory) as readable:
        run_id, step, run_config, graphdef, params = _read_newest(readable, directory, step, report)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not np.all(np.isfinite(np.asarray(leaf, np.float32))):
            raise CheckpointError(f"checkpoint step {step} in {directory}: params/{leaf_name(path)} holds NaN or "
                                  "inf (the run diverged); export an earlier step with --step")
    model = nnx.merge(graphdef, params)
    with replace_directory(out, replaced=is_export_file) as staging:
        # The tokenizer, generation config, weights and config.json are staged together and
        # swapped in at once: a killed export leaves the previous export exactly as it was.
        source = run_config["student"].get("path")
        if source and os.path.isdir(source):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))
        elif run_config.get("data", {}).get("source") == "synthetic":  # the run's tokenizer: the task's own
            from topd_jax.data.synthetic import SyntheticTokenizer

            SyntheticTokenizer().save_pretrained(staging)
        write_pretrained(model, staging, dtype=None if dtype is None else DTYPES[dtype])
    return Exported(step, run_id, directory)


def _read_newest(readable: str, directory: str, step: int | None, report: Callable[[str], None]):
    """(run id, step, run config, graphdef, params) of checkpoint `step` (None: the newest that
    reads back) in `readable`; errors name `directory`, the run's own checkpoints folder."""
    import jax
    from flax import nnx

    from topd_jax.models.config import DTYPES
    from topd_jax.models.decoder import CausalLM
    from topd_jax.models.families import config_from_hf
    from topd_jax.trainer.checkpointing import Checkpointer, CheckpointError, UnreadableCheckpoint

    def read(checkpointer, step):
        hf_config = checkpointer.restore_json(step, "model_config")
        run_config = checkpointer.restore_json(step, "config")
        cfg = config_from_hf(hf_config)
        param_dtype = DTYPES[run_config["student"]["dtype"]]
        abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=param_dtype, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
        return run_config, graphdef, checkpointer.restore_tree(step, "params", target)

    def named(err: Exception) -> str:  # a snapshot's path is the run's checkpoints folder to the user
        return str(err).replace(readable, directory)

    with Checkpointer(readable, every=0, keep=1, async_save=False, read_only=True) as checkpointer:
        steps = checkpointer.all_steps()
        if not steps or (step is not None and step not in steps):
            raise CheckpointError(f"no complete checkpoint {'' if step is None else step} in {directory}; "
                                  f"complete steps: {steps}")
        for candidate in ([step] if step is not None else reversed(steps)):
            try:
                run_config, graphdef, params = read(checkpointer, candidate)
                run_id = checkpointer.restore_json(candidate, "meta").get("run_id")
            except UnreadableCheckpoint as err:
                if step is not None:
                    raise UnreadableCheckpoint(named(err)) from err
                report(f"{named(err)}; trying the next older step")
                continue
            return run_id, candidate, run_config, graphdef, params
        raise CheckpointError(f"no readable checkpoint in {directory} (steps "
                              f"{', '.join(str(s) for s in reversed(steps))} unreadable)")


SNAPSHOT_PREFIX = ".export-snapshot-"  # <output_dir>/.export-snapshot-<pid>-<random>/<step>/...


@contextlib.contextmanager
def _steps_to_read(directory: str) -> Iterator[str]:
    """The checkpoints folder to read: `directory` itself, or, while a trainer holds the run
    (rundir.held_by), a snapshot of its complete steps made of hard links in a hidden folder of
    the run's output_dir, removed afterwards. The trainer's retention deletes a step by removing
    its names; the snapshot's names keep the same files, so no step vanishes under the read. No
    data is copied. Where no snapshot can be made (another file system, no write permission) the
    export is refused with one line naming the trainer. Snapshots a killed export left are
    removed (their process is gone)."""
    from topd_jax.errors import CheckpointError
    from topd_jax.trainer.rundir import held_by

    output_dir = os.path.dirname(os.path.abspath(directory))
    for entry in os.listdir(output_dir):
        pid = entry[len(SNAPSHOT_PREFIX):].split("-", 1)[0] if entry.startswith(SNAPSHOT_PREFIX) else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
    holder = held_by(output_dir)
    if holder is None:
        yield directory
        return
    try:
        snapshot = tempfile.mkdtemp(prefix=f"{SNAPSHOT_PREFIX}{os.getpid()}-", dir=output_dir)
    except OSError as err:
        raise CheckpointError(_busy(directory, holder, err)) from err
    try:
        for entry in sorted(os.listdir(directory)):
            if not entry.isdigit():  # a save in progress (Orbax's tmp folder), a step moved aside
                continue
            try:
                shutil.copytree(os.path.join(directory, entry), os.path.join(snapshot, entry), copy_function=os.link)
            except FileNotFoundError:  # retention removed it while it was linked: it is not there to read
                shutil.rmtree(os.path.join(snapshot, entry), ignore_errors=True)
            except OSError as err:  # EXDEV, EPERM: hard links cannot be made here
                raise CheckpointError(_busy(directory, holder, err)) from err
        yield snapshot
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def _busy(directory: str, holder: str, err: OSError) -> str:
    from topd_jax.errors import one_line

    return (f"{directory} belongs to a run that is training right now ({holder}) and its steps cannot be "
            f"snapshotted to be read safely ({one_line(err)}): its retention may delete the step being read; "
            "export after the run ends, or from a copy of the run")


def is_export_file(name: str) -> bool:
    """The files an export writes, and so replaces (a stale generation_config.json included);
    anything else in the folder (a README) is kept."""
    return name in TOKENIZER_FILES or is_checkpoint_file(name)


def check_out(out: str | os.PathLike) -> str:
    """Refuse an --out that cannot be written or holds something other than an export, before
    any checkpoint is read; returns what the export will replace there, as a phrase ('' if new)."""
    out = os.fspath(out)
    check_writable(out, directory=True)
    recover_directory(out)  # a killed export's staging folder, or its parked earlier version
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        return ""
    if "config.json" not in entries:
        raise ConfigError(f"--out {out} is a folder with files but no export in it (no config.json); an export "
                          "replaces its folder's model files, so pick a new or empty folder")
    replaced = [e for e in entries if is_export_file(e)]
    kept = [e for e in entries if not is_export_file(e)]
    return (f"; replaced the earlier export there ({', '.join(replaced)})"
            + (f", kept {', '.join(kept)}" if kept else ""))


def main(argv: Sequence[str] | None = None) -> int:
    from topd_jax.models.config import DTYPES

    parser = ArgumentParser(prog="python -m topd_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run output_dir or its checkpoints/ directory")
    parser.add_argument("--out", required=True, help="Hugging Face checkpoint directory to write (created, with its "
                        "parents, if new)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest readable one)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast the weights (default: as trained)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or TOPD_DEBUG=1)")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.step is not None and args.step < 0:
            raise ConfigError(f"--step must be >= 0, got {args.step}")
        check_writable(args.out, directory=True)
        with directory_lock(args.out):  # a second export into --out meanwhile is refused, in one line
            replaces = check_out(args.out)
            exported = export_step(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                                   report=lambda message: print(f"warning: {message}", file=sys.stderr))
        print(f"exported {exported.describe(args.checkpoint)} to {args.out}{replaces}")
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    exit_quietly(main())
