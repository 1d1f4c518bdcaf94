"""The trainer's guidance windows, checked against an independent computation.

For every guided candidate (b, t) the teacher's window v_1..v_K must be its continuation of
(x, y_<t) -- never of (x, y_<=t) -- and the student's window log-probs must be
log pi_s(v_k | x, y_<t, v_<k). Both are recomputed here with nothing but plain full forwards
on the real tokens (no cache, no packing, no tree mask), one candidate at a time.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.losses.topd import TopdConfig
from topd_jax.models import CausalLM, ModelConfig
from topd_jax.prompts import left_pad
from topd_jax.trainer.config import RolloutConfig
from topd_jax.trainer.step import experience, locate, sample, score_teacher, student_forward

V, K, N = 61, 5, 12


def tiny(seed, hidden):
    config = ModelConfig(family="qwen3", vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                         tie_word_embeddings=False)
    return CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))


WIDTH = 6 + N + K  # prompt + completion + window


@nnx.jit
def _forward(model, ids):
    return jax.nn.log_softmax(model(ids), axis=-1)


def full_logprobs(model, ids):
    """log pi(. | ids[:i]) for every i: [len(ids), V] from one plain causal forward of the real
    tokens (right-padded to one width so it compiles once: later slots cannot change earlier ones)."""
    padded = jnp.asarray([list(ids) + [0] * (WIDTH - len(ids))], jnp.int32)
    return np.asarray(_forward(model, padded)[0, :len(ids)])


@pytest.fixture(scope="module")
def pipeline():
    student, teacher = tiny(0, 32), tiny(1, 48)
    rng = np.random.default_rng(0)
    prompts, mask = left_pad([list(rng.integers(2, V, n)) for n in (3, 6, 4)], 6)
    options = RolloutConfig(max_new_tokens=N, eos_ids=(1,))
    rollout = sample(student, prompts, mask, jax.random.PRNGKey(0), options)
    scores = score_teacher(teacher, rollout, chunk_size=64, return_cache=True)
    loss = TopdConfig.preset("topd", locator="window_kl", window=K, max_candidates=3, threshold_mode="quantile",
                             threshold_quantile=0.0, guidance_options={"window_tokens": "greedy"})
    located = locate(student, teacher, rollout, scores, jax.random.PRNGKey(1), loss, options)
    windows = student_forward(student, experience(rollout, scores, located), chunk_size=16).windows
    return student, teacher, rollout, located, windows


def guided(located):
    """(b, m, t) of every valid candidate, with at least three of them."""
    slots = [(int(b), int(m), int(located.positions[b, m])) for b, m in zip(*np.nonzero(np.asarray(located.valid)))]
    assert len(slots) >= 3
    return slots


def prefix(rollout, b, t):
    """The real tokens of (x, y_<t) of rollout row b."""
    p = np.asarray(rollout.prompt_tokens[b])[np.asarray(rollout.prompt_mask[b]) > 0]
    y = np.asarray(rollout.tokens[b])[:t][np.asarray(rollout.mask[b])[:t] > 0]
    return [int(i) for i in np.concatenate([p, y])]


def test_the_teachers_greedy_window_continues_the_prefix_before_the_candidate(pipeline):
    _, teacher, rollout, located, _ = pipeline
    tw = located.teacher_windows
    for b, m, t in guided(located):
        ids = prefix(rollout, b, t)
        expected = []
        for _ in range(int(np.sum(tw.mask[b, m]))):
            expected.append(int(np.argmax(full_logprobs(teacher, ids + expected)[-1])))
        np.testing.assert_array_equal(np.asarray(tw.tokens[b, m])[np.asarray(tw.mask[b, m])], expected)


def test_the_students_window_logprobs_are_conditioned_on_y_before_t_and_the_window(pipeline):
    student, _, rollout, located, windows = pipeline
    tw = located.teacher_windows
    for b, m, t in guided(located):
        ids = prefix(rollout, b, t)
        v = [int(i) for i in np.asarray(tw.tokens[b, m])[np.asarray(tw.mask[b, m])]]
        logprobs = full_logprobs(student, ids + v)
        expected = [logprobs[len(ids) - 1 + k, v[k]] for k in range(len(v))]
        np.testing.assert_allclose(np.asarray(windows[b, m])[:len(v)], expected, atol=2e-5)
        # Conditioning v_1 on y_t as well (the off-by-one this test guards against) differs.
        y_t = int(rollout.tokens[b, t])
        shifted = full_logprobs(student, ids + [y_t] + v)[len(ids), v[0]]
        assert abs(float(windows[b, m, 0]) - shifted) > 1e-4


def test_sampled_and_greedy_guidance_windows_come_from_the_same_prefix(pipeline):
    """The default (sampled) guidance window reuses the teacher's branch: at temperature 0 it
    equals the greedy one token for token."""
    student, teacher, rollout, located, _ = pipeline
    options = RolloutConfig(max_new_tokens=N, eos_ids=(1,), window_temperature=0.0)
    scores = score_teacher(teacher, rollout, chunk_size=64, return_cache=True)
    loss = TopdConfig.preset("topd", locator="window_kl", window=K, max_candidates=3, threshold_mode="quantile",
                             threshold_quantile=0.0)
    sampled = locate(student, teacher, rollout, scores, jax.random.PRNGKey(1), loss, options).teacher_windows
    greedy = located.teacher_windows
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(sampled.mask), np.asarray(greedy.mask))
    assert dataclasses.replace(loss, guidance="return", guidance_options={}).uses_windows is False
