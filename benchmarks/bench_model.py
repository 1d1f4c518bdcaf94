"""Qwen3-shaped decoder: JAX/Flax NNX against transformers (PyTorch) on this machine, in one run.

    python benchmarks/bench_model.py            # 33.6M parameters, batch 4 x 256 tokens
    python benchmarks/bench_model.py --quick    # tiny smoke sizes
    python benchmarks/bench_model.py --attention-only   # only (c)
    python benchmarks/bench_model.py --load-only        # only (b)
    python benchmarks/bench_model.py --tpu-topology v5p:2x2x1   # only (d), compiled, not run

(a) Training-step throughput: forward + backward of the mean next-token cross-entropy (gradients
    of every parameter, no optimizer) on the same random Qwen3 checkpoint, same tokens, float32,
    on the CPU. JAX: `nnx.jit(nnx.value_and_grad)`, compiled first (compile time printed apart).
    PyTorch: `model(ids, labels=ids).loss.backward()` with SDPA attention and all cores.
    The two are timed in alternating rounds so load drift on the machine hits both alike;
    tokens/s is batch * length / median step time.
(b) Host memory of `load_pretrained`: each load runs in a fresh subprocess that resets the
    peak-RSS counter (/proc/self/clear_refs) after importing JAX; the peak RSS increase during
    the load is reported relative to the checkpoint file size. On CPU the loaded parameters live
    in host memory, so 1.0x of the loaded bytes is the floor. A naive loader
    (safetensors.numpy.load_file of the whole file, then jnp.asarray) is measured alongside.
(c) Attention backends: dense vs blockwise causal attention (left-padded batch, forward +
    backward of a scalar of the output, Qwen3-4B's head layout 32 query / 8 kv heads of 128
    scaled to 8 / 2 heads on CPU) at T = 512, 2048 and 8192: tokens/s (median of alternating
    rounds) and the compiled temporary bytes of each (XLA's memory_analysis); dense at 8192 needs
    [B, N, T, T] float32 scores and is skipped when they exceed --dense-max-gib.
(d) With --tpu-topology: the same causal forward + backward at Qwen3-4B's layout (B = 4,
    T = 8192, 32 query / 8 kv heads of 128, bf16) compiled for a TPU topology through libtpu
    (nothing runs; no TPU is opened) on a data 2 x tensor 2 mesh of its chips, for dense, blockwise
    and splash (the Pallas TPU kernel in shard_map): compiled temporary bytes per chip and compile
    seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FULL = dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, batch=4, length=256)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, batch=2, length=32)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_load(path: str, dtype: str, naive: bool) -> None:
    """Subprocess body: print JSON {peak_increase_bytes, ...} for one load of `path`."""
    import jax
    import jax.numpy as jnp

    jax.devices()  # backend initialised before the baseline
    if naive:
        from safetensors.numpy import load_file
    else:
        from topd_jax.models import load_pretrained
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if naive:
        arrays = {k: jnp.asarray(v, dtype=dtype) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        jax.block_until_ready(list(arrays.values()))
    else:
        model = load_pretrained(path, dtype=jnp.dtype(dtype))
        jax.block_until_ready(jax.tree.leaves(model))
    peak = rss_kib("VmHWM")
    print(json.dumps({"peak_increase_bytes": (peak - before) * 1024, "rss_after_bytes": rss_kib("VmRSS") * 1024}))


def load_memory(path: str, file_bytes: int, dtype: str, naive: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure-load", path, "--dtype", dtype] + (["--naive"] if naive else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ratio"] = result["peak_increase_bytes"] / file_bytes
    return result


def attention_benchmark(lengths, *, rounds: int, steps: int, block: int, dense_max_gib: float) -> None:
    """(c): print one row per T, then the blockwise/dense throughput ratio at the longest T."""
    import jax
    import jax.numpy as jnp

    from topd_jax.models.attention import attention
    from topd_jax.models.masks import causal_visibility

    b, n, kv, h = 1, 8, 2, 128
    print(f"attention fwd+bwd, B={b}, {n} query / {kv} kv heads of {h}, float32, block {block}:")
    print("|     T | dense tok/s | blockwise tok/s | blockwise/dense | dense temp MiB | blockwise temp MiB |")
    ratio = None
    for t in lengths:
        keys = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(keys[0], (b, t, n, h))
        k, v = (jax.random.normal(key, (b, t, kv, h)) for key in keys[1:])
        pad = jnp.arange(t)[None, :] >= t // 16  # left padding

        def make(impl):
            def loss(q, k, v):
                return jnp.sum(attention(q, k, v, causal_visibility(pad), impl=impl, block=block) ** 2)
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

        fns, temp = {}, {}
        for impl in ("dense", "blockwise"):
            if impl == "dense" and b * n * t * t * 4 / 2**30 > dense_max_gib:
                continue
            fns[impl] = make(impl).lower(q, k, v).compile()
            temp[impl] = fns[impl].memory_analysis().temp_size_in_bytes
            jax.block_until_ready(fns[impl](q, k, v))
        times = {impl: [] for impl in fns}
        for _ in range(rounds):
            for impl, fn in fns.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v))
                    times[impl].append(time.perf_counter() - t0)
        rate = {impl: b * t / statistics.median(v) for impl, v in times.items()}
        dense_rate = f"{rate['dense']:11.0f}" if "dense" in rate else "    skipped"
        dense_temp = f"{temp['dense'] / 2**20:14.1f}" if "dense" in temp else "       skipped"
        ratio_text = f"{rate['blockwise'] / rate['dense']:15.2f}" if "dense" in rate else "              -"
        print(f"| {t:5d} | {dense_rate} | {rate['blockwise']:15.0f} | {ratio_text} | {dense_temp} | "
              f"{temp['blockwise'] / 2**20:18.1f} |")
        if "dense" in rate:
            ratio = (t, rate["blockwise"] / rate["dense"], temp["dense"] / temp["blockwise"])
    if ratio is not None:
        print(f"blockwise / dense attention at T = {ratio[0]}: {ratio[1]:.2f}x tokens/s, {ratio[2]:.1f}x fewer temp bytes")


def tpu_attention_compile(topology: str) -> None:
    """(d): one row per backend, compiled for `topology` (e.g. v5p:2x2x1, 4 chips)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from topd_jax.models.attention import attention
    from topd_jax.models.masks import causal_visibility
    from topd_jax.models.sharding import make_mesh

    kind, _, grid = topology.partition(":")
    devices = topologies.get_topology_desc(f"{kind}:{grid}", "tpu").devices
    mesh = make_mesh(data=2, tensor=len(devices) // 2, devices=devices)
    b, t, n, kv, h = 4, 8192, 32, 8, 128

    def spec(shape, *axes):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16 if len(shape) == 4 else jnp.bool_,
                                    sharding=NamedSharding(mesh, PartitionSpec(*axes)))

    q, k = spec((b, t, n, h), "data", None, "tensor"), spec((b, t, kv, h), "data", None, "tensor")
    pad = spec((b, t), "data")
    print(f"attention fwd+bwd compiled for {topology} ({len(devices)} chips, data 2 x tensor {len(devices) // 2}), "
          f"B={b}, T={t}, {n} query / {kv} kv heads of {h}, bf16:")
    print("| backend   | temp GiB per chip | compile s |")
    for impl in ("dense", "blockwise", "splash"):
        def loss(q, k, v, pad):
            return jnp.sum(attention(q, k, v, causal_visibility(pad), impl=impl, block=512).astype(jnp.float32))
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, pad).compile()
        print(f"| {impl:9s} | {compiled.memory_analysis().temp_size_in_bytes / 2**30:17.2f} | "
              f"{time.perf_counter() - t0:9.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
    parser.add_argument("--measure-load", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help="run only (b), the load's host memory")
    parser.add_argument("--attention-only", action="store_true", help="run only (c), the attention backends")
    parser.add_argument("--tpu-topology", help="run only (d): compile the attention backends for this TPU topology")
    parser.add_argument("--dense-max-gib", type=float, default=4.0,
                        help="skip dense attention when its [B, N, T, T] float32 scores exceed this")
    args = parser.parse_args()
    if args.measure_load:
        return measure_load(args.measure_load, args.dtype, args.naive)
    if args.tpu_topology:
        import topd_jax  # noqa: F401  (CPU host: JAX runs on the CPU, libtpu only compiles)
        return tpu_attention_compile(args.tpu_topology)
    lengths = (64, 256) if args.quick else (512, 2048, 8192)
    if args.attention_only:
        return attention_benchmark(lengths, rounds=args.rounds, steps=args.steps, block=128 if args.quick else 512,
                                   dense_max_gib=args.dense_max_gib)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from topd_jax.models import load_pretrained

    sizes = dict(QUICK if args.quick else FULL)
    batch, length = sizes.pop("batch"), sizes.pop("length")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**sizes, tie_word_embeddings=True, max_position_embeddings=4096,
                                      attn_implementation="sdpa")
    hf = transformers.Qwen3ForCausalLM(config)
    params = sum(p.numel() for p in hf.parameters())
    tmp = tempfile.mkdtemp(prefix="bench_model_")
    hf.save_pretrained(os.path.join(tmp, "f32"))
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(os.path.join(tmp, "bf16"))
    model = load_pretrained(os.path.join(tmp, "f32"), dtype=jnp.float32)

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length + 1))
    x = jnp.asarray(tokens, jnp.int32)
    ids = torch.as_tensor(tokens[:, :length])
    labels = torch.as_tensor(tokens[:, 1:])

    @nnx.jit
    def jax_step(model, x):
        def loss_fn(model):
            logp = jax.nn.log_softmax(model(x[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))
        return nnx.value_and_grad(loss_fn)(model)

    def torch_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        return loss.detach()

    if not args.load_only:  # (a)
        print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable")
        print(f"model: Qwen3-shaped, {params / 1e6:.1f}M params, hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, tied; "
              f"batch {batch} x {length} tokens, float32")
        t0 = time.perf_counter()
        loss_j, grads = jax_step(model, x)
        jax.block_until_ready(grads)
        print(f"jax compile + first step: {time.perf_counter() - t0:.2f} s")
        loss_t = torch_step()
        print(f"loss: jax {float(loss_j):.6f}  torch {loss_t.item():.6f}  (same weights, same tokens)")

        times: dict[str, list[float]] = {"jax": [], "torch": []}
        for _ in range(args.rounds):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(jax_step(model, x))
                times["jax"].append(time.perf_counter() - t0)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                torch_step()
                times["torch"].append(time.perf_counter() - t0)
        rate = {k: batch * length / statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"{k:>5}: median step {statistics.median(v) * 1e3:8.1f} ms (min {min(v) * 1e3:.1f}, "
                  f"{len(v)} steps)  -> {rate[k]:9.0f} tokens/s fwd+bwd")
        print(f"jax / torch throughput: {rate['jax'] / rate['torch']:.2f}x")

    print("load_pretrained peak host RSS increase (fresh process each):")
    for label, sub, dtype, naive in (("f32 checkpoint -> float32", "f32", "float32", False),
                                     ("f32 checkpoint -> bfloat16", "f32", "bfloat16", False),
                                     ("bf16 checkpoint -> bfloat16", "bf16", "bfloat16", False),
                                     ("naive load_file + jnp.asarray, f32", "f32", "float32", True)):
        path = os.path.join(tmp, sub)
        size = os.path.getsize(os.path.join(path, "model.safetensors"))
        r = load_memory(path, size, dtype, naive)
        print(f"  {label:<36} file {size / 2**20:7.1f} MiB  peak +{r['peak_increase_bytes'] / 2**20:7.1f} MiB "
              f"= {r['ratio']:.2f}x file")
    if not args.load_only:
        attention_benchmark(lengths, rounds=args.rounds, steps=args.steps, block=128 if args.quick else 512,
                            dense_max_gib=args.dense_max_gib)


if __name__ == "__main__":
    main()
