"""Continuous decoding on refilled slots draws what the static sampler draws, refills in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.models import init_cache
from topd_jax.sampling import SamplingOptions, branch, generate, row_keys
from topd_jax.slots import (_decode, _insert, bucket, decode, ended, init_slots, insert, padded, sample_continuous,
                            take, with_cache)
from test_sampling import N, P, PROMPT_MASK, PROMPTS, tiny_model

OPTIONS = SamplingOptions(temperature=1.0, eos_ids=(3, 5, 7))


@pytest.fixture(scope="module")
def student():
    return tiny_model(0)


@pytest.mark.parametrize("slots,check_every", [(2, 1), (4, 3), (9, 8)])
def test_continuous_equals_static(student, slots, check_every):
    """Same prompts and key: the same tokens, masks and EOS flags as `generate`, log-probs to float
    order, whatever the number of slots (rows land in different slots, refilled at different times)."""
    key = jax.random.PRNGKey(4)
    static = generate(student, PROMPTS, PROMPT_MASK, key=key, max_new_tokens=N, num_samples=3, options=OPTIONS)
    lengths = np.asarray(static.mask.sum(1))
    assert lengths.min() < N == lengths.max()  # some rows end early: slots are refilled
    rollout, versions = sample_continuous(student, PROMPTS, PROMPT_MASK, key=key, max_new_tokens=N, num_samples=3,
                                          slots=slots, check_every=check_every, options=OPTIONS)
    np.testing.assert_array_equal(rollout.tokens, static.tokens)
    np.testing.assert_array_equal(rollout.mask, static.mask)
    np.testing.assert_array_equal(rollout.finished, static.finished)
    np.testing.assert_allclose(rollout.logprobs, static.logprobs, atol=2e-5)
    np.testing.assert_array_equal(versions, np.where(static.mask, 0, -1))


def test_typed_keys_draw_as_raw_keys(student):
    """A typed key (jax.random.key) gives the same tokens as its raw bits (jax.random.PRNGKey)."""
    typed, _ = sample_continuous(student, PROMPTS, PROMPT_MASK, key=jax.random.key(4), max_new_tokens=N, slots=2,
                                 options=OPTIONS)
    static = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(4), max_new_tokens=N, options=OPTIONS)
    np.testing.assert_array_equal(typed.tokens, static.tokens)


def test_other_key_other_tokens(student):
    a, _ = sample_continuous(student, PROMPTS, PROMPT_MASK, key=jax.random.PRNGKey(0), max_new_tokens=N, slots=2)
    b, _ = sample_continuous(student, PROMPTS, PROMPT_MASK, key=jax.random.PRNGKey(1), max_new_tokens=N, slots=2)
    assert not np.array_equal(a.tokens, b.tokens)


def test_refilled_slot_holds_a_fresh_prefill(student):
    """A slot freed after decoding another row holds exactly the new prompt's prefill in its prompt
    columns, no valid bit of the old row, and decodes what a fresh slot decodes."""
    key = jax.random.PRNGKey(2)
    keys = row_keys(key, 3)
    state = init_slots(student, slots=2, prompt_len=P, max_new_tokens=N)
    state = insert(student, state, np.array([0, 1]), PROMPTS[:2], PROMPT_MASK[:2], keys[:2])
    state = decode(student, state, min_free=2, check_every=1, options=SamplingOptions(temperature=1.0))
    assert np.asarray(state.length).tolist() == [N, N]  # the old rows wrote every column
    # Row 1 refilled with prompt 2; slot 2 (= S) is a padding row, dropped.
    state = insert(student, state, np.array([1, 2]), np.repeat(PROMPTS[2:3], 2, 0), np.repeat(PROMPT_MASK[2:3], 2, 0),
                   jnp.repeat(keys[2:3], 2, axis=0))
    prefill = init_cache(student.config, 1, P, student.dtype)
    _, prefill = student(jnp.asarray(PROMPTS[2:3]), attention_mask=jnp.asarray(PROMPT_MASK[2:3]), cache=prefill)
    np.testing.assert_allclose(state.cache.keys[1, :, :P], prefill.keys[0], atol=1e-6)
    np.testing.assert_allclose(state.cache.values[1, :, :P], prefill.values[0], atol=1e-6)
    np.testing.assert_array_equal(state.cache.valid[1], np.concatenate([PROMPT_MASK[2], np.zeros(N, bool)]))
    assert int(state.cache.index[1]) == P and bool(state.decoding[1]) and not bool(state.decoding[0])
    state = decode(student, state, min_free=2, check_every=1, options=SamplingOptions(temperature=1.0))
    refilled, _ = take(state, [1])
    fresh = init_slots(student, slots=1, prompt_len=P, max_new_tokens=N)
    fresh = insert(student, fresh, np.array([0]), PROMPTS[2:3], PROMPT_MASK[2:3], keys[2:3])
    fresh = decode(student, fresh, min_free=1, check_every=1, options=SamplingOptions(temperature=1.0))
    alone, _ = take(fresh, [0])
    np.testing.assert_array_equal(refilled.tokens, alone.tokens)
    np.testing.assert_allclose(refilled.logprobs, alone.logprobs, atol=2e-5)


def test_decode_returns_when_enough_slots_are_free(student):
    """The loop checks every `check_every` steps: it returns once min_free slots have ended."""
    key = jax.random.PRNGKey(4)
    static = generate(student, PROMPTS, PROMPT_MASK, key=key, max_new_tokens=N, num_samples=3, options=OPTIONS)
    first_end = int(static.mask.sum(1).min())
    state = init_slots(student, slots=9, prompt_len=P, max_new_tokens=N)
    state = insert(student, state, np.arange(9), jnp.repeat(PROMPTS, 3, 0), jnp.repeat(PROMPT_MASK, 3, 0),
                   row_keys(key, 9))
    state = decode(student, state, min_free=1, check_every=1, options=OPTIONS)
    assert int(state.steps) == first_end < N and len(ended(state, np.ones(9, bool))) >= 1
    assert int(state.busy_steps) == 9 * first_end


def test_versions_record_the_drawing_policy(student):
    state = init_slots(student, slots=1, prompt_len=P, max_new_tokens=N)
    state = insert(student, state, np.array([0]), PROMPTS[:1], PROMPT_MASK[:1], row_keys(jax.random.PRNGKey(0), 1))
    state = decode(student, state, version=3, min_free=1, check_every=2, options=SamplingOptions(eos_ids=()))
    assert int(state.length[0]) == N  # min_free 1 with one slot: runs until it ends
    state = init_slots(student, slots=2, prompt_len=P, max_new_tokens=N)
    state = insert(student, state, np.array([0, 1]), PROMPTS[:2], PROMPT_MASK[:2], row_keys(jax.random.PRNGKey(0), 2))
    state = decode(student, state, version=3, min_free=2, check_every=2, options=SamplingOptions())
    np.testing.assert_array_equal(state.versions, 3)


def test_windows_branch_from_a_continuous_rollout(student):
    """`with_cache` gives the rollout the cache the static sampler keeps: the same windows."""
    key = jax.random.PRNGKey(4)
    static = generate(student, PROMPTS, PROMPT_MASK, key=key, max_new_tokens=N, options=OPTIONS)
    rollout, _ = sample_continuous(student, PROMPTS, PROMPT_MASK, key=key, max_new_tokens=N, slots=2, options=OPTIONS)
    rollout = with_cache(student, rollout)
    positions = jnp.array([[0, 2], [1, 3], [0, 5]])
    a = branch(student, static, positions, key=jax.random.PRNGKey(9), window=3)
    b = branch(student, rollout, positions, key=jax.random.PRNGKey(9), window=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_buckets_and_padding():
    assert [bucket(c, 16) for c in (1, 2, 3, 5, 9, 17)] == [1, 2, 4, 8, 16, 16]
    np.testing.assert_array_equal(padded(np.array([4, 2]), 4, 8), [4, 2, 8, 8])


def test_bad_inputs_are_one_line_errors(student):
    state = init_slots(student, slots=2, prompt_len=P, max_new_tokens=N)
    with pytest.raises(ValueError, match="insert needs prompts"):
        insert(student, state, np.array([0]), PROMPTS[:1, 1:], PROMPT_MASK[:1, 1:], row_keys(jax.random.PRNGKey(0), 1))
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        decode(student, state, check_every=0)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        init_slots(student, slots=0, prompt_len=P, max_new_tokens=N)


def test_no_whole_cache_copy():
    """The compiled insert and decode update the donated stacked cache in place: their temporary
    bytes stay below one cache (a copy of the carried cache would need at least that)."""
    from topd_jax.models import ModelConfig
    from topd_jax.models.decoder import CausalLM
    cfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def temps(n):
        state = init_slots(model, slots=16, prompt_len=32, max_new_tokens=n)
        decode_step = _decode.lower(graphdef, params, state, jnp.int32(0), jnp.int32(1), options=OPTIONS,
                                    check_every=8).compile()
        inserted = _insert.lower(graphdef, params, state, jnp.zeros(4, jnp.int32), jnp.ones((4, 32), jnp.int32),
                                 jnp.ones((4, 32), bool), row_keys(jax.random.PRNGKey(0), 4)).compile()
        cache_bytes = state.cache.keys.nbytes + state.cache.values.nbytes
        for compiled in (decode_step, inserted):
            assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes  # the cache is donated, reused
        return [c.memory_analysis().temp_size_in_bytes for c in (decode_step, inserted)], cache_bytes

    (decode_temp, insert_temp), cache_bytes = temps(992)
    assert decode_temp < cache_bytes / 2 and insert_temp < cache_bytes / 2, (decode_temp, insert_temp, cache_bytes)
    (decode_half, insert_half), _ = temps(480)  # half the cache: the temporaries do not shrink with it
    assert decode_temp <= 1.05 * decode_half and insert_temp <= 1.05 * insert_half
