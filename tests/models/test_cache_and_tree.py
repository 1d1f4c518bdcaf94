"""KV-cache decoding and packed look-ahead trees give the logits of plain forwards."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import forward, random_tokens

from topd_jax.models import init_cache, load_pretrained, tree_attention_mask

TOL = 1e-4


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "qwen2"])
def test_prefill_then_one_token_steps_match_the_full_forward(name, hf_checkpoint):
    model = load_pretrained(hf_checkpoint(name)[0], dtype=jnp.float32)
    x = jnp.asarray(random_tokens(2, 10, seed=5))
    full = np.asarray(forward(model, x))
    cache = init_cache(model.config, batch=2, max_len=16, dtype=jnp.float32)
    logits, cache = forward(model, x[:, :6], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        logits, cache = forward(model, x[:, t:t + 1], cache=cache)
        steps.append(np.asarray(logits))
    assert int(cache.index) == 10 and bool(cache.valid[:, :10].all()) and not bool(cache.valid[:, 10:].any())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=TOL, rtol=0)


def test_left_padded_decoding_matches_each_row_alone(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("llama3")[0], dtype=jnp.float32)
    rows = [random_tokens(1, n, seed=10 + n)[0] for n in (7, 4)]
    width = 7
    x = np.zeros((2, width), np.int32)
    pad = np.zeros((2, width), np.int32)
    for b, r in enumerate(rows):
        x[b, width - len(r):], pad[b, width - len(r):] = r, 1
    nxt = random_tokens(2, 3, seed=20)
    cache = init_cache(model.config, batch=2, max_len=12, dtype=jnp.float32)
    first, cache = forward(model, jnp.asarray(x), attention_mask=jnp.asarray(pad), cache=cache)
    steps = []
    for t in range(3):
        logits, cache = forward(model, jnp.asarray(nxt[:, t:t + 1]), cache=cache)
        steps.append(np.asarray(logits[:, 0]))
    alone = np.zeros((2, width + 3), np.int32)  # each row unpadded, right-filled (unread: causal)
    for b, r in enumerate(rows):
        alone[b, :len(r) + 3] = np.concatenate([r, nxt[b]])
    alone = np.asarray(forward(model, jnp.asarray(alone)))
    for b, r in enumerate(rows):
        np.testing.assert_allclose(np.asarray(first)[b, -1], alone[b, len(r) - 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.stack([s[b] for s in steps]), alone[b, len(r):len(r) + 3], atol=TOL, rtol=0)


def test_tree_mask_and_positions_by_hand():
    # T = 4 rollout tokens, windows of K = 2 branching at t = 1 and t = 4 (after the end).
    mask, pos = tree_attention_mask(jnp.asarray([[1, 4]]), window_len=2, seq_len=4)
    expected = np.array([
        # r0 r1 r2 r3 | a0 a1 | b0 b1
        [1, 0, 0, 0, 0, 0, 0, 0],  # r0
        [1, 1, 0, 0, 0, 0, 0, 0],  # r1
        [1, 1, 1, 0, 0, 0, 0, 0],  # r2
        [1, 1, 1, 1, 0, 0, 0, 0],  # r3
        [1, 0, 0, 0, 1, 0, 0, 0],  # a0: prefix r0, itself
        [1, 0, 0, 0, 1, 1, 0, 0],  # a1
        [1, 1, 1, 1, 0, 0, 1, 0],  # b0: the whole rollout
        [1, 1, 1, 1, 0, 0, 1, 1],  # b1
    ], bool)
    np.testing.assert_array_equal(np.asarray(mask[0]), expected)
    np.testing.assert_array_equal(np.asarray(pos[0]), [0, 1, 2, 3, 1, 2, 4, 5])


def test_tree_mask_never_reads_padding_and_continues_padded_positions():
    pad = jnp.asarray([[0, 0, 1, 1, 1]])
    mask, pos = tree_attention_mask(jnp.asarray([[3]]), window_len=2, seq_len=5, padding_mask=pad)
    assert not bool(mask[0, :, :2].any())
    np.testing.assert_array_equal(np.asarray(pos[0]), [0, 0, 0, 1, 2, 1, 2])


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_packed_windows_equal_each_window_run_alone(name, hf_checkpoint):
    model = load_pretrained(hf_checkpoint(name)[0], dtype=jnp.float32)
    b, t, m, k = 2, 12, 3, 4
    rollout = random_tokens(b, t, seed=6)
    windows = random_tokens(b, m * k, seed=7).reshape(b, m, k)
    branch = np.array([[2, 7, 12], [5, 5, 9]])  # repeated branch points and one past the end
    mask, positions = tree_attention_mask(jnp.asarray(branch), k, t)
    packed = np.concatenate([rollout, windows.reshape(b, m * k)], axis=1)
    out = np.asarray(forward(model, jnp.asarray(packed), attention_mask=mask, positions=positions))
    # 4-d [B, 1, P, P] masks are accepted as well
    out4 = np.asarray(forward(model, jnp.asarray(packed), attention_mask=mask[:, None], positions=positions))
    np.testing.assert_array_equal(out4, out)
    np.testing.assert_allclose(out[:, :t], np.asarray(forward(model, jnp.asarray(rollout))), atol=TOL, rtol=0)
    # Every window as its own sequence, right-padded into one batch (causal: padding after is unread).
    alone = np.zeros((b * m, t + k), np.int32)
    for i in range(b):
        for j in range(m):
            alone[i * m + j, :branch[i, j] + k] = np.concatenate([rollout[i, :branch[i, j]], windows[i, j]])
    ref = np.asarray(forward(model, jnp.asarray(alone)))
    for i in range(b):
        for j in range(m):
            start = branch[i, j]
            np.testing.assert_allclose(out[i, t + j * k: t + (j + 1) * k], ref[i * m + j, start:start + k],
                                       atol=TOL, rtol=0)


def test_mask_of_the_wrong_shape_is_refused(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("qwen3")[0], dtype=jnp.float32)
    x = jnp.asarray(random_tokens(1, 5))
    with pytest.raises(ValueError, match=r"does not match \[B, T_q, T_kv\]"):
        model(x, attention_mask=jnp.ones((1, 5, 6), bool))
    with pytest.raises(ValueError, match="do not fit a cache"):
        model(x, cache=init_cache(model.config, 1, 4, jnp.float32))


def test_tree_windows_start_after_the_real_tokens_before_a_padded_branch_point():
    # Right padding: a branch at index 3 (padding) continues after the 3 real tokens, at position 3.
    _, positions = tree_attention_mask(jnp.array([[3, 1]]), 2, 5, padding_mask=jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_array_equal(positions, [[0, 1, 2, 2, 2, 3, 4, 1, 2]])
    # Left padding: index 3 holds the second real token, which the window replaces.
    _, positions = tree_attention_mask(jnp.array([[3]]), 2, 5, padding_mask=jnp.array([[0, 0, 1, 1, 1]]))
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2, 1, 2]])
