"""Command line: write a training checkpoint's student as a Hugging Face checkpoint.

    python -m topd_jax.export --checkpoint runs/tiny_cpu --out exported/ [--step N] [--dtype bfloat16]

--checkpoint is a run's output_dir or its checkpoints/ directory; the newest complete checkpoint
is used unless --step names one. Only the student's parameters are read (not the optimizer
state). The output holds config.json and safetensors that transformers loads, plus the
student's tokenizer files when the run loaded the student from a directory that has them. The
output directory is replaced whole, so a failed export leaves an earlier one intact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
           dtype: str | None = None) -> int:
    """Export the student of `checkpoint` (run dir or its checkpoints/) to `out`; returns the step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from topd_jax.models.checkpoint import save_pretrained
    from topd_jax.models.decoder import CausalLM
    from topd_jax.models.families import config_from_hf
    from topd_jax.trainer.checkpointing import Checkpointer, CheckpointError
    from topd_jax.trainer.loop import CHECKPOINT_DIR

    directory = os.fspath(checkpoint)
    if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with Checkpointer(directory, every=0, keep=1, async_save=False, read_only=True) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise CheckpointError(f"no complete checkpoint {'' if step is None else step} in {directory}; "
                                  f"complete steps: {checkpointer.all_steps()}")
        hf_config = checkpointer.restore_json(step, "model_config")
        run_config = checkpointer.restore_json(step, "config")
        cfg = config_from_hf(hf_config)
        saved_dtype = run_config["student"]["dtype"]
        param_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[saved_dtype]
        abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=param_dtype, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
        params = checkpointer.restore_tree(step, "params", target)
    model = nnx.merge(graphdef, params)
    source = run_config["student"].get("path")
    os.makedirs(out, exist_ok=True)
    if source and os.path.isdir(source):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    save_pretrained(model, out, dtype=None if dtype is None else {"float32": jnp.float32,
                                                                    "bfloat16": jnp.bfloat16}[dtype])
    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topd_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run output_dir or its checkpoints/ directory")
    parser.add_argument("--out", required=True, help="Hugging Face checkpoint directory to write")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: as trained)")
    args = parser.parse_args(argv)
    from topd_jax.trainer.checkpointing import CheckpointError

    try:
        step = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.checkpoint} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
