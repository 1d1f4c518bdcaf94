"""Relay (guidance relay): teacher segments spliced into the rollout, checked against plain forwards.

A spliced rollout's tokens and log-probs must be what a plain causal forward of the spliced
sequence gives, for both models; the student's continuation after a segment must be conditioned
on the segment; on-policy every importance ratio is 1, the teacher's tokens included; and those
tokens get OPD's advantage log pi_T - log pi_S like any other.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.losses.topd import TopdConfig, topd_loss
from topd_jax.models import CausalLM, ModelConfig
from topd_jax.prompts import left_pad
from topd_jax.sampling import PAD_ID, continuation
from topd_jax.scoring import score_rollout
from topd_jax.trainer.config import RolloutConfig
from topd_jax.trainer.step import (experience, loss_inputs, relay_triggers, sample, score_teacher, splice,
                                   student_forward)

V, N, L = 61, 12, 3


def tiny(seed, hidden):
    config = ModelConfig(family="qwen3", vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                         tie_word_embeddings=False)
    return CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))


WIDTH = 6 + N


@nnx.jit
def _forward(model, ids):
    return jax.nn.log_softmax(model(ids), axis=-1)


def plain_logprobs(model, prompt, completion):
    """log pi(y_t | x, y_<t) of the real tokens, one plain causal forward (right-padded)."""
    ids = list(prompt) + list(completion)
    padded = jnp.asarray([ids + [0] * (WIDTH - len(ids))], jnp.int32)
    logp = np.asarray(_forward(model, padded)[0])
    p = len(prompt)
    return np.array([logp[p - 1 + i, tok] for i, tok in enumerate(completion)])


def relay(**options):
    return TopdConfig.preset("topd", suppress_weight=1.0, guidance="relay",
                             guidance_options={"segment": L, "max_segments": 2, **options})


@pytest.fixture(scope="module")
def models():
    student, teacher = tiny(0, 32), tiny(1, 48)
    rng = np.random.default_rng(0)
    prompts, mask = left_pad([list(rng.integers(2, V, n)) for n in (3, 6, 4, 5)], 6)
    options = RolloutConfig(max_new_tokens=N, eos_ids=(1,))
    rollout = sample(student, prompts, mask, jax.random.PRNGKey(0), options)
    scores = score_teacher(teacher, rollout, chunk_size=64, return_cache=True)
    return student, teacher, rollout, scores, options


@pytest.fixture(scope="module")
def spliced(models):
    student, teacher, rollout, scores, options = models
    # k = 1: the teacher's argmax is outside the student's top-1 wherever they disagree, so the
    # random pair triggers in most rows.
    loss = relay(top_k=1)
    out = jax.jit(lambda r, s: splice(student, teacher, r, s, jax.random.PRNGKey(3), loss, options,
                                      chunk_size=64))(rollout, scores)
    return loss, out


def _rows(rollout):
    prompts = [list(np.asarray(p)[np.asarray(m)]) for p, m in zip(rollout.prompt_tokens, rollout.prompt_mask)]
    completions = [list(np.asarray(t)[np.asarray(m)]) for t, m in zip(rollout.tokens, rollout.mask)]
    return prompts, completions


def test_a_spliced_rollout_equals_plain_forwards_of_both_models(models, spliced):
    student, teacher, rollout, _, _ = models
    _, (new, scores, located) = spliced
    written = np.asarray(located.teacher_written)
    assert written.any(), "no segment was spliced: the test would check nothing"
    assert not np.array_equal(np.asarray(new.tokens), np.asarray(rollout.tokens))
    for b, (prompt, completion) in enumerate(zip(*_rows(new))):
        n = len(completion)
        np.testing.assert_allclose(np.asarray(new.logprobs[b, :n]), plain_logprobs(student, prompt, completion),
                                   atol=2e-5)
        np.testing.assert_allclose(np.asarray(scores.logprobs[b, :n]), plain_logprobs(teacher, prompt, completion),
                                   atol=2e-5)
        assert not np.asarray(new.mask[b, n:]).any() and (np.asarray(new.tokens[b, n:]) == PAD_ID).all()


def test_segments_are_the_teachers_and_start_at_the_earliest_trigger(models, spliced):
    student, teacher, rollout, scores, _ = models
    loss, (new, _, located) = spliced
    mine = score_rollout(student, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                         chunk_size=64, top_k=1)
    first = np.asarray(relay_triggers(student, teacher, rollout, scores, mine, jax.random.PRNGKey(0),
                                      jnp.zeros((rollout.tokens.shape[0],), jnp.int32), loss, None))
    argmax = np.asarray(scores.topk_ids[..., 0])
    for b in range(rollout.tokens.shape[0]):
        hits = np.flatnonzero(np.asarray(rollout.mask[b]) & (argmax[b] != np.asarray(rollout.tokens[b])))
        assert first[b] == (hits[0] if hits.size else -1)  # k = 1: disagreement is the trigger
        if first[b] < 0:
            continue
        t = first[b]
        np.testing.assert_array_equal(np.asarray(new.tokens[b, :t]), np.asarray(rollout.tokens[b, :t]))
        assert bool(located.valid[b, 0]) and int(located.positions[b, 0]) == t
        assert np.asarray(located.teacher_written[b, t])  # the segment starts at the trigger
        assert not np.asarray(located.teacher_written[b, :t]).any()
    assert int(np.asarray(located.teacher_written).sum(axis=1).max()) <= 2 * L  # at most M segments of L


def test_the_students_continuation_is_conditioned_on_the_segment(models):
    student, _, rollout, _, options = models
    mine = score_rollout(student, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                         chunk_size=64, return_cache=True)
    ids = jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1)
    b = rollout.tokens.shape[0]
    starts = jnp.full((b,), 2, jnp.int32)
    runs = [continuation(student, mine.cache, starts, jnp.full((b, L), tok, jnp.int32), jnp.full((b,), L),
                         key=jax.random.PRNGKey(7), prompt_len=rollout.prompt_tokens.shape[1], tokens=ids)
            for tok in (5, 9)]
    a, c = (np.asarray(r.logprobs[:, 0, L]) for r in runs)  # the first drawn token after the segment
    assert np.abs(a - c).min() > 1e-5  # every row's next token sees the segment it was given
    assert (np.asarray(runs[0].tokens[:, 0, :L]) == 5).all()


def test_on_policy_every_ratio_is_one_and_teacher_tokens_get_opds_advantage(models, spliced):
    student, _, _, _, _ = models
    loss, (new, scores, located) = spliced
    batch = experience(new, scores, located)
    inputs = loss_inputs(batch, student_forward(student, batch, chunk_size=64))
    mask = np.asarray(inputs.mask)
    ratio = np.exp(np.asarray(inputs.student_logprobs) - np.asarray(inputs.behaviour_logprobs))[mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)
    graphdef, params = nnx.split(student, nnx.Param)

    def value(p):
        forward = student_forward(nnx.merge(graphdef, p), batch, chunk_size=64)
        return topd_loss(dataclasses.replace(inputs, student_logprobs=forward.rollout), loss)[0]

    # d L / d s_t = -A_t / N on-policy (token mean): every token, the teacher's included, is
    # weighted by its own advantage q_t - b_t.
    s = jnp.asarray(inputs.student_logprobs)
    grad = np.asarray(jax.grad(lambda s_: topd_loss(dataclasses.replace(inputs, student_logprobs=s_), loss)[0])(s))
    advantage = np.asarray(inputs.teacher_logprobs) - np.asarray(inputs.behaviour_logprobs)
    np.testing.assert_allclose(grad[mask], -advantage[mask] / mask.sum(), rtol=1e-4, atol=1e-7)
    written = np.asarray(located.teacher_written)
    assert np.abs(grad[written]).sum() > 0
    assert np.isfinite(float(value(params)))


def test_fkl_trains_the_segment_with_the_forward_kl_and_opd_elsewhere(models):
    student, teacher, rollout, scores, options = models
    loss = relay(top_k=1, loss="fkl", fkl_top_k=4)
    new, scores2, located = splice(student, teacher, rollout, scores, jax.random.PRNGKey(3), loss, options,
                                   chunk_size=64)
    assert located.teacher_windows is not None and located.teacher_windows.topk_ids.shape[-1] == 4
    batch = experience(new, scores2, located)
    inputs = loss_inputs(batch, student_forward(student, batch, chunk_size=64))
    s = jnp.asarray(inputs.student_logprobs)
    grad = np.asarray(jax.grad(lambda s_: topd_loss(dataclasses.replace(inputs, student_logprobs=s_), loss)[0])(s))
    written = np.asarray(located.teacher_written)
    assert written.any() and np.all(grad[written] == 0)  # the segment gets no OPD signal
    _, metrics = topd_loss(inputs, loss)
    assert float(metrics["loss_traj"]) > 0
    # The segment's window tokens are the rollout's own at its start.
    assert np.asarray(located.valid[:, 0]).any()
    for b in np.flatnonzero(np.asarray(located.valid[:, 0])):
        t = int(located.positions[b, 0])
        k = int(np.asarray(located.teacher_windows.mask[b, 0]).sum())
        np.testing.assert_array_equal(np.asarray(located.teacher_windows.tokens[b, 0, :k]),
                                      np.asarray(new.tokens[b, t:t + k]))


def test_stop_ends_the_rollout_at_the_first_trigger(models):
    student, teacher, rollout, scores, options = models
    loss = relay(top_k=1, stop=True)
    new, _, located = splice(student, teacher, rollout, scores, jax.random.PRNGKey(3), loss, options, chunk_size=64)
    argmax = np.asarray(scores.topk_ids[..., 0])
    for b in range(rollout.tokens.shape[0]):
        hits = np.flatnonzero(np.asarray(rollout.mask[b]) & (argmax[b] != np.asarray(rollout.tokens[b])))
        expected = hits[0] if hits.size else int(np.asarray(rollout.mask[b]).sum())
        assert int(np.asarray(new.mask[b]).sum()) == expected
    assert not np.asarray(located.teacher_written).any()


def test_no_trigger_leaves_the_rollout_as_it_was(models):
    student, teacher, rollout, scores, options = models
    loss = relay(top_k=V)  # the teacher's argmax is always inside the student's top-V
    new, scores2, located = splice(student, teacher, rollout, scores, jax.random.PRNGKey(3), loss, options,
                                   chunk_size=64)
    for field in ("tokens", "mask", "logprobs"):
        np.testing.assert_array_equal(np.asarray(getattr(new, field)), np.asarray(getattr(rollout, field)))
    np.testing.assert_allclose(np.asarray(scores2.logprobs), np.asarray(scores.logprobs), atol=1e-6)
    assert not np.asarray(located.teacher_written).any() and not np.asarray(located.valid).any()
