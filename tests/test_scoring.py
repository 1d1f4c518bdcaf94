"""Chunked scoring and the packed student forward give the log-probs of plain full forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.models import CausalLM, ModelConfig, init_cache
from topd_jax.scoring import Scores, packed_logprobs, score, score_rollout

ATOL = 1e-5
V = 97


def tiny_config(**overrides) -> ModelConfig:
    """Qwen3-shaped: GQA 4/2 heads, head_dim 16 != D / N, q/k norms, untied head."""
    base = dict(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=False)
    return ModelConfig(**(base | overrides))


@pytest.fixture(scope="module")
def model():
    return CausalLM(tiny_config(), dtype=jnp.float32, rngs=nnx.Rngs(0))


def ragged_batch(lengths, width, seed, left=True):
    """[B, width] random tokens padded on the left (or right) to `lengths` real tokens, and the mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        if left:
            mask[b, width - n:] = 1
        else:
            mask[b, :n] = 1
    return jnp.asarray(tokens), jnp.asarray(mask)


def reference_logprobs(model, tokens, mask):
    """Plain full forward: log_softmax over [B, L, V], gathered; 0 without a real target and context."""
    logprobs = jax.nn.log_softmax(model(tokens, attention_mask=mask), axis=-1)
    gathered = jnp.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    out = np.zeros(tokens.shape, np.float32)
    out[:, 1:] = np.where(valid, gathered, 0.0)
    return out, np.asarray(logprobs), np.asarray(valid)


def jitted_score(model, tokens, mask, **kw):
    return nnx.jit(score, static_argnames=("chunk_size", "top_k", "return_cache", "cache_len"))(
        model, tokens, mask, **kw)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_score_equals_full_forward_log_softmax_on_a_left_padded_ragged_batch(model, chunk_size):
    # Row 3 also has right padding (a completion that stopped early).
    tokens, mask = ragged_batch([12, 9, 4], 12, seed=0)
    mask = mask.at[1, -2:].set(0)
    expected, full, valid = reference_logprobs(model, tokens, mask)
    top_k = 3
    out = jitted_score(model, tokens, mask, chunk_size=chunk_size, top_k=top_k)
    assert isinstance(out, Scores) and out.cache is None
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=ATOL, rtol=0)
    assert not np.asarray(out.logprobs)[np.asarray(mask) == 0].any()
    assert not np.asarray(out.logprobs)[:, 0].any()

    ref_values, ref_ids = jax.lax.top_k(jnp.asarray(full[:, :-1]), top_k)  # predicting tokens 1 ... L-1
    np.testing.assert_allclose(np.asarray(out.topk_logprobs)[:, 1:][valid], np.asarray(ref_values)[valid],
                               atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.topk_ids)[:, 1:][valid], np.asarray(ref_ids)[valid])
    assert not np.asarray(out.topk_logprobs)[:, 1:][~valid].any() and not np.asarray(out.topk_ids)[:, 0].any()
    assert out.topk_ids.dtype == jnp.int32 and out.topk_logprobs.shape == (3, 12, top_k)


@pytest.mark.parametrize("variant", ["tied", "moe"])
def test_score_with_a_tied_head_or_a_moe_teacher_and_no_top_k(variant):
    overrides = (dict(tie_word_embeddings=True) if variant == "tied" else
                 dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      norm_topk_prob=True))
    m = CausalLM(tiny_config(**overrides), dtype=jnp.float32, rngs=nnx.Rngs(1))
    tokens, mask = ragged_batch([10, 6], 10, seed=1)
    out = score(m, tokens, mask, chunk_size=5)
    assert out.topk_logprobs is None and out.topk_ids is None
    np.testing.assert_allclose(np.asarray(out.logprobs), reference_logprobs(m, tokens, mask)[0], atol=ATOL, rtol=0)


def test_score_cache_equals_the_prefill_cache_and_decodes_like_a_full_forward(model):
    tokens, mask = ragged_batch([9, 5], 9, seed=2)
    out = jitted_score(model, tokens, mask, chunk_size=4, return_cache=True, cache_len=10)
    cache = out.cache
    _, expected = model(tokens, attention_mask=mask, cache=init_cache(model.config, 2, 10, jnp.float32))
    assert int(cache.index) == 9 and cache.max_len == 10
    np.testing.assert_array_equal(np.asarray(cache.valid), np.asarray(expected.valid))
    for got, want in zip((cache.keys, cache.values), (expected.keys, expected.values)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)
    # Decoding one more token from the returned cache = the full forward on the extended sequence.
    nxt = jnp.asarray([[5], [11]], jnp.int32)
    step, _ = model(nxt, cache=cache)
    extended_mask = jnp.concatenate([mask, jnp.ones((2, 1), jnp.int32)], 1)
    full = model(jnp.concatenate([tokens, nxt], 1), attention_mask=extended_mask)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, -1]), atol=1e-4, rtol=0)
    # Without cache_len the cache holds exactly the L scored tokens.
    assert score(model, tokens, mask, return_cache=True).cache.max_len == 9


def rollout_batch(seed=3):
    """Left-padded prompts (P = 5) and right-padded completions (N = 7), one stopping early."""
    prompt, prompt_mask = ragged_batch([5, 3], 5, seed=seed)
    tokens, mask = ragged_batch([7, 4], 7, seed=seed + 1, left=False)
    return prompt, prompt_mask, tokens, mask


def test_score_rollout_is_score_of_the_concatenation_aligned_to_the_completion(model):
    prompt, prompt_mask, tokens, mask = rollout_batch()
    out = score_rollout(model, prompt, prompt_mask, tokens, mask, chunk_size=3, top_k=4, return_cache=True)
    whole = score(model, jnp.concatenate([prompt, tokens], 1), jnp.concatenate([prompt_mask, mask], 1), chunk_size=3,
                  top_k=4, return_cache=True)
    assert out.logprobs.shape == (2, 7) and out.topk_ids.shape == (2, 7, 4) and int(out.cache.index) == 12
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(whole.logprobs[:, 5:]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.topk_logprobs), np.asarray(whole.topk_logprobs[:, 5:]),
                               atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.topk_ids), np.asarray(whole.topk_ids[:, 5:]))
    logprobs, real = np.asarray(out.logprobs), np.asarray(mask) == 1
    assert logprobs[real].all() and not logprobs[~real].any()
    for got, want in zip((out.cache.keys,), (whole.cache.keys,)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def window_batch():
    """Windows of K = 4 at t = 0, mid-completion, t = N (after the end), with an EOS inside one window,
    a branch into the early-stopped row's padding and an unused (all-masked) slot."""
    positions = jnp.asarray([[0, 3, 7], [2, 5, 1]], jnp.int32)
    rng = np.random.default_rng(9)
    window_tokens = jnp.asarray(rng.integers(0, V, (2, 3, 4)), jnp.int32)
    window_mask = np.ones((2, 3, 4), np.int32)
    window_mask[0, 1, 2:] = 0  # EOS at k = 1: the rest is padding
    window_mask[1, 2] = 0  # unused candidate slot
    return positions, window_tokens, jnp.asarray(window_mask)


def separate_window_logprobs(model, prompt, prompt_mask, tokens, mask, positions, window_tokens, window_mask):
    """Each window run as its own sequence prompt + y_<t + window: log-probs [B, M, K] and log-softmax rows.

    The B M sequences form one batch, each right-padded to P + N + K (causal: trailing padding is
    never read by earlier tokens), so the reference is one ordinary padded forward.
    """
    # Layout on the host (the inputs are concrete even when the caller traces the parameters).
    prompt, prompt_mask, tokens, mask, positions, window_tokens, window_mask = map(
        np.asarray, (prompt, prompt_mask, tokens, mask, positions, window_tokens, window_mask))
    b, m, k = window_tokens.shape
    p, n = prompt.shape[1], tokens.shape[1]
    seqs = np.zeros((b * m, p + n + k), np.int32)
    seq_masks = np.zeros((b * m, p + n + k), np.int32)
    starts = np.zeros((b * m,), np.int32)
    for i in range(b):
        for j in range(m):
            # A branch past EOS continues the real prefix (completion padding is only trailing).
            t = min(int(positions[i, j]), int(mask[i].sum()))
            r = i * m + j
            seqs[r, :p + t + k] = np.concatenate([prompt[i], tokens[i, :t], window_tokens[i, j]])
            seq_masks[r, :p + t + k] = np.concatenate([prompt_mask[i], mask[i, :t], window_mask[i, j]])
            starts[r] = p + t - 1
    logits = model(jnp.asarray(seqs), attention_mask=jnp.asarray(seq_masks))  # [B M, P + N + K, V]
    rows = jnp.take_along_axis(logits, (starts[:, None] + np.arange(k))[:, :, None], axis=1)  # [B M, K, V]
    full_rows = jax.nn.log_softmax(rows, axis=-1).reshape(b, m, k, -1)
    gathered = jnp.take_along_axis(full_rows, window_tokens[..., None], axis=-1)[..., 0]
    return jnp.where(window_mask > 0, gathered, 0.0), full_rows


@pytest.mark.parametrize("chunk_size", [1, 6, 4096])
def test_packed_logprobs_equal_the_rollout_score_and_each_window_run_alone(model, chunk_size):
    prompt, prompt_mask, tokens, mask = rollout_batch()
    positions, window_tokens, window_mask = window_batch()
    rng = np.random.default_rng(4)
    topk_ids = jnp.asarray(rng.integers(0, V, (2, 3, 4, 5)), jnp.int32)
    fn = nnx.jit(packed_logprobs, static_argnames=("chunk_size",))
    rollout, windows, window_topk = fn(model, prompt, prompt_mask, tokens, mask, positions, window_tokens,
                                       window_mask, chunk_size=chunk_size, topk_ids=topk_ids)
    expected_rollout = score_rollout(model, prompt, prompt_mask, tokens, mask).logprobs
    np.testing.assert_allclose(np.asarray(rollout), np.asarray(expected_rollout), atol=ATOL, rtol=0)

    expected, full_rows = separate_window_logprobs(model, prompt, prompt_mask, tokens, mask, positions, window_tokens,
                                                   window_mask)
    np.testing.assert_allclose(np.asarray(windows), np.asarray(expected), atol=ATOL, rtol=0)
    assert not np.asarray(windows)[np.asarray(window_mask) == 0].any()
    assert np.asarray(windows)[np.asarray(window_mask) == 1].all()
    expected_topk = jnp.where(window_mask[..., None] > 0, jnp.take_along_axis(full_rows, topk_ids, axis=-1), 0.0)
    np.testing.assert_allclose(np.asarray(window_topk), np.asarray(expected_topk), atol=ATOL, rtol=0)
    assert window_topk.shape == (2, 3, 4, 5)


def test_packed_logprobs_gradients_equal_those_of_separate_forwards(model):
    prompt, prompt_mask, tokens, mask = rollout_batch()
    positions, window_tokens, window_mask = window_batch()
    graphdef, params = nnx.split(model)

    def packed(state):
        rollout, windows = packed_logprobs(nnx.merge(graphdef, state), prompt, prompt_mask, tokens, mask, positions,
                                           window_tokens, window_mask, chunk_size=5)
        return jnp.sum(rollout) + jnp.sum(windows)

    def separate(state):
        m = nnx.merge(graphdef, state)
        rollout = score_rollout(m, prompt, prompt_mask, tokens, mask).logprobs
        windows, _ = separate_window_logprobs(m, prompt, prompt_mask, tokens, mask, positions, window_tokens,
                                              window_mask)
        return jnp.sum(rollout) + jnp.sum(windows)

    value, grads = jax.jit(jax.value_and_grad(packed))(params)
    want_value, want_grads = jax.jit(jax.value_and_grad(separate))(params)
    np.testing.assert_allclose(float(value), float(want_value), atol=1e-4, rtol=0)
    flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(flat) == len(want_flat) and any(np.abs(np.asarray(g)).max() > 1e-3 for g in flat)
    for g, w in zip(flat, want_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=0)


def test_one_token_sequences_and_zero_windows_give_empty_or_zero_outputs(model):
    one = jnp.ones((2, 1), jnp.int32)
    out = score(model, one, one, top_k=2, return_cache=True)
    assert out.logprobs.shape == (2, 1) and out.topk_ids.shape == (2, 1, 2) and not out.logprobs.any()
    rollout, windows = packed_logprobs(model, one, one, one, one, jnp.zeros((2, 0), jnp.int32),
                                       jnp.zeros((2, 0, 3), jnp.int32), jnp.zeros((2, 0, 3), jnp.int32))
    assert rollout.shape == (2, 1) and windows.shape == (2, 0, 3)


def test_bad_arguments_are_one_line_errors(model):
    tokens, mask = ragged_batch([4], 4, seed=5)
    prompt, prompt_mask, comp, comp_mask = rollout_batch()
    positions, window_tokens, window_mask = window_batch()
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        score(model, tokens, mask, chunk_size=0)
    with pytest.raises(ValueError, match="top_k must be in"):
        score(model, tokens, mask, top_k=V + 1)
    with pytest.raises(ValueError, match="mask of shape"):
        score(model, tokens, mask[:, :3])
    with pytest.raises(ValueError, match="cache_len 3 is shorter"):
        score(model, tokens, mask, return_cache=True, cache_len=3)
    with pytest.raises(ValueError, match="prompt batch 2 does not match completion batch 1"):
        score_rollout(model, prompt, prompt_mask, tokens, mask)
    with pytest.raises(ValueError, match=r"positions must be \[B=2, M\]"):
        packed_logprobs(model, prompt, prompt_mask, comp, comp_mask, positions[0], window_tokens, window_mask)
    with pytest.raises(ValueError, match="window_mask of shape"):
        packed_logprobs(model, prompt, prompt_mask, comp, comp_mask, positions, window_tokens, window_mask[..., :2])
    with pytest.raises(ValueError, match=r"topk_ids must be \[B, M, K, k\]"):
        packed_logprobs(model, prompt, prompt_mask, comp, comp_mask, positions, window_tokens, window_mask,
                        topk_ids=window_tokens)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        packed_logprobs(model, prompt, prompt_mask, comp, comp_mask, positions, window_tokens, window_mask,
                        chunk_size=0)


def test_score_peak_memory_is_a_tenth_of_the_full_logits_version():
    """Compile only (abstract params and inputs): Qwen3's V = 151,936, B * T = 8,192 tokens.

    We compare XLA's temp bytes: the arguments (parameters, tokens) and outputs ([B, T] log-probs,
    32 KiB) are identical for both, so temp is where the two differ. The naive version's temp is the
    [B, T, V] float32 logits (4.6 GiB; XLA fuses the log-softmax into the gather); the chunked
    version's is one [chunk_size, V] slab plus the attention buffers, i.e. about chunk_size / (B T)
    of it; the default chunk_size (512) gives under 1/10 at this B T.
    """
    cfg = tiny_config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=32)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    b, t = 2, 4096
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def chunked(state, tokens, mask):
        return score(nnx.merge(graphdef, state), tokens, mask).logprobs  # the default chunk_size

    def naive(state, tokens, mask):
        logprobs = jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens, attention_mask=mask), axis=-1)
        gathered = jnp.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.pad(jnp.where((mask[:, 1:] > 0) & (mask[:, :-1] > 0), gathered, 0.0), [(0, 0), (1, 0)])

    def temp_bytes(fn):
        return jax.jit(fn).lower(params, tokens, mask).compile().memory_analysis().temp_size_in_bytes

    ours, full = temp_bytes(chunked), temp_bytes(naive)
    print(f"score temp {ours / 2**20:.1f} MiB, naive temp {full / 2**20:.1f} MiB, ratio {ours / full:.3f}")
    assert full >= b * t * cfg.vocab_size * 4, full  # the naive version does hold [B, T, V] logits
    assert ours * 10 <= full, (f"score temp {ours / 2**20:.1f} MiB vs naive {full / 2**20:.1f} MiB "
                               f"(ratio {ours / full:.3f})")


def test_packed_logprobs_backward_keeps_one_chunk_of_logits_not_all_rows():
    """Compile only: the gradient of packed_logprobs with V = 151,936 over R = B (N + M K) = 4,096 target
    rows. The rematerialised chunks make the backward recompute each [chunk_size, V] slab instead of
    storing [R, V] residuals; the comparison is the same function with one chunk of all R rows
    (logits and their cotangent for every row, about 2 R V float32 = 4.6 GiB)."""
    cfg = tiny_config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=32)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    b, p, n, m, k = 2, 256, 1536, 8, 64
    shapes = [(b, p), (b, p), (b, n), (b, n), (b, m), (b, m, k), (b, m, k)]
    args = [jax.ShapeDtypeStruct(s, jnp.int32) for s in shapes]

    def temp_bytes(chunk_size):
        def loss(state, *inputs):
            rollout, windows = packed_logprobs(nnx.merge(graphdef, state), *inputs, chunk_size=chunk_size)
            return jnp.sum(rollout) + jnp.sum(windows)

        return jax.jit(jax.grad(loss)).lower(params, *args).compile().memory_analysis().temp_size_in_bytes

    rows = b * (n + m * k)
    ours, one_chunk = temp_bytes(256), temp_bytes(rows)
    print(f"packed backward temp {ours / 2**20:.1f} MiB, one chunk {one_chunk / 2**20:.1f} MiB, "
          f"ratio {ours / one_chunk:.3f}")
    assert one_chunk >= rows * cfg.vocab_size * 4, one_chunk
    assert ours * 8 <= one_chunk, (f"packed backward temp {ours / 2**20:.1f} MiB vs one chunk "
                                   f"{one_chunk / 2**20:.1f} MiB (ratio {ours / one_chunk:.3f})")
