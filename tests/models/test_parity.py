"""Logits match transformers' PyTorch implementation of every family (fp32, |diff| <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import VARIANTS, forward, hf_logits, random_tokens

from topd_jax.models import load_pretrained, positions_from_padding
from topd_jax.models.layers import rope_inv_freq
from topd_jax.models.moe import route

TOL = 1e-4


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name, hf_checkpoint):
    path, hf = hf_checkpoint(name)
    model = load_pretrained(path, dtype=jnp.float32)
    x = random_tokens(2, 13, seed=1)
    ref = hf_logits(hf, x)
    out = np.asarray(forward(model, jnp.asarray(x)))
    assert out.shape == (2, 13, hf.config.vocab_size) and out.dtype == np.float32
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "llama3"])
def test_left_padded_batch_matches_transformers_on_real_tokens(name, hf_checkpoint):
    path, hf = hf_checkpoint(name)
    model = load_pretrained(path, dtype=jnp.float32)
    x = random_tokens(3, 11, seed=2)
    pad = np.ones_like(x)
    pad[0, :4] = 0
    pad[2, :7] = 0
    positions = np.asarray(positions_from_padding(jnp.asarray(pad)))
    ref = hf_logits(hf, x, attention_mask=pad, position_ids=positions)
    out = np.asarray(forward(model, jnp.asarray(x), attention_mask=jnp.asarray(pad)))  # positions derived from the mask
    real = pad.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=0)


def test_hidden_states_give_the_same_logits_in_chunks(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("qwen3_tied_bias")[0], dtype=jnp.float32)
    x = jnp.asarray(random_tokens(2, 12, seed=3))
    hidden = forward(model, x, return_hidden=True)
    assert hidden.shape == (2, 12, model.config.hidden_size)
    chunks = np.concatenate([np.asarray(model.logits(hidden[:, i:i + 5])) for i in range(0, 12, 5)], axis=1)
    np.testing.assert_allclose(chunks, np.asarray(forward(model, x)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "llama_bias", "qwen3"])
def test_rope_frequencies_match_transformers(name, hf_checkpoint):
    path, hf = hf_checkpoint(name)
    cfg = load_pretrained(path, dtype=jnp.float32).config
    ref = hf.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(cfg.rope, cfg.head_dim), ref, rtol=1e-6, atol=0)
    if name == "llama3":  # the scaling really changed some frequencies
        default = rope_inv_freq(type(cfg.rope)(theta=cfg.rope.theta), cfg.head_dim)
        assert not np.allclose(default, ref)


def test_grouped_experts_equal_a_per_token_loop(hf_checkpoint):
    model = load_pretrained(hf_checkpoint("qwen3_moe_step")[0], dtype=jnp.float32)
    block = model.layer(1).mlp
    x = jax.random.normal(jax.random.key(0), (2, 7, model.config.hidden_size))
    out = np.asarray(block(x))
    flat = np.asarray(x).reshape(-1, x.shape[-1])
    weights, experts = map(np.asarray, route(jnp.asarray(flat) @ block.router[...], block.top_k, block.norm_topk_prob))
    gate, up, down = (np.asarray(p[...]) for p in (block.gate_proj, block.up_proj, block.down_proj))
    ref = np.zeros_like(flat)
    for n, row in enumerate(flat):
        for w, e in zip(weights[n], experts[n]):
            g = row @ gate[e]
            ref[n] += w * ((g / (1 + np.exp(-g)) * (row @ up[e])) @ down[e])
    np.testing.assert_allclose(out.reshape(ref.shape), ref, atol=1e-5, rtol=0)


def test_bfloat16_load_keeps_bf16_params_and_float32_logits(hf_checkpoint):
    path, hf = hf_checkpoint("qwen3")
    model = load_pretrained(path)  # default dtype
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model.layers[0].layer.self_attn.q_proj[...].dtype == jnp.bfloat16
    x = random_tokens(1, 9, seed=4)
    out = np.asarray(forward(model, jnp.asarray(x)))
    assert out.dtype == np.float32
    with torch.no_grad():
        ref = hf(torch.as_tensor(x, dtype=torch.long)).logits.numpy()
    assert np.abs(out - ref).max() < 0.15 * np.abs(ref).max()
