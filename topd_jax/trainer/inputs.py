"""What a run's inputs must agree on, checked from config.json and tokenizer files before any
weight is loaded (a mismatch then costs seconds, not a model load or a step).

    warnings = check_inputs(config)   # ConfigError (one line) on the first disagreement

- the student's and teacher's vocab_size are equal (TOPD compares their tokens id by id);
- their tokenizers agree: EOS, special tokens, the vocabulary token -> id (models.tokenizer.
  tokenizer_mismatch); a model with a tokenizer beside one without is a warning naming what
  was not checked;
- each tokenizer fits its model: every token id < the model's vocab_size;
- a candidate or reference position is a completion position, so there are at most
  rollout.max_new_tokens of them (more only allocate [B, M, K] buffers for positions that do not
  exist: memory, then an out-of-memory error, minutes later);
- every position a step uses fits each model's max_position_embeddings: data.prompt_length +
  rollout.max_new_tokens, plus loss.window - 1 when the teacher branches look-ahead windows
  from the completion's positions.
"""

from __future__ import annotations

from topd_jax.errors import CheckpointError, ConfigError, one_line
from topd_jax.models.config import ModelConfig
from topd_jax.trainer.config import ModelSpec, TrainConfig

ROLES = ("student", "teacher")


def model_config(spec: ModelSpec, role: str) -> ModelConfig:
    """The ModelConfig `spec` builds: its path's config.json, or its random config."""
    if spec.path is None:
        return spec.random.model_config()
    from topd_jax.models.families import read_config

    try:
        return read_config(spec.path)
    except (OSError, CheckpointError, ConfigError) as err:
        raise ConfigError(f"{role}.path {spec.path}: {one_line(err)}") from err


def positions_needed(config: TrainConfig) -> tuple[int, str]:
    """(positions, how they add up) of one step: prompt + completion (+ window - 1)."""
    p, t = config.data.prompt_length, config.rollout.max_new_tokens
    if config.loss.uses_windows:
        k = config.loss.window
        return p + t + k - 1, (f"data.prompt_length {p} + rollout.max_new_tokens {t} + loss.window {k} - 1 (a "
                               "window branches from the last completion position at most)")
    return p + t, f"data.prompt_length {p} + rollout.max_new_tokens {t}"


def check_bounds(config: TrainConfig) -> None:
    """The bounds one key sets on another (no model needed): candidates and reference positions
    vs the completion length."""
    t, loss = config.rollout.max_new_tokens, config.loss
    if not loss.uses_candidates:
        return
    keys = ("max_candidates", "num_reference") if loss.threshold_mode == "reference" else ("max_candidates",)
    for key in keys:
        value = getattr(loss, key)
        if value > t:
            raise ConfigError(f"loss.{key}: {value} positions per rollout, but a rollout has only "
                              f"rollout.max_new_tokens={t} positions; use at most {t}")


def check_inputs(config: TrainConfig) -> list[str]:
    """Refuse (ConfigError) inputs that cannot work together; return warnings about what could not
    be checked (one line each, for the console and events.log)."""
    from topd_jax.models.tokenizer import has_tokenizer, load_tokenizer, tokenizer_mismatch

    check_bounds(config)
    cfgs = {role: model_config(getattr(config, role), role) for role in ROLES}
    vocab_s, vocab_t = cfgs["student"].vocab_size, cfgs["teacher"].vocab_size
    if vocab_s != vocab_t:
        raise ConfigError(f"student vocab_size {vocab_s} != teacher vocab_size {vocab_t} (student.random / "
                          "teacher.random or their path's config.json); TOPD compares the two models' tokens, "
                          "so they must share a tokenizer")
    need, how = positions_needed(config)
    for role in ROLES:
        limit = cfgs[role].max_position_embeddings
        if need > limit:
            raise ConfigError(f"{how} = {need} positions, but the {role}'s max_position_embeddings is {limit}; "
                              "shorten the prompts, completions or windows")
    loss = config.loss
    used = {"top_k": loss.guidance_top_k}  # a guidance reading's top-k over the vocabulary, where used
    if loss.splices:
        used = {"top_k": loss.option("top_k") if loss.option("trigger") == "topk" else 0,
                "fkl_top_k": loss.option("fkl_top_k") if loss.option("loss") == "fkl" else 0}
    for key, k in used.items():
        if k > vocab_s:
            raise ConfigError(f"loss.guidance_options.{key} {k} exceeds the models' vocab_size {vocab_s}")

    dirs = {role: getattr(config, role).path for role in ROLES}
    tokenizers = {}
    for role in ROLES:
        if has_tokenizer(dirs[role]):
            try:
                tokenizers[role] = load_tokenizer(dirs[role])
            except (OSError, ValueError) as err:
                raise ConfigError(f"{role}.path {dirs[role]}: its tokenizer files do not load ({one_line(err)})") \
                    from err
    for role, tokenizer in tokenizers.items():
        top = max(tokenizer.get_vocab().values(), default=-1) + 1
        if top > cfgs[role].vocab_size:
            raise ConfigError(f"{role}.path {dirs[role]}: its tokenizer has ids up to {top - 1}, but the model's "
                              f"vocab_size is {cfgs[role].vocab_size}")
    if len(tokenizers) == 2:
        mismatch = tokenizer_mismatch(tokenizers["student"], tokenizers["teacher"])
        if mismatch:
            raise ConfigError(f"the student's and teacher's tokenizers differ: {mismatch} ({dirs['student']} vs "
                              f"{dirs['teacher']}); TOPD compares the two models' log-probs id by id, so they must "
                              "share one tokenizer")
        return []
    if len(tokenizers) == 1:
        [has] = tokenizers
        lacks = "teacher" if has == "student" else "student"
        what = f"{lacks}.path {dirs[lacks]} has no tokenizer files" if dirs[lacks] else f"the {lacks} is a random model"
        return [f"tokenizers not compared: {what}, so only vocab_size ({vocab_s}) was checked against the {has}'s "
                "tokenizer; its token ids, special tokens and EOS are assumed to match"]
    return []


__all__ = ["check_bounds", "check_inputs", "model_config", "positions_needed"]
