"""The miniature's two models: supervised training on the synthetic task, the cache, and greedy
evaluation (the accuracy every comparison of the experiments reports).

    teacher = load(cached_sft(TEACHER_SFT, cache, "teacher"))   # larger, corrects its slips
    student = load(cached_sft(STUDENT_SFT, cache, "student"))   # smaller, less trained, other style
    correct = correctness(student, eval_problems(1024))         # bool [n], greedy single sample

Supervised training uses the trainer's `sft_update` (next-token cross-entropy on the solution
tokens). Accuracy is greedy (single-sample, as the paper reports).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from topd_jax.data import synthetic
from topd_jax.models.checkpoint import load_pretrained, save_pretrained
from topd_jax.models.decoder import CausalLM
from topd_jax.prompts import left_pad
from topd_jax.sampling import SamplingOptions, generate
from topd_jax.trainer import placement
from topd_jax.trainer.config import ModelSpec, RandomModelConfig
from topd_jax.trainer.loop import build_model
from topd_jax.trainer.step import init_state

VOCAB = len(synthetic.VOCAB)
TEACHER = RandomModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, init_seed=1)
STUDENT = RandomModelConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=12, init_seed=2)
EVAL_SEED = 10_000  # held-out test problems
DEV_EVAL_SEED = 10_001  # the development problems (screening and the learning-rate sweep)
DEV_SEED = 100  # the learning-rate sweep's distillation seed (never a test seed)
MAX_COMPLETION = 38  # longest 4-step solution with its one correction (35 tokens) + EOS, with room for detours


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


TEACHER_SFT = SftConfig(TEACHER, synthetic.TEACHER_STYLE, steps=800, learning_rate=4e-3)
STUDENT_SFT = SftConfig(STUDENT, synthetic.STUDENT_STYLE, steps=250, learning_rate=4e-3, seed=1)


def sft_batch(seed: int, index: int, batch_size: int, style: synthetic.Style):
    """`synthetic.sft_examples` batch `index` as arrays: tokens [G, L] = left-padded prompt |
    solution | EOS | right padding, mask, loss_mask (the solution and EOS only)."""
    width = synthetic.PROMPT_LENGTH + MAX_COMPLETION
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), bool)
    loss_mask = np.zeros((batch_size, width), bool)
    for g, (prompt, answer, weights) in enumerate(synthetic.sft_examples(seed, index, batch_size, style)):
        start = synthetic.PROMPT_LENGTH - len(prompt)
        end = synthetic.PROMPT_LENGTH + len(answer)
        tokens[g, start:end] = prompt + answer
        mask[g, start:end] = True
        loss_mask[g, synthetic.PROMPT_LENGTH:end] = np.asarray(weights) > 0
    return tokens, mask, loss_mask


def sft(config: SftConfig, *, progress: Callable[[int, float], None] | None = None) -> CausalLM:
    """A model of `config.model` trained for `config.steps` AdamW steps (cosine decay)."""
    mesh = placement.data_mesh(jax.devices()[:1])
    model, _ = build_model(ModelSpec(random=config.model), mesh)  # initialised inside jit
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    state = init_state(params, optimizer, jax.random.PRNGKey(config.seed))
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


def eval_problems(count: int, seed: int = EVAL_SEED) -> list[synthetic.Problem]:
    """Held-out problems (a seed no training batch uses): EVAL_SEED the test set, DEV_EVAL_SEED
    the learning-rate sweep's."""
    return synthetic.problems(seed, 0, count)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _greedy(graphdef, params, prompts, mask):
    model = nnx.merge(graphdef, params)
    return generate(model, prompts, mask, key=jax.random.PRNGKey(0), max_new_tokens=MAX_COMPLETION,
                    options=SamplingOptions(temperature=0.0, eos_ids=(synthetic.EOS_ID,))).tokens


def completions(model: CausalLM, problems: Sequence[synthetic.Problem]) -> np.ndarray:
    """Greedy completions [n, MAX_COMPLETION] int32 of each problem's prompt."""
    tok = synthetic.SyntheticTokenizer()
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], synthetic.PROMPT_LENGTH)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(_greedy(graphdef, params, prompts, mask))


def correctness(model: CausalLM, problems: Sequence[synthetic.Problem]) -> np.ndarray:
    """Per problem, whether the greedy completion ends in the right answer (bool [n]; a sampled
    <pad> inside a completion is wrong, `synthetic.is_correct_ids`)."""
    return np.array([synthetic.is_correct_ids(p, o) for p, o in zip(problems, completions(model, problems))])


def accuracy(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """Greedy single-sample accuracy: the share of problems whose completion ends in the right answer."""
    return float(np.mean(correctness(model, problems)))


def malformed(model: CausalLM, problems: Sequence[synthetic.Problem]) -> float:
    """The share of greedy completions that leave the format (no answer can be read)."""
    outs = completions(model, problems)
    return float(np.mean([synthetic.parse(p, [synthetic.VOCAB[i] for i in _until_eos(o)])[1] is None
                          for p, o in zip(problems, outs)]))


def _until_eos(ids) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(synthetic.EOS_ID)] if synthetic.EOS_ID in ids else ids


def load(path: str) -> CausalLM:
    return load_pretrained(path, dtype=jnp.float32)



__all__ = ["DEV_EVAL_SEED", "DEV_SEED", "EVAL_SEED", "MAX_COMPLETION", "STUDENT", "STUDENT_SFT", "SftConfig", "TEACHER",
           "TEACHER_SFT", "VOCAB", "accuracy", "cached_sft", "completions", "correctness", "eval_problems", "load",
           "malformed", "sft", "sft_batch"]
