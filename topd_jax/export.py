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
refused. The success line says what the export replaced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Callable, Sequence

from topd_jax.configuration import ConfigError
from topd_jax.errors import ArgumentParser, exit_quietly, run_cli
from topd_jax.fileio import check_writable, recover_directory, replace_directory
from topd_jax.models.checkpoint import is_checkpoint_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None, report: Callable[[str], None] = lambda message: None) -> int:
    """Export the student of `checkpoint` (run dir or its checkpoints/) to `out`; returns the step.

    Without `step`, the newest step that reads back is used; each newer unreadable one is
    reported through `report` (one line) and left where it is (a reader never renames). Refused
    with a CheckpointError: a named step that is unreadable, and weights that are not all finite
    (a diverged run), so no NaN model is ever written.
    """
    import jax
    import numpy as np
    from flax import nnx

    from topd_jax.models.checkpoint import write_pretrained
    from topd_jax.models.config import DTYPES
    from topd_jax.models.decoder import CausalLM
    from topd_jax.models.families import config_from_hf
    from topd_jax.trainer.checkpointing import (CHECKPOINT_DIR, Checkpointer, CheckpointError, UnreadableCheckpoint,
                                                leaf_name)

    directory = os.fspath(checkpoint)
    if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")

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

    with Checkpointer(directory, every=0, keep=1, async_save=False, read_only=True) as checkpointer:
        steps = checkpointer.all_steps()
        if not steps or (step is not None and step not in steps):
            raise CheckpointError(f"no complete checkpoint {'' if step is None else step} in {directory}; "
                                  f"complete steps: {steps}")
        for candidate in ([step] if step is not None else reversed(steps)):
            try:
                run_config, graphdef, params = read(checkpointer, candidate)
            except UnreadableCheckpoint as err:
                if step is not None:
                    raise
                report(f"{err}; trying the next older step")
                continue
            step = candidate
            break
        else:
            raise CheckpointError(f"no readable checkpoint in {directory} (steps "
                                  f"{', '.join(str(s) for s in reversed(steps))} unreadable)")
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
    return step


def is_export_file(name: str) -> bool:
    """The files an export writes, and so replaces (a stale generation_config.json included);
    anything else in the folder (a README) is kept."""
    return name in TOKENIZER_FILES or is_checkpoint_file(name)


def check_out(out: str | os.PathLike) -> str:
    """Refuse an --out that cannot be written or holds something other than an export, before
    any checkpoint is read; returns what the export will replace there, as a phrase ('' if new)."""
    out = os.fspath(out)
    check_writable(out, directory=True, parents=False)
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
    parser.add_argument("--out", required=True, help="Hugging Face checkpoint directory to write (created if new; "
                        "its parent folder must exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest readable one)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast the weights (default: as trained)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or TOPD_DEBUG=1)")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.step is not None and args.step < 0:
            raise ConfigError(f"--step must be >= 0, got {args.step}")
        replaces = check_out(args.out)
        step = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                      report=lambda message: print(f"warning: {message}", file=sys.stderr))
        print(f"exported step {step} of {args.checkpoint} to {args.out}{replaces}")
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    exit_quietly(main())
