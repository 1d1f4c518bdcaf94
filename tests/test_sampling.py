"""Rollouts and look-ahead windows sample what the model says and equal naive re-prefills."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from topd_jax.models import CausalLM, KVCache, ModelConfig, attend, init_cache
from topd_jax.models.attention import attend_branches
from topd_jax.sampling import (Rollout, SamplingOptions, Windows, _branch, _generate, branch, generate, sample_tokens,
                               window_embeddings)

V, P, N, K = 64, 6, 8, 5
CFG = ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
# The teacher is a Mixture of Experts, as in the paper (layer 0 sparse: top-2 of 4 experts).
MOE_CFG = ModelConfig(family="qwen3_moe", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=(1,))
# Left-padded ragged prompts of 6, 3 and 1 real tokens.
PROMPTS = np.array([[11, 12, 13, 14, 15, 16], [0, 0, 0, 21, 22, 23], [0, 0, 0, 0, 0, 31]], np.int32)
PROMPT_MASK = PROMPTS != 0
GREEDY = SamplingOptions(temperature=0.0)


def tiny_model(seed: int, cfg: ModelConfig = CFG) -> CausalLM:
    """Random weights at an O(1) logit scale (std 1.5 / sqrt(fan_in)), so distributions are peaked
    enough for greedy ties to be far and flat enough for every chi-square bin to fill."""
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)

    def redraw(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        if "o_proj" in name:
            fan_in = x.shape[0] * x.shape[1]
        else:  # expert weights [E, in, out]
            fan_in = x.shape[1] if x.ndim == 3 and "mlp" in name else x.shape[0]
        std = 1.0 if "embed_tokens" in name else 1.5 / np.sqrt(fan_in)
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(redraw, nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def student():
    return tiny_model(0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(1, MOE_CFG)


_forward = nnx.jit(lambda model, x: model(x))
WIDTH = 32  # every naive sequence is right-filled to this width: one compile, causal so unread


def next_logits(model, seq) -> np.ndarray:
    """float64 [V]: the model's logits after the unpadded sequence `seq`, by a full forward (no cache)."""
    x = np.zeros((1, WIDTH), np.int32)
    x[0, :len(seq)] = seq
    return np.asarray(_forward(model, jnp.asarray(x))[0, len(seq) - 1], np.float64)


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def naive_greedy(model, seq, steps, eos=()):
    """Greedy decoding by repeated full forwards: (tokens, mask, logprobs) with the EOS convention."""
    seq, toks, mask, logps, alive = list(seq), [], [], [], True
    for _ in range(steps):
        if not alive:
            toks.append(0), mask.append(False), logps.append(0.0)
            continue
        z = next_logits(model, seq)
        tok = int(np.argmax(z))
        toks.append(tok), mask.append(True), logps.append(log_softmax(z)[tok])
        seq.append(tok)
        alive = tok not in eos
    return np.array(toks), np.array(mask), np.array(logps)


def real_prefix(prompt, prompt_mask, tokens, mask, t):
    """The real tokens of (x, y_<t)."""
    return list(prompt[prompt_mask]) + list(tokens[:t][mask[:t]])


# ---------------------------------------------------------------- generate


def test_greedy_rollout_equals_repeated_full_forwards_for_each_prompt_alone(student):
    r = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(0), max_new_tokens=N, options=GREEDY)
    assert r.tokens.shape == (3, N) and r.tokens.dtype == jnp.int32 and r.logprobs.dtype == jnp.float32
    for b in range(3):
        toks, _, logps = naive_greedy(student, PROMPTS[b][PROMPT_MASK[b]], N)
        np.testing.assert_array_equal(np.asarray(r.tokens[b]), toks)
        np.testing.assert_allclose(np.asarray(r.logprobs[b]), logps, atol=1e-5)
    assert bool(r.mask.all()) and not bool(r.finished.any()) and int(r.cache.index) == P + N
    np.testing.assert_array_equal(np.asarray(r.cache.valid), np.concatenate([PROMPT_MASK, np.ones((3, N), bool)], 1))


def test_sampled_logprobs_are_untempered_full_forward_logprobs_and_a_fixed_key_repeats(student):
    # Sampled at temperature 0.7 from the top 20; the log-probs are still log softmax(z) (T = 1, all V).
    kw = dict(key=jax.random.key(3), max_new_tokens=N, num_samples=2,
              options=SamplingOptions(temperature=0.7, top_k=20))
    r = generate(student, PROMPTS, PROMPT_MASK, **kw)
    again = generate(student, PROMPTS, PROMPT_MASK, **kw)
    for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert r.tokens.shape == (6, N)
    np.testing.assert_array_equal(np.asarray(r.prompt_tokens), np.repeat(PROMPTS, 2, axis=0))
    assert not np.array_equal(np.asarray(r.tokens[0]), np.asarray(r.tokens[1]))  # samples differ
    for row in range(6):
        prompt = PROMPTS[row // 2][PROMPT_MASK[row // 2]]
        y = np.asarray(r.tokens[row])
        for t in range(N):
            want = log_softmax(next_logits(student, list(prompt) + list(y[:t])))[y[t]]
            np.testing.assert_allclose(float(r.logprobs[row, t]), want, atol=1e-5)


def test_eos_ends_a_row_and_the_loop_stops_when_every_row_finished(student):
    greedy = np.asarray(generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(0), max_new_tokens=N,
                                 options=GREEDY).tokens)
    # EOS = row 0's third token: row 0 finishes at step 2 (or earlier if it repeats a token).
    eos = (int(greedy[0, 2]),)
    r = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(0), max_new_tokens=N,
                 options=SamplingOptions(temperature=0.0, eos_ids=eos))
    steps = []
    for b in range(3):
        toks, mask, logps = naive_greedy(student, PROMPTS[b][PROMPT_MASK[b]], N, eos)
        np.testing.assert_array_equal(np.asarray(r.tokens[b]), toks)
        np.testing.assert_array_equal(np.asarray(r.mask[b]), mask)
        np.testing.assert_allclose(np.asarray(r.logprobs[b]), logps, atol=1e-5)
        assert bool(r.finished[b]) == bool((toks[mask] == eos[0]).any())
        steps.append(mask.sum())
    assert bool(r.finished[0]) and int(r.mask[0].sum()) <= 3
    assert int(r.cache.index) == P + max(steps)  # the loop ran until the last row finished
    np.testing.assert_array_equal(np.asarray(r.cache.valid[:, P:]), np.asarray(r.mask))

    # Every row's first greedy token as EOS: all rows finish at step 0, so one step is taken.
    r = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(0), max_new_tokens=N,
                 options=SamplingOptions(temperature=0.0, eos_ids=tuple(sorted(set(greedy[:, 0].tolist())))))
    assert bool(r.finished.all()) and int(r.cache.index) == P + 1
    np.testing.assert_array_equal(np.asarray(r.mask), np.arange(N)[None].repeat(3, 0) == 0)
    assert not bool(r.tokens[:, 1:].any())


def first_token_samples(model, temperature, top_k=0, top_p=1.0, n=6000, seed=7):
    r = generate(model, PROMPTS[1:2], PROMPT_MASK[1:2], key=jax.random.key(seed), max_new_tokens=1,
                 num_samples=n, options=SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p))
    z = next_logits(model, PROMPTS[1][PROMPT_MASK[1]]) / temperature
    return np.asarray(r.tokens[:, 0]), np.exp(log_softmax(z))


def assert_frequencies_match(samples, probs):
    """Chi-square goodness of fit; bins expected below 5 counts are pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs / probs.sum() * len(samples)
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_match_the_tempered_softmax(student, temperature):
    samples, probs = first_token_samples(student, temperature)
    assert_frequencies_match(samples, probs)


def kept_set(probs, top_k, top_p):
    order = np.argsort(-probs, kind="stable")
    if top_k:
        order = order[:top_k]
    p = probs[order] / probs[order].sum()
    before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    return order[before < top_p]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (10, 0.8)])
def test_top_k_and_top_p_never_sample_outside_the_kept_set(student, top_k, top_p):
    samples, probs = first_token_samples(student, 1.0, top_k=top_k, top_p=top_p)
    keep = kept_set(probs, top_k, top_p)
    assert 1 <= len(keep) < V and set(samples.tolist()) <= set(keep.tolist())
    truncated = np.zeros_like(probs)
    truncated[keep] = probs[keep]
    assert_frequencies_match(samples, truncated)


def test_top_p_keeps_at_least_the_most_likely_token():
    logits = jnp.asarray([[0.0, 5.0, 1.0]])
    draws = [int(sample_tokens(logits, jax.random.key(i), top_p=1e-6)[0]) for i in range(5)]
    assert draws == [1] * 5


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(eos_ids=(-1,)), "eos_ids"), (dict(eos_ids=(1.5,)), "eos_ids"), (dict(eos_ids=3), "eos_ids"),
])
def test_bad_sampling_options_are_refused_by_name_in_one_line(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be ") as error:
        SamplingOptions(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(options=SamplingOptions(eos_ids=(V,))), r"^eos_ids must be token ids in \[0, 64\), got \(64,\)$"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_samples=0), "num_samples"),
])
def test_bad_generate_arguments_are_refused_by_name(student, kwargs, match):
    args = dict(key=jax.random.key(0), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(student, PROMPTS, PROMPT_MASK, **args)


def test_options_must_be_sampling_options(student):
    with pytest.raises(TypeError, match="options must be a SamplingOptions, got dict"):
        generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(0), max_new_tokens=2, options=dict(temperature=0))


def test_equal_sampling_options_hash_equal_and_share_one_compiled_program(student):
    a = SamplingOptions(temperature=0.5, top_k=3, eos_ids=[1, 2])
    b = SamplingOptions(temperature=0.5, top_k=np.int64(3), eos_ids=(1, 2))
    assert a is not b and a == b and hash(a) == hash(b) and a.eos_ids == (1, 2) and type(b.top_k) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.top_k = 4
    kw = dict(key=jax.random.key(0), max_new_tokens=2)
    generate(student, PROMPTS, PROMPT_MASK, options=a, **kw)
    size = _generate._cache_size()
    r = generate(student, PROMPTS, PROMPT_MASK, options=b, **kw)
    assert _generate._cache_size() == size
    generate(student, PROMPTS, PROMPT_MASK, options=dataclasses.replace(b, top_k=4), **kw)
    assert _generate._cache_size() == size + 1

    positions = np.zeros((3, 2), np.int32)
    branch(student, r, positions, key=jax.random.key(0), window=2, options=a)
    size = _branch._cache_size()
    branch(student, r, positions, key=jax.random.key(0), window=2, options=b)
    assert _branch._cache_size() == size


# ---------------------------------------------------------------- branch


@pytest.fixture(scope="module")
def rollout(student):
    """Sampled rollout whose row 2 ends early at an EOS (3 real tokens of N)."""
    r = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(11), max_new_tokens=N)
    eos = int(r.tokens[2, 2])
    r = generate(student, PROMPTS, PROMPT_MASK, key=jax.random.key(11), max_new_tokens=N,
                 options=SamplingOptions(eos_ids=(eos,)))
    assert bool(r.finished[2]) and not bool(r.mask[2, 3:].any())
    return r


# t = 0 (right after the prompt), inside, N (after everything), and row 2 past its EOS.
POSITIONS = np.array([[0, 3, N], [N, 1, 5], [0, 2, 6]], np.int32)


def naive_windows(model, prompts, prompt_mask, tokens, mask, positions, eos=()):
    out = [[naive_greedy(model, real_prefix(prompts[b], prompt_mask[b], tokens[b], mask[b], t), K, eos)
            for t in row] for b, row in enumerate(positions)]
    return [np.array([[w[i] for w in row] for row in out]) for i in range(3)]


def test_greedy_windows_equal_a_naive_re_prefill_of_each_prefix(student, rollout):
    w = branch(student, rollout, POSITIONS, key=jax.random.key(0), window=K, options=GREEDY)
    assert w.tokens.shape == (3, 3, K) and w.tokens.dtype == jnp.int32
    args = [np.asarray(a) for a in (rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask)]
    toks, mask, logps = naive_windows(student, *args, POSITIONS)
    np.testing.assert_array_equal(np.asarray(w.tokens), toks)
    np.testing.assert_array_equal(np.asarray(w.mask), mask)
    np.testing.assert_allclose(np.asarray(w.logprobs), logps, atol=1e-5)

    # EOS inside windows: one window's third token ends it (and every window holding it earlier).
    eos = (int(toks[0, 1, 2]),)
    w = branch(student, rollout, POSITIONS, key=jax.random.key(0), window=K,
               options=SamplingOptions(temperature=0.0, eos_ids=eos))
    toks, mask, logps = naive_windows(student, *args, POSITIONS, eos)
    assert not mask[0, 1, 3:].any()
    np.testing.assert_array_equal(np.asarray(w.tokens), toks)
    np.testing.assert_array_equal(np.asarray(w.mask), mask)
    np.testing.assert_allclose(np.asarray(w.logprobs), logps, atol=1e-5)


def reprefilled(prompts, prompt_mask, tokens, mask, positions):
    """Every prefix (x, y_<t) as its own left-padded row: [B * M, width] tokens and mask."""
    rows = [real_prefix(prompts[b], prompt_mask[b], tokens[b], mask[b], t) for b, row in enumerate(positions)
            for t in row]
    width = max(map(len, rows))
    x, xm = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        x[i, width - len(r):], xm[i, width - len(r):] = r, True
    return x, xm


@pytest.mark.parametrize("options", [SamplingOptions(temperature=1.0),
                                     SamplingOptions(temperature=0.8, top_k=8, top_p=0.9)])
def test_sampled_windows_equal_generate_from_re_prefilled_prefixes_with_the_same_key(student, rollout, options):
    args = [np.asarray(a) for a in (rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask)]
    x, xm = reprefilled(*args, POSITIONS)
    key = jax.random.key(5)
    options = dataclasses.replace(options, eos_ids=(int(rollout.tokens[0, 0]),))
    w = branch(student, rollout, POSITIONS, key=key, window=K, options=options)
    ref = generate(student, x, xm, key=key, max_new_tokens=K, options=options)
    np.testing.assert_array_equal(np.asarray(w.tokens).reshape(9, K), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(w.mask).reshape(9, K), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(w.logprobs).reshape(9, K), np.asarray(ref.logprobs), atol=1e-5)


def test_teacher_branches_from_its_own_scoring_cache(student, teacher, rollout):
    ids = jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1)
    valid = jnp.concatenate([rollout.prompt_mask, rollout.mask], axis=1)
    _, cache = nnx.jit(lambda m, x, v, c: m(x, attention_mask=v, cache=c))(
        teacher, ids, valid, init_cache(teacher.config, 3, P + N, jnp.float32))
    w = branch(teacher, cache, POSITIONS, key=jax.random.key(0), window=K, options=GREEDY, prompt_len=P, tokens=ids)
    args = [np.asarray(a) for a in (rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask)]
    toks, mask, logps = naive_windows(teacher, *args, POSITIONS)
    np.testing.assert_array_equal(np.asarray(w.tokens), toks)
    np.testing.assert_allclose(np.asarray(w.logprobs), logps, atol=1e-5)
    assert not np.array_equal(toks, naive_windows(student, *args, POSITIONS)[0])  # really the teacher's

    key = jax.random.key(9)
    w = branch(teacher, cache, POSITIONS, key=key, window=K, prompt_len=P, tokens=ids)
    ref = generate(teacher, *reprefilled(*args, POSITIONS), key=key, max_new_tokens=K)
    np.testing.assert_array_equal(np.asarray(w.tokens).reshape(9, K), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(w.logprobs).reshape(9, K), np.asarray(ref.logprobs), atol=1e-5)


def test_window_top_k_logprobs_are_the_naive_prefix_top_k(student, rollout):
    """top_k_logprobs=k returns each window step's k most likely tokens under a re-prefill."""
    eos = (int(rollout.tokens[0, 0]),)
    w = branch(student, rollout, POSITIONS, key=jax.random.key(3), window=K, options=SamplingOptions(eos_ids=eos),
               top_k_logprobs=4)
    args = [np.asarray(a) for a in (rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask)]
    tokens, mask = np.asarray(w.tokens), np.asarray(w.mask)
    assert w.topk_logprobs.shape == w.topk_ids.shape == (*tokens.shape, 4)
    for b, row in enumerate(POSITIONS):
        for m, t in enumerate(row):
            prefix = list(real_prefix(*(a[b] for a in args), t))
            for k in range(K):
                if not mask[b, m, k]:
                    assert not np.asarray(w.topk_logprobs[b, m, k]).any()
                    continue
                lp = log_softmax(next_logits(student, prefix + tokens[b, m, :k].tolist()))
                order = np.argsort(-lp, kind="stable")[:4]
                np.testing.assert_array_equal(np.asarray(w.topk_ids[b, m, k]), order)
                np.testing.assert_allclose(np.asarray(w.topk_logprobs[b, m, k]), lp[order], atol=1e-5)
    assert branch(student, rollout, POSITIONS, key=jax.random.key(3), window=K).topk_ids is None
    with pytest.raises(ValueError, match="top_k_logprobs"):
        branch(student, rollout, POSITIONS, key=jax.random.key(3), window=K, top_k_logprobs=-1)


def test_positions_outside_the_completion_are_clipped(student, rollout):
    kw = dict(key=jax.random.key(0), window=K, options=GREEDY)
    clipped = branch(student, rollout, np.clip(POSITIONS * 10 - 5, 0, N), **kw)
    raw = branch(student, rollout, POSITIONS * 10 - 5, **kw)
    np.testing.assert_array_equal(np.asarray(raw.tokens), np.asarray(clipped.tokens))


def test_branch_refuses_a_cache_without_its_layout_and_bad_positions(student, rollout):
    kw = dict(key=jax.random.key(0), window=K)
    with pytest.raises(ValueError, match="prompt_len"):
        branch(student, rollout.cache, POSITIONS, **kw)
    with pytest.raises(ValueError, match="positions"):
        branch(student, rollout, POSITIONS[:2], **kw)
    with pytest.raises(ValueError, match="window"):
        branch(student, rollout, POSITIONS, key=jax.random.key(0), window=0)
    with pytest.raises(TypeError, match="source"):
        branch(student, rollout.tokens, POSITIONS, **kw)
    with pytest.raises(ValueError, match=r"eos_ids must be token ids in \[0, 64\)"):
        branch(student, rollout, POSITIONS, options=SamplingOptions(eos_ids=(V,)), **kw)


def all_shapes(jaxpr):
    """Shapes of every value a jaxpr and its sub-jaxprs (loop bodies, pjit) produce."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(v.aval.shape)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_shapes(sub)


def test_branch_never_materialises_a_per_branch_copy_of_the_prefix_cache(student):
    # Sizes chosen so no other product collides with [B, M, S, kv_heads, head_dim] = [2, 7, 40, 2, 16].
    b, m, s = 2, 7, 40
    cache = init_cache(CFG, b, s, jnp.float32)
    cache = KVCache(cache.keys, cache.values, jnp.ones((b, s), bool), jnp.int32(s))
    ids = jnp.ones((b, s), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda c, i, p: branch(student, c, p, key=jax.random.key(0), window=3,
                                                  prompt_len=4, tokens=i))(cache, ids, jnp.zeros((b, m), jnp.int32))
    sizes = {int(np.prod(shape)) for shape in all_shapes(jaxpr.jaxpr)}
    assert b * m * s * CFG.num_kv_heads * CFG.head_dim not in sizes


@pytest.mark.parametrize("block", [3, 7, 16])
def test_attend_branches_equals_attend_over_the_concatenated_caches(block):
    """Layer 1 of a stacked 2-layer prefix cache of 7 slots, read in key blocks (3: the last one
    partial), plus each branch's own slots, against `attend` on the concatenation."""
    rng = np.random.default_rng(0)
    b, m, s, w, n, kv, h = 2, 3, 7, 4, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, m, n, h)), jnp.float32)
    pk, pv = (jnp.asarray(rng.standard_normal((b, 2, s, kv, h)), jnp.float32) for _ in range(2))
    bk, bv = (jnp.asarray(rng.standard_normal((b, m, w, kv, h)), jnp.float32) for _ in range(2))
    prefix_len = jnp.asarray(rng.integers(1, s + 1, size=(b, m)), jnp.int32)
    valid = jnp.asarray(rng.random((b, s)) < 0.8).at[:, 0].set(True)
    pmask = (jnp.arange(s)[None, None] < prefix_len[..., None]) & valid[:, None]
    bmask = jnp.asarray(rng.random((b, m, w)) < 0.6)
    got = attend_branches(q, pk, pv, 1, prefix_len, valid, bk, bv, bmask, block=block)
    for i in range(m):  # branch i alone: its query against [prefix | its own slots]
        k = jnp.concatenate([pk[:, 1], bk[:, i]], axis=1)
        v = jnp.concatenate([pv[:, 1], bv[:, i]], axis=1)
        mask = jnp.concatenate([pmask[:, i], bmask[:, i]], axis=-1)[:, None]
        want = attend(q[:, i:i + 1], k, v, mask)[:, 0]
        np.testing.assert_allclose(np.asarray(got[:, i]), np.asarray(want), atol=2e-6)
    static = attend_branches(q, pk, pv, 1, prefix_len, valid, bk, bv, bmask, block=block, prefix_end=s)
    np.testing.assert_allclose(np.asarray(static), np.asarray(got), atol=1e-6)


def test_window_embeddings_are_the_input_embedding_rows(student):
    tokens = jnp.asarray([[[1, 2], [63, 0]]])
    emb = window_embeddings(student, tokens)
    assert emb.shape == (1, 2, 2, CFG.hidden_size) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(student.embed_tokens[...])[np.asarray(tokens)])


def test_rollout_and_windows_are_pytrees(student, rollout):
    # A map that changes every leaf: an unregistered class would be one opaque leaf, so the
    # map would fail on it (or return a non-Rollout), and jit could not take or return it.
    cache_leaves = len(jax.tree.leaves(rollout.cache))
    assert len(jax.tree.leaves(rollout)) == 6 + cache_leaves
    doubled = jax.tree.map(lambda x: x.astype(jnp.float32) * 2, rollout)
    assert type(doubled) is Rollout and doubled.tokens.dtype == jnp.float32
    np.testing.assert_array_equal(doubled.tokens, np.asarray(rollout.tokens) * 2)
    through_jit = jax.jit(lambda r: r)(rollout)
    assert type(through_jit) is Rollout
    np.testing.assert_array_equal(through_jit.tokens, rollout.tokens)

    w = branch(student, rollout, POSITIONS, key=jax.random.key(0), window=K, options=GREEDY)
    assert type(w) is Windows
    names = ("tokens", "mask", "logprobs")  # topk_* are None (no leaves) without top_k_logprobs
    assert len(jax.tree.leaves(w)) == len(names)
    shifted = jax.tree.map(lambda x: x.astype(jnp.int32) + 1, w)
    assert type(shifted) is Windows
    for name in names:
        np.testing.assert_array_equal(getattr(shifted, name), np.asarray(getattr(w, name)).astype(np.int32) + 1)
    assert type(jax.jit(lambda x: x)(w)) is Windows


def test_right_padded_prompts_are_refused(student):
    prompts = jnp.ones((2, 4), jnp.int32)
    right_padded = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    with pytest.raises(ValueError, match=r"prompts must be left-padded .* rows \[1\] end in padding"):
        generate(student, prompts, right_padded, key=jax.random.key(0), max_new_tokens=2)
