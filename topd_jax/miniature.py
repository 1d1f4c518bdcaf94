"""The paper's experiment in miniature, on the synthetic task, on a CPU.

    teacher = sft(TEACHER, style=TEACHER_STYLE, steps=...)    # larger, well trained
    student = sft(STUDENT, style=STUDENT_STYLE, steps=...)    # smaller, less trained, other style
    distil(student, teacher, preset="opd" | "opd_suppress" | "topd", seed=s)  -> accuracy curve
    locator_analysis(student, teacher)   -> OT locator vs window_kl proxy against fork labels

Supervised training uses the trainer's `sft_update` (next-token cross-entropy on the solution
tokens); distillation runs the real `Trainer` on `data.source: synthetic` with the SFT'd models
loaded from Hugging Face checkpoints, so the miniature exercises exactly the code of a real run.
Accuracy is greedy (single-sample, as the paper reports) on held-out problems (seed 10_000).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from topd_jax.data import synthetic
from topd_jax.models.checkpoint import load_pretrained, save_pretrained
from topd_jax.models.decoder import CausalLM
from topd_jax.prompts import left_pad
from topd_jax.sampling import generate
from topd_jax.trainer import placement
from topd_jax.trainer.config import RandomModelConfig
from topd_jax.trainer.step import init_state

VOCAB = len(synthetic.VOCAB)
TEACHER = RandomModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_layers=3, num_heads=4,
                            num_kv_heads=2, head_dim=16, init_seed=1)
STUDENT = RandomModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=12, init_seed=2)
EVAL_SEED = 10_000
MAX_COMPLETION = 28  # longest 3-step solution (23 tokens) + EOS, with room for detours


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """Supervised training of one model on synthetic solutions written in `style`."""

    model: RandomModelConfig
    style: synthetic.Style
    steps: int
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """A short hash of everything that determines the trained weights (the cache key)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sft_batch(seed: int, index: int, batch_size: int, style: synthetic.Style):
    """Batch `index`: tokens [G, L] = left-padded prompt | solution | EOS | right padding, mask,
    loss_mask (the solution and EOS only)."""
    rng = np.random.default_rng([seed, index])
    tok = synthetic.SyntheticTokenizer()
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    loss_mask = np.zeros((batch_size, width), bool)
    for g in range(batch_size):
        problem = synthetic.sample_problem(rng)
        prompt = tok.encode(problem.prompt())
        answer = tok.encode(synthetic.solution(problem, rng, style)) + [synthetic.EOS_ID]
        start = synthetic.PROMPT_LENGTH - len(prompt)
        end = synthetic.PROMPT_LENGTH + len(answer)
        tokens[g, start:end] = prompt + answer
        mask[g, start:end] = True
        loss_mask[g, synthetic.PROMPT_LENGTH:end] = True
    return tokens, mask, loss_mask


def sft(config: SftConfig, *, progress: Callable[[int, float], None] | None = None) -> CausalLM:
    """A model of `config.model` trained for `config.steps` AdamW steps (cosine decay)."""
    cfg = config.model.model_config()
    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(config.model.init_seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    state = init_state(params, optimizer, jax.random.PRNGKey(config.seed))
    mesh = placement.data_mesh(jax.devices()[:1])
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    update = placement.jit_sft_update(state, (config.batch_size, width), mesh, graphdef=graphdef,
                                      optimizer=optimizer, chunk_size=1024)
    for i in range(config.steps):
        state, metrics = update(state, *sft_batch(config.seed, i, config.batch_size, config.style))
        if progress is not None:
            progress(i + 1, float(metrics["loss"]))
    return nnx.merge(graphdef, state.params)


def cached_sft(config: SftConfig, cache_dir: str | os.PathLike, name: str, **kwargs) -> str:
    """The HF checkpoint directory of `sft(config)` under cache_dir/name-<hash>, trained once."""
    path = os.path.join(os.fspath(cache_dir), f"{name}-{config.key()}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        save_pretrained(sft(config, **kwargs), path)
    return path


def eval_problems(count: int) -> list[synthetic.Problem]:
    """The held-out problems (a seed no training batch uses)."""
    return synthetic.problems(EVAL_SEED, 0, count)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy(graphdef, params, prompts, mask):
    model = nnx.merge(graphdef, params)
    return generate(model, prompts, mask, key=jax.random.PRNGKey(0), max_new_tokens=MAX_COMPLETION, temperature=0.0,
                    eos_ids=(synthetic.EOS_ID,)).tokens


def completions(model: CausalLM, problems: Sequence[synthetic.Problem]) -> np.ndarray:
    """Greedy completions [n, MAX_COMPLETION] int32 of each problem's prompt."""
    tok = synthetic.SyntheticTokenizer()
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], synthetic.PROMPT_LENGTH)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(_greedy(graphdef, params, prompts, mask))


def accuracy(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """Greedy single-sample accuracy: the share of problems whose completion ends in the right answer."""
    tok = synthetic.SyntheticTokenizer()
    outs = completions(model, problems)
    return float(np.mean([synthetic.is_correct(p, tok.decode(o)) for p, o in zip(problems, outs)]))


def load(path: str) -> CausalLM:
    return load_pretrained(path, dtype=jnp.float32)


__all__ = ["STUDENT", "SftConfig", "TEACHER", "accuracy", "cached_sft", "completions", "eval_problems", "load",
           "sft", "sft_batch"]
