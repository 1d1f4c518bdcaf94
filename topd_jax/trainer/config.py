"""The training configuration: frozen, typed dataclasses read from YAML plus `key=value` overrides.

    config = load_config("configs/tiny_cpu.yaml", ["steps=2", "rollout.max_new_tokens=16"])

Every key has a default, so `load_config(None)` is a complete (tiny, random-model) run. Every bad
input is a one-line ConfigError naming the dotted key: unknown keys (with the closest valid one),
wrong types (key, expected type, value given) and out-of-range values. `configs/tiny_cpu.yaml`
and `configs/paper_qwen3_30b_a3b_to_4b.yaml` document the keys in context.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import jax.numpy as jnp
import optax
import yaml

from topd_jax import configuration, fileio
from topd_jax.configuration import ConfigError
from topd_jax.losses.topd import TopdConfig
from topd_jax.models.attention import ATTENTION_CHOICES
from topd_jax.models.config import ModelConfig
from topd_jax.models.sharding import MESH_AXES


_check = configuration.check  # the one validation style of trainer, loss and model configs



LOSS_YAML_HEADER = """\
# TOPD loss: every key of `topd_jax.losses.TopdConfig` with its default (the `topd` preset).
#
# GENERATED from TopdConfig's docstring by `topd_jax.trainer.config.loss_yaml`; do not edit by
# hand (tests/test_configs.py checks it). Regenerate with
#   python -c "from topd_jax.trainer.config import loss_yaml; print(loss_yaml(), end='')" > configs/topd_loss.yaml
# Load with `TopdConfig.from_dict(yaml.safe_load(open("configs/topd_loss.yaml")))`. The presets:
# opd sets suppress_weight: 1.0, traj_weight: 0.0; opd_suppress sets traj_weight: 0.0.
"""


def loss_yaml() -> str:
    """configs/topd_loss.yaml: TopdConfig's documented defaults (`configuration.documented_yaml`)."""
    return configuration.documented_yaml(TopdConfig, LOSS_YAML_HEADER)

@dataclasses.dataclass(frozen=True)
class RandomModelConfig:
    """A tiny randomly initialised decoder, used when `ModelSpec.path` is null.

    family                 qwen3 | qwen3_moe | qwen2 | llama (qwen3*: q/k RMSNorm; qwen2: q/k/v bias)
    vocab_size             vocabulary size; the student's and teacher's must match
    hidden_size            residual width D
    intermediate_size      dense SwiGLU MLP width
    num_layers             decoder layers
    num_heads              query heads; a multiple of num_kv_heads
    num_kv_heads           key/value heads (GQA)
    head_dim               width of each head
    num_experts            MoE experts; > 0 exactly when family is qwen3_moe
    num_experts_per_tok    experts routed per token, in [1, num_experts] for qwen3_moe, else 0
    moe_intermediate_size  width of each expert's MLP; > 0 for qwen3_moe, else 0
    tie_word_embeddings    share the input embedding with the LM head
    init_seed              seed of the parameter initialisation
    """

    family: Literal["qwen3", "qwen3_moe", "qwen2", "llama"] = "qwen3"
    vocab_size: int = 128
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    init_seed: int = 0

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")
        _check(*[(name, getattr(self, name) >= 1, ">= 1", getattr(self, name)) for name in sizes])
        _check(("num_heads", self.num_heads % self.num_kv_heads == 0,
                f"a multiple of num_kv_heads={self.num_kv_heads}", self.num_heads))
        if self.family == "qwen3_moe":
            _check(("num_experts", self.num_experts >= 1, ">= 1 for family 'qwen3_moe'", self.num_experts),
                   ("num_experts_per_tok", 1 <= self.num_experts_per_tok <= self.num_experts,
                    f"in [1, num_experts={self.num_experts}]", self.num_experts_per_tok),
                   ("moe_intermediate_size", self.moe_intermediate_size >= 1, ">= 1 for family 'qwen3_moe'",
                    self.moe_intermediate_size))
        else:
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                _check((name, getattr(self, name) == 0, f"0 for the dense family {self.family!r}",
                        getattr(self, name)))

    def model_config(self) -> ModelConfig:
        """The ModelConfig with the family's switches set as its config_from_hf would set them."""
        return ModelConfig(
            family=self.family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            tie_word_embeddings=self.tie_word_embeddings,
            qk_norm=self.family in ("qwen3", "qwen3_moe"), qkv_bias=self.family == "qwen2",
            num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            # Qwen3-30B-A3B renormalises its top-k router weights.
            norm_topk_prob=self.family == "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from.

    path    local Hugging Face checkpoint directory (config.json + safetensors); null = build a
            random model from `random`
    dtype   float32 | bfloat16: parameter and compute dtype
    random  RandomModelConfig, used only when path is null
    """

    path: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    random: RandomModelConfig = RandomModelConfig()


def _default_teacher() -> ModelSpec:
    # Twice the student's default width, so a random teacher differs from a random student.
    return ModelSpec(random=RandomModelConfig(hidden_size=64, intermediate_size=128, head_dim=16, init_seed=1))


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How both models compute (not what they are; config.json is never changed by these).

    attention        auto | dense | blockwise | splash | cudnn (models.attention.ATTENTION_CHOICES,
                     the table it is checked against): the attention backend; auto = exact dense
                     attention while the score matrix is small (T x S <= 2^20), above that the
                     platform's fused kernel (splash on TPU, cudnn on GPU for bfloat16) for prompt
                     + rollout and blockwise for the look-ahead windows, else blockwise; the
                     others force one
    attention_block  query and key block size of blockwise attention and the splash kernel (>= 1)
    remat            none | dots | full: rematerialisation of each scanned decoder layer in the
                     backward pass (dots keeps matmul outputs; full keeps only each layer's input)
    """

    attention: str = "auto"  # checked against ATTENTION_CHOICES, the one list of backends
    attention_block: int = 512
    remat: Literal["none", "dots", "full"] = "none"

    def __post_init__(self):
        _check(("attention", self.attention in ATTENTION_CHOICES, f"one of {', '.join(ATTENTION_CHOICES)}",
                self.attention),
               ("attention_block", self.attention_block >= 1, ">= 1", self.attention_block))

    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields these set (`dataclasses.replace(model_config, **overrides())`)."""
        return {"attention": self.attention, "attention_block": self.attention_block, "remat": self.remat}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Student sampling.

    prompts_per_step  prompts per train step, global across all hosts (>= 1)
    num_samples       rollouts per prompt (>= 1); the batch is prompts_per_step * num_samples
    max_new_tokens    generated tokens per rollout (>= 1)
    temperature       sampling temperature (>= 0; 0 = greedy)
    top_p             nucleus mass in (0, 1]; 1 = off
    top_k             keep the k most likely tokens (>= 0; 0 = off)
    eos_ids           tokens that end a rollout; empty = the tokenizer's EOS when there is a
                      tokenizer, else none (random models run to max_new_tokens)
    window_temperature  sampling temperature of the look-ahead windows both models branch
                      (>= 0); null = temperature
    mode              continuous: decode slots refilled as rows end and rollouts carried
                      across steps (`trainer.rollouts`; the default: the plan and the benchmark
                      show it faster on long-tailed lengths, docs/trainer.md); static: each step
                      decodes its batch in lockstep until every row ended (`sampling.generate`)
    slots             continuous: decode slots (>= num_samples); 0 = the batch,
                      prompts_per_step * num_samples
    check_every       continuous: decode steps between the loop's checks for ended rows (>= 1)
    max_staleness     continuous: a prompt's rollouts whose first token was drawn more than this
                      many updates ago are dropped, unfinished or not (>= 0; 0 = on-policy only)
    """

    prompts_per_step: int = 8
    num_samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    window_temperature: float | None = None
    mode: Literal["static", "continuous"] = "continuous"
    slots: int = 0
    check_every: int = 8
    max_staleness: int = 1

    def __post_init__(self):
        _check(("prompts_per_step", self.prompts_per_step >= 1, ">= 1", self.prompts_per_step),
               ("num_samples", self.num_samples >= 1, ">= 1", self.num_samples),
               ("max_new_tokens", self.max_new_tokens >= 1, ">= 1", self.max_new_tokens),
               ("temperature", self.temperature >= 0, ">= 0", self.temperature),
               ("top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p),
               ("top_k", self.top_k >= 0, ">= 0", self.top_k),
               ("eos_ids", all(i >= 0 for i in self.eos_ids), "token ids >= 0", self.eos_ids),
               ("window_temperature", self.window_temperature is None or self.window_temperature >= 0, ">= 0 or null",
                self.window_temperature),
               ("slots", self.slots == 0 or self.slots >= self.num_samples, f"0 or >= num_samples ({self.num_samples})",
                self.slots),
               ("check_every", self.check_every >= 1, ">= 1", self.check_every),
               ("max_staleness", self.max_staleness >= 0, ">= 0", self.max_staleness))

    @property
    def num_slots(self) -> int:
        """Decode slots of the continuous mode: `slots`, or the batch when 0."""
        return self.slots or self.prompts_per_step * self.num_samples


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompts.

    source         random: seeded random token prompts (for random models) |
                   jsonl: a local JSONL file, one problem per line |
                   synthetic: the seeded arithmetic task of `topd_jax.data.synthetic` (its own
                   word-level tokenizer of 30 tokens; models need vocab_size >= 30) |
                   tfds: a local JSONL or Parquet math file built once into a TFDS ArrayRecord
                   dataset (in data_dir) and read through Grain, each process its own shard
                   of the records (every n-th from its index) in a seeded order per epoch
    path           the JSONL (or, for tfds, Parquet) file; required for jsonl and tfds
    layout         tfds: how the file's fields map to problem/answer (prompts | aime24 | aime25 |
                   amc23 | math500 | gsm8k; see topd_jax.data.math_sets)
    data_dir       tfds: where the built dataset lives (null = output_dir/data)
    field          the JSON key of each line's problem text
    prompt_length  prompt tokens: the length of random prompts, and the left-padding width for
                   jsonl and synthetic (longer jsonl prompts are skipped and counted; synthetic
                   prompts need up to 14)
    system_prompt  optional system message of the chat template (jsonl)
    """

    source: Literal["random", "jsonl", "synthetic", "tfds"] = "random"
    path: str | None = None
    layout: Literal["prompts", "aime24", "aime25", "amc23", "math500", "gsm8k"] = "prompts"
    data_dir: str | None = None
    field: str = "problem"
    prompt_length: int = 16
    system_prompt: str | None = None

    def __post_init__(self):
        _check(("path", self.source not in ("jsonl", "tfds") or bool(self.path), "set when source is 'jsonl' or 'tfds'",
                self.path),
               ("prompt_length", self.prompt_length >= 1, ">= 1", self.prompt_length))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + constant/cosine learning-rate schedule.

    learning_rate  peak learning rate (finite, > 0: inf or nan would turn every weight into NaN)
    schedule       constant | cosine (decays to 0 at the last step)
    warmup_steps   linear warmup from 0 over this many steps (>= 0)
    weight_decay   decoupled AdamW weight decay (>= 0)
    b1, b2         Adam moment decay rates, in [0, 1)
    eps            Adam epsilon (> 0)
    max_grad_norm  clip gradients to this global norm (> 0); null = no clipping
    max_consecutive_skips  stop the run with an error after this many consecutive steps whose
                   loss or gradients were non-finite (each is skipped, params unchanged); a run
                   that only skips is not training. 0 = never stop (>= 0)
    """

    learning_rate: float = 1e-5
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    max_consecutive_skips: int = 10

    def __post_init__(self):
        _check(("learning_rate", self.learning_rate > 0, "> 0", self.learning_rate),  # nan fails too
               ("learning_rate", math.isfinite(self.learning_rate), "finite", self.learning_rate),
               ("schedule", self.schedule in ("constant", "cosine"), "'constant' or 'cosine'", self.schedule),
               ("warmup_steps", self.warmup_steps >= 0, ">= 0", self.warmup_steps),
               ("weight_decay", self.weight_decay >= 0, ">= 0", self.weight_decay),
               ("b1", 0 <= self.b1 < 1, "in [0, 1)", self.b1),
               ("b2", 0 <= self.b2 < 1, "in [0, 1)", self.b2),
               ("eps", self.eps > 0, "> 0", self.eps),
               ("max_grad_norm", self.max_grad_norm is None or (math.isfinite(self.max_grad_norm)
                                                                 and self.max_grad_norm > 0), "> 0 and finite, or null",
                self.max_grad_norm),
               ("max_consecutive_skips", self.max_consecutive_skips >= 0, ">= 0", self.max_consecutive_skips))

    def learning_rate_schedule(self, total_steps: int) -> Callable[[Any], Any]:
        """step -> learning rate, with W = warmup_steps, T = total_steps, lr = learning_rate:

            lr(s) = lr * s / W                                   s < W
            lr(s) = lr                                           s >= W, constant
            lr(s) = lr * (1 + cos(pi * min(s - W, D) / D)) / 2   s >= W, cosine; D = max(T - W, 1)
        """
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps!r}")
        peak, warmup, cosine = self.learning_rate, self.warmup_steps, self.schedule == "cosine"
        decay = max(total_steps - warmup, 1)

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            warm = peak * step / max(warmup, 1)
            after = jnp.clip(step - warmup, 0, decay)
            main = peak * 0.5 * (1 + jnp.cos(math.pi * after / decay)) if cosine else jnp.full_like(step, peak)
            return jnp.where(step < warmup, warm, main)

        return schedule

    def build(self, total_steps: int) -> optax.GradientTransformation:
        """clip_by_global_norm(max_grad_norm) then adamw on `learning_rate_schedule(total_steps)`."""
        adamw = optax.adamw(self.learning_rate_schedule(total_steps), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay)
        if self.max_grad_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (see topd_jax.models.sharding): each >= 1, or -1 for the remaining devices.

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters sharded (ZeRO-3)
    tensor  tensor parallelism (heads, MLP width, vocabulary)
    expert  expert parallelism (MoE experts)
    At most one size is -1; the product of the sizes must equal the device count.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        _check(*[(axis, getattr(self, axis) >= 1 or getattr(self, axis) == -1, ">= 1 or -1", getattr(self, axis))
                 for axis in MESH_AXES])
        auto = [axis for axis in MESH_AXES if getattr(self, axis) == -1]
        if len(auto) > 1:
            raise ConfigError(f"at most one mesh size may be -1, got -1 for {', '.join(auto)}")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """{axis: size} over `num_devices` devices, the -1 axis taking the devices left over."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        named = " ".join(f"{axis}={size}" for axis, size in sizes.items())
        fixed = math.prod(size for size in sizes.values() if size != -1)
        auto = [axis for axis, size in sizes.items() if size == -1]
        if auto:
            if num_devices % fixed:
                raise ConfigError(f"mesh {named}: the fixed sizes' product {fixed} does not divide "
                                  f"the {num_devices} devices")
            sizes[auto[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ConfigError(f"mesh {named} needs {fixed} devices, but there are {num_devices}")
        return sizes


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Where sampling and branching decode: a second mesh over the same devices (scoring, a
    prefill, stays on the training mesh; `trainer.phases.PHASE_MESH`).

    layout  auto: tensor parallel over both models' kv heads (up to 8 devices), expert parallel
            over an MoE teacher's experts, data parallel over the rest, no fsdp
            (`runtime.auto_inference_sizes`) | train: the training mesh as it is (no reshard) |
            mesh: the sizes below
    mesh    the inference mesh's sizes for layout mesh (a MeshConfig: data, fsdp, tensor, expert)
    Each step the student's parameters are resharded once from the training mesh to this one
    (`jax.device_put`) and read by every no-gradient phase of the step; the teacher's live here
    from the start. Results equal the training layout's (up to float summation order); only the
    speed changes.
    """

    layout: Literal["auto", "train", "mesh"] = "auto"
    mesh: MeshConfig = MeshConfig()


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) start-up, see topd_jax.trainer.runtime.initialize_distributed.

    initialize           auto: initialise when the environment shows a multi-process launch |
                         on: always | off: never (single process)
    coordinator_address  host:port of process 0; null = JAX's auto-detection (TPU VM, SLURM, ...)
    num_processes        null = auto-detected
    process_id           null = auto-detected
    """

    initialize: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        n, i = self.num_processes, self.process_id
        _check(("num_processes", n is None or n >= 1, ">= 1 or null", n),
               ("process_id", i is None or (i >= 0 and (n is None or i < n)), "in [0, num_processes) or null", i))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints under `<output_dir>/checkpoints`.

    every       save every N steps (>= 0); 0 = only at the end and on SIGTERM, SIGINT or SIGHUP
    keep        most recent checkpoints kept (>= 1)
    async_save  write checkpoints in the background while training continues
    resume      continue from the latest checkpoint in output_dir when there is one; false starts
                over, which an output_dir holding an earlier run's checkpoints refuses (one line:
                a folder holds one run) unless earlier_run=move
    resume_changed  resume even though keys that change the training (preset, loss, models,
                rollout, data, optimizer, seed) differ from the checkpoint's config; without it
                such a resume is refused with a one-line error listing the keys. Accepted
                changes are recorded in events.log and the earlier config.yaml is kept as
                config.before-<step>.yaml
    earlier_run  refuse | move: what resume=false does with an earlier run in output_dir. refuse
                (default): a one-line error, nothing touched. move: the earlier run's files
                (checkpoints/, tensorboard/, config.yaml, metrics.jsonl, events.log) are moved,
                unchanged, into the new folder <output_dir>.earlier-<UTC time> before the new
                run writes anything (named in events.log)
    """

    every: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    resume_changed: bool = False
    earlier_run: Literal["refuse", "move"] = "refuse"

    def __post_init__(self):
        _check(("every", self.every >= 0, ">= 0", self.every), ("keep", self.keep >= 1, ">= 1", self.keep))


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics output.

    tensorboard  write TensorBoard event files under `<output_dir>/tensorboard`
    progress     print a progress line per step (process 0 only)
    peak_flops   per-device peak FLOP/s for the MFU estimate (> 0); null = the known table of
                 accelerators, else measured
    """

    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = None

    def __post_init__(self):
        _check(("peak_flops", self.peak_flops is None or self.peak_flops > 0, "> 0 or null", self.peak_flops))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    output_dir   checkpoints, TensorBoard logs and the resolved config.yaml go here
    steps        train steps (>= 1)
    preset       opd | opd_suppress | topd: the TopdConfig preset (see TopdConfig.preset)
    seed         seed of data, sampling and anything random outside the model initialisation
    chunk_size   rows per chunk of the vocabulary log-softmax (>= 1); bounds the logits' memory
    loss         the TopdConfig; in YAML a mapping of its fields that override the preset, e.g.
                 {window: 8} (omitted: the preset as it is)
    student      ModelSpec of the student (trained)
    teacher      ModelSpec of the teacher (frozen); its vocabulary must match the student's
    model        ComputeConfig of both models: attention backend, its block size, remat policy
    rollout, data, optimizer, mesh, inference, distributed, checkpoint, logging: the sections above
    """

    output_dir: str = "runs/topd"
    steps: int = 100
    preset: Literal["opd", "opd_suppress", "topd"] = "topd"
    seed: int = 0
    chunk_size: int = 512
    loss: TopdConfig = None  # type: ignore[assignment]  (None: the preset, set in __post_init__)
    student: ModelSpec = ModelSpec()
    teacher: ModelSpec = dataclasses.field(default_factory=_default_teacher)
    model: ComputeConfig = ComputeConfig()
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    inference: InferenceConfig = InferenceConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    def __post_init__(self):
        _check(("steps", self.steps >= 1, ">= 1", self.steps),
               ("chunk_size", self.chunk_size >= 1, ">= 1", self.chunk_size))
        if self.loss is None:
            object.__setattr__(self, "loss", TopdConfig.preset(self.preset))
        elif not isinstance(self.loss, TopdConfig):
            raise ConfigError(f"loss must be a TopdConfig, got {type(self.loss).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (YAML-able); load_config of its YAML gives an equal config."""
        return configuration.to_dict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "TrainConfig":
        """Typed construction from nested mappings (one-line errors naming the dotted key)."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a training config must be a mapping of keys, got {type(values).__name__}")
        values = dict(values)
        loss = values.pop("loss", None)
        config = configuration.from_dict(cls, values)  # its loss: the preset
        if loss is None or isinstance(loss, TopdConfig):
            return config if loss is None else dataclasses.replace(config, loss=loss)
        if not isinstance(loss, Mapping):
            raise ConfigError(f"loss: expected a mapping of TopdConfig keys, got {loss!r} ({type(loss).__name__})")
        # The preset first, then the file's loss keys (which name their fields with `loss.`).
        configuration.check_keys(TopdConfig, loss, prefix="loss.")
        merged = {**TopdConfig.preset_values(config.preset), **loss}
        return dataclasses.replace(config, loss=configuration.from_dict(TopdConfig, merged, prefix="loss."))


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (None = all defaults) and `dotted.key=value` overrides.

    Override values are YAML (`eos_ids=[1,2]`, `student.path=null`, `preset=opd`); files and
    values are read with configuration.parse_yaml (1e-5 is a float, off is a string); a file that
    is not UTF-8 is a one-line ConfigError. Later overrides win here (the protocol layers its
    settings); the CLIs refuse a key given twice before they call this
    (`configuration.check_overrides`).
    """
    values: Any = {}
    if path is not None:  # one-line errors for a missing file or one that is not UTF-8
        values = configuration.parse_yaml(configuration.read_text(path), os.fspath(path))
        if values is None:  # an empty file: all defaults
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{os.fspath(path)}: the top level must be a mapping of keys, "
                              f"got {type(values).__name__}")
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the string {overrides!r}")
    for override in overrides:
        configuration.apply_override(values, override, TrainConfig)
    return TrainConfig.from_dict(values)


# Keys a resume may change freely: where and how long the run goes, how it computes (chunking,
# attention backend, remat) and is laid out on the devices, checkpointed and logged. Any other
# change alters what is trained (checked on resume).
RESUME_MAY_CHANGE = ("output_dir", "steps", "chunk_size", "model", "mesh", "distributed", "checkpoint", "logging")


def resume_changes(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """`key: saved -> new` for every key outside RESUME_MAY_CHANGE whose value in the checkpoint's
    config (`saved`, as TrainConfig.to_dict wrote it) differs from `config`'s, dotted, sorted.
    A key that only one side has (a version added or moved it) counts as its default there."""

    def flat(values: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(values, Mapping):  # tuples as the JSON of the checkpoint holds them
            return {prefix[:-1]: list(values) if isinstance(values, tuple) else values}
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out

    default = flat(TrainConfig().to_dict())
    old, new = flat(dict(saved)), flat(config.to_dict())
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, default.get(key, "<unset>")), new.get(key, default.get(key, "<unset>"))
        if key.split(".")[0] not in RESUME_MAY_CHANGE and before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, crash-safe (`fileio.write_file`)."""
    text = "# Resolved topd_jax training config (load with topd_jax.trainer.config.load_config).\n"
    text += yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    fileio.write_file(path, text)
