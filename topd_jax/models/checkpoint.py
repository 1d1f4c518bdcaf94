"""Hugging Face checkpoints (safetensors only) to and from `CausalLM`, one tensor at a time.

`load_pretrained` builds the model abstractly (no parameter memory), checks every tensor's
presence and shape against config.json from the headers alone, then creates each parameter with
`jax.make_array_from_callback` on its (sharded) destination: each device's block is read from
disk, transposed to our layout and cast, so the host holds at most one parameter's distinct blocks
at a time, never a second copy of the checkpoint. Every block read is checked to be finite: a
NaN or inf weight is a one-line CheckpointError naming the file and tensor, at load, not a run
whose every step is skipped. Pickle checkpoints (*.bin, *.pt) are refused and never opened.

Tensor names and layouts (HF `nn.Linear` weights are [out, in]; ours are [in, out] with heads
split out, see layers.py):
  model.embed_tokens.weight                [V, D]          -> embed_tokens [V, D]
  lm_head.weight                           [V, D]          -> lm_head [D, V] (absent when tied)
  model.layers.i.self_attn.{q,k,v}_proj.weight [N*H, D]    -> {q,k,v}_proj [D, N, H]
  model.layers.i.self_attn.o_proj.weight   [D, N*H]        -> o_proj [N, H, D]
  model.layers.i.mlp.{gate,up}_proj.weight [F, D]          -> [D, F];  down_proj [D, F] -> [F, D]
  model.layers.i.mlp.gate.weight           [E, D]          -> router [D, E]
  model.layers.i.mlp.experts.e.{gate,up}_proj.weight [I, D] for e < E -> {gate,up}_proj [E, D, I]
  model.layers.i.mlp.experts.e.down_proj.weight      [D, I] for e < E -> down_proj [E, I, D]
  norms, biases: same shape (q/k/v biases [N*H] -> [N, H]).
The decoder's layers are scanned, so each layer parameter above is one slice of a stacked
parameter [L_g, ...] (`layers`, g, `layer`, ...) over a run of layers of one kind: loading fills
the stacked array slice by slice (each device's block reads its layers' tensors in turn) and
saving writes one HF tensor per layer, exactly the files transformers reads and writes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.errors import CheckpointError  # the one class, shared with trainer/checkpointing
from topd_jax.fileio import replace_directory
from topd_jax.models.config import ModelConfig
from topd_jax.models.decoder import CausalLM
from topd_jax.models.families import config_to_hf, read_config
from topd_jax.models.safetensors_io import SafetensorsFile, write_file
from topd_jax.models.sharding import MeshAxes, Rules, logical_sharding

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one of our parameters lives in a HF checkpoint: tensor name(s) and layout `kind`.

    A parameter of the scanned layers has a leading `layers` axis: then `layers` lists the HF
    layer index of each slice and every name is a template with `{layer}`; slice l is the
    tensor(s) of HF layer layers[l], laid out as for an unstacked parameter.
    """

    names: tuple[str, ...]  # one name, or one per expert for stacked expert weights
    kind: str  # copy | linear | heads_in | heads_out | bias_heads | experts_in | experts_out
    layers: tuple[int, ...] = ()

    def hf_names(self) -> tuple[str, ...]:
        """Every HF tensor name this parameter reads or writes, in checkpoint order."""
        if not self.layers:
            return self.names
        return tuple(name.format(layer=i) for i in self.layers for name in self.names)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of each HF tensor given our parameter's shape."""
        if self.layers:
            shape = shape[1:]
        if self.kind == "copy":
            return shape
        if self.kind == "linear":
            return shape[::-1]
        if self.kind == "heads_in":  # [D, n, h] <- [n*h, D]
            return (shape[1] * shape[2], shape[0])
        if self.kind == "heads_out":  # [n, h, D] <- [D, n*h]
            return (shape[2], shape[0] * shape[1])
        if self.kind == "bias_heads":  # [n, h] <- [n*h]
            return (shape[0] * shape[1],)
        return (shape[2], shape[1])  # experts: [E, a, b] <- E x [b, a]

    def at_layer(self, l: int) -> "HFTensor":
        """The unstacked tensor of slice l (names filled in)."""
        return HFTensor(tuple(name.format(layer=self.layers[l]) for name in self.names), self.kind)


def tensor_map(cfg: ModelConfig) -> dict[Path, HFTensor]:
    """Our parameter path (nnx state path) -> its HF tensor(s), for every parameter of `cfg`."""
    one = lambda name, kind: HFTensor((name,), kind)  # noqa: E731
    out: dict[Path, HFTensor] = {
        ("embed_tokens",): one("model.embed_tokens.weight", "copy"),
        ("norm", "weight"): one("model.norm.weight", "copy"),
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = one("lm_head.weight", "linear")
    for g, (first, stop) in enumerate(cfg.layer_groups()):
        layers = tuple(range(first, stop))
        hf, at = "model.layers.{layer}.", ("layers", g, "layer")

        def add(path, names, kind):
            out[at + path] = HFTensor(tuple(names), kind, layers)

        add(("input_layernorm", "weight"), [hf + "input_layernorm.weight"], "copy")
        add(("post_attention_layernorm", "weight"), [hf + "post_attention_layernorm.weight"], "copy")
        attn = hf + "self_attn."
        for p in "qkv":
            add(("self_attn", f"{p}_proj"), [f"{attn}{p}_proj.weight"], "heads_in")
            if cfg.qkv_bias:
                add(("self_attn", f"{p}_bias"), [f"{attn}{p}_proj.bias"], "bias_heads")
        add(("self_attn", "o_proj"), [attn + "o_proj.weight"], "heads_out")
        if cfg.o_bias:
            add(("self_attn", "o_bias"), [attn + "o_proj.bias"], "copy")
        if cfg.qk_norm:
            add(("self_attn", "q_norm", "weight"), [attn + "q_norm.weight"], "copy")
            add(("self_attn", "k_norm", "weight"), [attn + "k_norm.weight"], "copy")
        mlp = hf + "mlp."
        if cfg.is_moe_layer(first):
            add(("mlp", "router"), [mlp + "gate.weight"], "linear")
            for p, kind in (("gate", "experts_in"), ("up", "experts_in"), ("down", "experts_out")):
                add(("mlp", f"{p}_proj"), [f"{mlp}experts.{e}.{p}_proj.weight" for e in range(cfg.num_experts)], kind)
        else:
            for p in ("gate", "up", "down"):
                add(("mlp", f"{p}_proj"), [f"{mlp}{p}_proj.weight"], "linear")
                if cfg.mlp_bias:
                    add(("mlp", f"{p}_bias"), [f"{mlp}{p}_proj.bias"], "copy")
    return out


def _read_block(read: Callable, t: HFTensor, block: tuple[tuple[int, int], ...], head_dim: int,
                dtype=None) -> np.ndarray:
    """Our-layout block ([start, stop) per dim of our parameter) read from the HF tensor(s) (cast
    to `dtype` when given); a stacked parameter's block is filled slice by slice from its layers'
    tensors into one preallocated array, so at most one layer's slice is held beside it."""
    if t.layers:
        (l0, l1), inner = block[0], block[1:]
        first = _read_block(read, t.at_layer(l0), inner, head_dim)
        out = np.empty((l1 - l0,) + first.shape, first.dtype if dtype is None else dtype)
        out[0] = first
        del first
        for i in range(1, l1 - l0):
            out[i] = _read_block(read, t.at_layer(l0 + i), inner, head_dim)
        return out
    name, kind = t.names[0], t.kind
    if kind == "copy":
        return read(name, block)
    if kind == "linear":
        return read(name, block[::-1]).T
    if kind == "bias_heads":
        (n0, n1), (h0, h1) = block
        return read(name, ((n0 * head_dim, n1 * head_dim),)).reshape(n1 - n0, head_dim)[:, h0:h1]
    if kind == "heads_in":
        d, (n0, n1), (h0, h1) = block
        rows = read(name, ((n0 * head_dim, n1 * head_dim), d))
        return rows.reshape(n1 - n0, head_dim, d[1] - d[0])[:, h0:h1].transpose(2, 0, 1)
    if kind == "heads_out":
        (n0, n1), (h0, h1), d = block
        cols = read(name, (d, (n0 * head_dim, n1 * head_dim)))
        return cols.reshape(d[1] - d[0], n1 - n0, head_dim)[:, :, h0:h1].transpose(1, 2, 0)
    (e0, e1), a, b = block  # experts: ours [E, a, b], HF per expert [b, a]
    return np.stack([read(t.names[e], (b, a)).T for e in range(e0, e1)])


def _to_hf(t: HFTensor, value: np.ndarray) -> Iterator[np.ndarray]:
    """Our full parameter -> its HF tensor(s), in the order of t.hf_names()."""
    if t.layers:
        for l in range(len(t.layers)):
            yield from _to_hf(t.at_layer(l), value[l])
    elif t.kind == "copy":
        yield value
    elif t.kind == "linear":
        yield value.T
    elif t.kind == "bias_heads":
        yield value.reshape(-1)
    elif t.kind == "heads_in":
        yield value.reshape(value.shape[0], -1).T
    elif t.kind == "heads_out":
        yield value.reshape(-1, value.shape[2]).T
    else:
        yield from (value[e].T for e in range(value.shape[0]))


def checkpoint_files(path: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        file = SafetensorsFile(os.path.join(path, SINGLE_FILE))
        return {name: file for name in file.tensors}
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        opened: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{index} lists {shard}, which is missing from {path}")
            opened[shard] = SafetensorsFile(os.path.join(path, shard))
        out = {}
        for name, shard in weight_map.items():
            if name not in opened[shard].tensors:
                raise CheckpointError(f"{index} maps tensor {name!r} to {shard}, which does not hold it")
            out[name] = opened[shard]
        return out
    pickles = sorted(os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat)))
    if pickles:
        raise CheckpointError(f"{path} holds only pickle checkpoint files ({', '.join(pickles)}); only safetensors "
                         "are supported and pickle files are never unpickled: convert the checkpoint to safetensors")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules | Mapping[str, MeshAxes] | None = None,
                    overrides: Mapping[str, Any] | None = None) -> CausalLM:
    """A CausalLM with the weights of the HF checkpoint directory `path` (config.json + safetensors).

    Parameters are created in `dtype` directly on their sharding: `mesh` + logical `rules`
    (sharding.DEFAULT_RULES when None), or the default device without a mesh. `overrides` sets
    ModelConfig fields of how the model computes (attention, attention_block, remat).
    """
    cfg = dataclasses.replace(read_config(path), **dict(overrides or {}))
    files = checkpoint_files(path)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tensors = tensor_map(cfg)
    flat = list(nnx.to_flat_state(state))
    assert {p for p, _ in flat} == set(tensors), "tensor_map out of sync with CausalLM"

    shapes = {p: tuple(var.shape) for p, var in flat}
    for param_path, t in tensors.items():  # validate everything from the headers, in HF order
        expected = t.hf_shape(shapes[param_path])
        for name in t.hf_names():
            if name not in files:
                raise CheckpointError(f"checkpoint {os.fspath(path)} has no tensor {name!r}")
            found = files[name].shape(name)
            if found != expected:
                raise CheckpointError(f"tensor {name!r} has shape {found} in the checkpoint, "
                                      f"expected {expected} from config.json")
            files[name].dtype(name)
    used = {name for t in tensors.values() for name in t.hf_names()}
    unexpected = sorted(n for n in files if n not in used and not _ignorable(n, cfg))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint {os.fspath(path)} has tensors this {cfg.family} config does not use: "
                         f"{', '.join(unexpected[:5])}{more}")

    def read(name, block):
        data = files[name].read(name, block)
        if data.dtype.kind not in "biu":  # floats; bfloat16 (ml_dtypes) is kind 'V'
            values = data if data.dtype.kind == "f" else data.astype(np.float32)
            if not np.isfinite(values).all():  # named at load, not found as a NaN loss at every step
                raise CheckpointError(f"{files[name].path}: tensor {name!r} holds NaN or inf; a model with "
                                      "non-finite weights cannot be trained or evaluated")
        return data

    np_dtype = np.dtype(dtype)
    loaded = []
    for param_path, var in flat:
        shape, t = tuple(var.shape), tensors[param_path]
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = logical_sharding(var.get_metadata()["out_sharding"], shape, mesh, rules)
        blocks: dict = {}  # replicated devices share one host block

        def callback(index, shape=shape, t=t, blocks=blocks):
            block = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
            if block not in blocks:
                data = _read_block(read, t, block, cfg.head_dim, np_dtype)
                blocks[block] = np.array(data, dtype=np_dtype, order="C", copy=None)
            return blocks[block]

        loaded.append((param_path, var.replace(jax.make_array_from_callback(shape, sharding, callback))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30,
                    dtype=None) -> None:
    """Write `model` as a HF checkpoint transformers loads: config.json + safetensors.

    One parameter at a time is gathered to the host. Shards of at most `max_shard_size` bytes
    (a parameter is never split) with model.safetensors.index.json when more than one is needed.
    `dtype` casts on the way out (default: the parameters' dtype). The checkpoint is written to a
    staging directory and swapped in whole (`fileio.replace_directory`): an earlier checkpoint in
    `path` stays intact until the new one is complete, and other files there (tokenizer, README)
    are kept.
    """
    with replace_directory(path, replaced=is_checkpoint_file) as staging:
        write_pretrained(model, staging, max_shard_size=max_shard_size, dtype=dtype)


def write_pretrained(model: CausalLM, directory: str | os.PathLike, *, max_shard_size: int = 5 * 2**30,
                     dtype=None) -> None:
    """save_pretrained's files written straight into `directory` (e.g. a staging directory that a
    caller fills with more files, such as a tokenizer, before swapping it in whole)."""
    cfg: ModelConfig = model.config
    tensors = tensor_map(cfg)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out_dtype = np.dtype(dtype if dtype is not None else flat[0][1].get_value().dtype)

    shards: list[list] = [[]]
    size = 0
    for param_path, var in flat:
        t = tensors[param_path]
        shape = t.hf_shape(tuple(var.shape))
        nbytes = len(t.hf_names()) * int(np.prod(shape)) * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((var, t, shape))
        size += nbytes

    _write_shards(os.fspath(directory), shards, cfg, out_dtype)


def is_checkpoint_file(name: str) -> bool:
    """The files a save replaces; anything else in the directory is carried over."""
    return name == "config.json" or name == INDEX_FILE or fnmatch.fnmatch(name, "model*.safetensors")


def _write_shards(path: str, shards: list[list], cfg: ModelConfig, out_dtype: np.dtype) -> None:
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        header = [(name, out_dtype, shape) for _, t, shape in shard for name in t.hf_names()]

        def data(shard=shard):
            for var, t, _ in shard:
                value = np.asarray(jax.device_get(var.get_value())).astype(out_dtype)
                yield from _to_hf(t, value)

        write_file(os.path.join(path, file), header, data(), metadata={"format": "pt"})
        for name, _, shape in header:
            weight_map[name] = file
            total += int(np.prod(shape)) * out_dtype.itemsize
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(cfg, dtype=out_dtype.name), f, indent=2)
        f.write("\n")
