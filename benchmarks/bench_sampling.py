"""Rollouts, look-ahead windows and scoring: our jitted JAX paths against each other and against
transformers' PyTorch `generate`, on the same tiny random Qwen3 checkpoint, in one run.

    python benchmarks/bench_sampling.py            # test-size model, then hidden 256 / 4 layers / vocab 4096
    python benchmarks/bench_sampling.py --quick    # tiny smoke sizes
    python benchmarks/bench_sampling.py --lengths lognormal:90,0.8    # (d) only: continuous / static

(a) Decode: greedy `generate` of N new tokens for B prompts (EOS disabled, so every row decodes
    all N) against `transformers` `model.generate(do_sample=False)` with its KV cache, same
    weights, same prompts; tokens/s = B * N / wall time (prefill included on both sides). Goal of
    the issue: ours >= 2x.
(b) Branch: `branch` decodes K-token windows from M prefixes of each of the B rollouts (B*M
    branches in lockstep, reading the rollout's cache in place); cost per window token =
    time / (B * M * K), against generate's time per token = time / (B * N). Goal: <= 1.0x.
(c) Score: jitted `score` of the B prompt+completion sequences (chunked log-softmax at its default
    chunk size); tokens/s.
(d) With --lengths SPEC (the plan's `plan.lengths` forms: `max`, `lognormal:MEAN,SIGMA`, a JSON
    histogram; capped at --max-new-tokens): rows of a long-tailed length distribution through the
    static sampler (`generate`, batches of --rows, each waiting for its longest row) and the
    continuous one (`slots.sample_continuous`, --rows slots refilled as rows end), the same
    prompts, keys and temperature-1 sampling; finished tokens/s = tokens of the finished rollouts /
    wall time, and their ratio. Each row's length is drawn from the distribution and forced by a
    benchmark-only logits rule built into the weights of a random Qwen3-shaped model ("countdown"):
    every layer's attention and MLP output projections are zero, so the residual stream at the
    last layer is the fed token's embedding, a one-hot e_v, and the LM head maps e_v to a logit of
    40 on v - 1: a prompt ending in L + 1 generates L, L - 1, ..., 1 = EOS, L tokens, with every
    matmul of the model still computed (XLA does not know the zeros).
Each JAX function is compiled by a first call (printed apart), then timed over `--repeats`
calls with block_until_ready; the median is reported. The PyTorch side is timed the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

RUN = dict(batch=16, prompt=32, new_tokens=128, candidates=8, window=32)
# Two model sizes: at test size per-step overhead dominates; at 4.2M parameters the matmuls do.
FULL = [
    dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=16, **RUN),
    dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
         num_key_value_heads=4, head_dim=32, **RUN),
]
QUICK = [dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, batch=2, prompt=8, new_tokens=8, candidates=2, window=4)]
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", metavar="SPEC", help="(d) only: continuous / static on this length distribution")
    parser.add_argument("--rows", type=int, default=64, help="(d) static batch = continuous slots")
    parser.add_argument("--rounds", type=int, default=4, help="(d) prompts = rounds x rows")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="(d) the cap N")
    args = parser.parse_args()
    if args.lengths:
        bench_lengths(args.lengths, rows=args.rows, rounds=args.rounds, cap=args.max_new_tokens, repeats=args.repeats)
        return
    for sizes in QUICK if args.quick else FULL:
        bench(sizes, args.repeats)
    if args.quick:  # the smoke test runs (d) too
        bench_lengths("lognormal:6,0.8", rows=4, rounds=2, cap=16, repeats=1)


def countdown_model(cap: int, layers: int, intermediate: int):
    """A random Qwen3-shaped CausalLM whose sampling is forced (module docstring, (d)): hidden =
    vocab = cap + 8 rounded up to 64; token 1 is the EOS."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from topd_jax.models import ModelConfig
    from topd_jax.models.decoder import CausalLM

    width = -(-(cap + 8) // 64) * 64
    cfg = ModelConfig(family="qwen3", vocab_size=width, hidden_size=width, intermediate_size=intermediate,
                      num_layers=layers, num_heads=8, num_kv_heads=4, head_dim=64, qk_norm=True)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))

    def rule(path, x):
        name = jax.tree_util.keystr(path)
        if "o_proj" in name or "down_proj" in name:
            return jnp.zeros_like(x)
        if "embed_tokens" in name:
            return jnp.eye(width, dtype=x.dtype)
        if "lm_head" in name:  # e_v -> 40 on v - 1 (after the final norm's sqrt(width))
            return jnp.asarray(np.eye(width, k=-1) * 40 / np.sqrt(width), x.dtype)
        return x

    nnx.update(model, jax.tree_util.tree_map_with_path(rule, nnx.state(model, nnx.Param)))
    return model


def bench_lengths(spec: str, *, rows: int, rounds: int, cap: int, repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from topd_jax.plan.lengths import cdf, expected_length, parse_lengths
    from topd_jax.sampling import SamplingOptions, generate
    from topd_jax.slots import sample_continuous

    f = cdf(parse_lengths(spec), cap)
    rng = np.random.default_rng(0)
    total = rows * rounds
    lengths = np.searchsorted(f, rng.random(total), side="left").clip(1, cap)  # inverse CDF: min(L, N)
    prompt_len = 16
    prompts = rng.integers(cap + 2, cap + 8, (total, prompt_len)).astype(np.int32)
    prompts[:, -1] = lengths + 1
    mask = np.ones_like(prompts, bool)
    model = countdown_model(cap, layers=2 if cap <= 32 else 4, intermediate=256 if cap <= 32 else 1024)
    options = SamplingOptions(temperature=1.0, eos_ids=(1,))
    key = jax.random.key(0)

    def static():
        return [generate(model, jnp.asarray(prompts[i:i + rows]), jnp.asarray(mask[i:i + rows]),
                         key=jax.random.fold_in(key, i), max_new_tokens=cap, options=options)
                for i in range(0, total, rows)]

    def continuous():
        return sample_continuous(model, prompts, mask, key=key, max_new_tokens=cap, slots=rows, options=options)

    s_first, s_time = timed(static, repeats)
    c_first, c_time = timed(continuous, repeats)
    got = np.concatenate([np.asarray(r.mask.sum(1)) for r in static()])
    cont = np.asarray(continuous()[0].mask.sum(1))
    assert np.array_equal(got, lengths) and np.array_equal(cont, lengths), "the countdown rule did not hold"
    tokens = int(lengths.sum())
    print(f"(d) {total} rollouts, lengths {spec} capped at {cap} (drawn: mean {lengths.mean():.1f} = "
          f"{lengths.mean() / cap:.2f} x cap, max {lengths.max()}; E[min(L, N)] = {expected_length(f):.1f}), "
          f"{rows} rows a batch / {rows} slots; first calls {s_first:.1f} s / {c_first:.1f} s")
    print(f"    static      {s_time:8.2f} s  {tokens / s_time:9.0f} finished tokens/s")
    print(f"    continuous  {c_time:8.2f} s  {tokens / c_time:9.0f} finished tokens/s")
    print(f"    continuous / static finished tokens/s: {s_time / c_time:.2f}x")


def bench(sizes: dict, repeats: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from topd_jax.models import load_pretrained
    from topd_jax.sampling import SamplingOptions, branch, generate
    from topd_jax.scoring import score

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**{k: sizes[k] for k in MODEL_KEYS}, tie_word_embeddings=True,
                                      max_position_embeddings=1024, attn_implementation="sdpa")
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = load_pretrained(tmp, dtype=jnp.float32)
    b, p, n, m, k = (sizes[x] for x in ("batch", "prompt", "new_tokens", "candidates", "window"))
    params = sum(x.numel() for x in hf.parameters()) / 1e6
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs")
    print(f"model: Qwen3-shaped, {params:.1f}M params, hidden {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, "
          f"vocab {sizes['vocab_size']}, float32; batch {b}, prompt {p}, {n} new tokens, M={m} windows of K={k}")

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, sizes["vocab_size"], (b, p)).astype(np.int32)
    prompt_mask = np.ones((b, p), bool)
    key = jax.random.key(0)

    def run_generate():
        return generate(model, jnp.asarray(prompts), jnp.asarray(prompt_mask), key=key, max_new_tokens=n,
                        options=SamplingOptions(temperature=0.0))

    gen_first, gen_time = timed(run_generate, repeats)
    rollout = run_generate()

    def run_hf():
        with torch.no_grad():
            return hf.generate(torch.as_tensor(prompts, dtype=torch.long), attention_mask=torch.ones(b, p, dtype=torch.long),
                               max_new_tokens=n, do_sample=False)

    hf_first, hf_time = timed(run_hf, repeats)
    same = np.array_equal(run_hf()[:, p:].numpy(), np.asarray(rollout.tokens))
    print(f"(a) generate, greedy, {b} x {n} tokens (first call {gen_first:.2f} s, torch {hf_first:.2f} s); "
          f"same tokens as torch: {same}")
    print(f"    ours   {gen_time * 1e3:9.1f} ms  {b * n / gen_time:9.0f} tokens/s")
    print(f"    torch  {hf_time * 1e3:9.1f} ms  {b * n / hf_time:9.0f} tokens/s")
    print(f"    ours / torch decode throughput: {hf_time / gen_time:.2f}x")

    positions = jnp.asarray(rng.integers(0, n, (b, m)), jnp.int32)

    def run_branch():
        return branch(model, rollout, positions, key=key, window=k, options=SamplingOptions(temperature=0.0))

    br_first, br_time = timed(run_branch, repeats)
    per_window_token = br_time / (b * m * k)
    per_token = gen_time / (b * n)
    print(f"(b) branch, {b} x {m} windows of {k} tokens (first call {br_first:.2f} s)")
    print(f"    {br_time * 1e3:9.1f} ms  {per_window_token * 1e6:9.1f} us per window token; "
          f"generate {per_token * 1e6:9.1f} us per token")
    print(f"    branch / generate cost per token: {per_window_token / per_token:.2f}x")

    sequence = jnp.concatenate([jnp.asarray(prompts), rollout.tokens], axis=1)
    sequence_mask = jnp.concatenate([jnp.asarray(prompt_mask), rollout.mask], axis=1)

    jit_score = nnx.jit(score, static_argnames=("chunk_size", "top_k", "return_cache", "cache_len"))

    def run_score():
        return jit_score(model, sequence, sequence_mask)

    sc_first, sc_time = timed(run_score, repeats)
    print(f"(c) score, {b} x {p + n} tokens (first call {sc_first:.2f} s): {sc_time * 1e3:9.1f} ms  "
          f"{b * (p + n) / sc_time:9.0f} tokens/s")


if __name__ == "__main__":
    main()
