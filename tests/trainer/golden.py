"""Golden metrics: tiny fixed-seed runs of every preset and variant, as metrics.jsonl rows.

    python tests/trainer/golden.py tests/trainer/golden_metrics.json   # (re)record

A refactor that must not change behaviour is checked against the recorded file
(tests/trainer/test_golden.py): same config, same seed, the same per-step metrics, exactly.
Record it again only for a change that is meant to alter what a step computes, and say so in
the commit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

# Each run: (name, overrides on configs/tiny_cpu.yaml).
BASE = ["steps=2", "checkpoint.every=0", "rollout.prompts_per_step=8", "rollout.max_new_tokens=10",
        "data.prompt_length=5", "loss.window=4", "loss.max_candidates=2", "logging.progress=false",
        "logging.tensorboard=false"]
RUNS = {
    "opd": ["preset=opd"],
    "opd_suppress": ["preset=opd_suppress"],
    "topd": ["preset=topd"],
    # The other locator, threshold mode and guidance form in one run.
    "topd_variants": ["preset=topd", "loss.locator=window_kl", "loss.threshold_mode=quantile",
                      "loss.guidance_options.step_loss=topk_fkl", "loss.guidance_options.top_k=4"],
}
TIMING = ("time_", "tokens_per_s", "mfu")


def run_metrics(name: str, root: str) -> list[dict]:
    """metrics.jsonl rows of run `name`, without the wall-clock fields."""
    from topd_jax.trainer.config import load_config
    from topd_jax.trainer.loop import Trainer

    out = os.path.join(root, name)
    trainer = Trainer(load_config("configs/tiny_cpu.yaml", [f"output_dir={out}", *BASE, *RUNS[name]]))
    trainer.run()
    trainer.close()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        golden = {name: run_metrics(name, root) for name in RUNS}
    with open(sys.argv[1], "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
