"""One training step as pure functions, one per arrow of the data flow (TOPD.md sections 1-5).

    rollout  = sample(student, prompts, prompt_mask, key, ...)        # y ~ pi_s(.|x), b_t
    scores   = score_teacher(teacher, rollout, ...)                    # q_t, agreement, cache
    located  = locate(student, teacher, rollout, scores, key, loss)   # C, references, windows, D
    batch    = experience(rollout, scores, located)                    # arrays only, [B, ...]
    state, m = update(state, batch, graphdef=..., optimizer=..., loss=...)  # packed forward,
                                                                        # topd_loss, optax

`sample`, `score_teacher` and `locate` never differentiate; only `update` does, and only with
respect to the student's parameters: the teacher appears in no argument of `update`, so it has
no gradient and no optimizer state. `sft_update` is the supervised (cross-entropy) step on given
sequences. Each function is jittable or calls jitted library functions; the trainer (`loop.py`)
times them one by one, places them on the mesh and composes them.

Shapes: B rollouts (prompts x samples), P prompt tokens, N completion tokens, M candidates,
R reference positions, K window tokens, k the teacher's top-k (topk_fkl guidance).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from topd_jax.losses.candidates import reference_positions, select_candidates
from topd_jax.losses.ot import ot_distance
from topd_jax.losses.topd import TopdConfig, TopdInputs, topd_loss
from topd_jax.models.decoder import CausalLM
from topd_jax.sampling import Rollout, Windows, branch, generate, window_embeddings
from topd_jax.scoring import Scores, packed_logprobs, score, score_rollout

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What an update changes, and all a checkpoint needs to continue exactly.

    step [] int32 (updates done); params: the student's nnx.Param state; opt_state: optax state
    of params only; key [2] uint32: the run's base PRNG key (step s draws from fold_in(key, s)).
    """

    step: Array
    params: Any
    opt_state: Any
    key: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Located:
    """Candidates C, reference positions and, when the config branches, windows and OT distances.

    positions/valid [B, M]; reference_positions/reference_valid [B, R] or None; ot [B, M] and
    reference_ot [B, R] (locator 'ot'); teacher_windows [B, M, K] (guidance; with top-k for
    topk_fkl) or None.
    """

    positions: Array
    valid: Array
    reference_positions: Array | None = None
    reference_valid: Array | None = None
    ot: Array | None = None
    reference_ot: Array | None = None
    teacher_windows: Windows | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Experience:
    """Everything `update` reads: arrays with a leading B axis (the mesh splits them along it).

    prompt_tokens/prompt_mask [B, P]; tokens/mask [B, N]; behaviour_logprobs b_t and
    teacher_logprobs q_t [B, N]; teacher_agrees [B, N]; finished [B]; and from `Located`:
    positions/valid [B, M], ot [B, M], reference_* [B, R], window_tokens/window_mask [B, M, K],
    window_teacher_topk_logprobs/window_topk_ids [B, M, K, k]. Unused fields are None.
    """

    prompt_tokens: Array
    prompt_mask: Array
    tokens: Array
    mask: Array
    behaviour_logprobs: Array
    teacher_logprobs: Array
    teacher_agrees: Array
    finished: Array
    positions: Array | None = None
    valid: Array | None = None
    ot: Array | None = None
    reference_ot: Array | None = None
    reference_valid: Array | None = None
    reference_positions: Array | None = None
    window_tokens: Array | None = None
    window_mask: Array | None = None
    window_teacher_topk_logprobs: Array | None = None
    window_topk_ids: Array | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding options shared by rollouts and windows (see `sampling` for their meaning)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: tuple[int, ...] = ()
    num_samples: int = 1


def sample(student: CausalLM, prompt_tokens: Array, prompt_mask: Array, key: Array, options: Sampling) -> Rollout:
    """y ~ pi_s(. | x): num_samples completions per left-padded prompt [b, P] -> Rollout [B, ...]."""
    return generate(student, prompt_tokens, prompt_mask, key=key, max_new_tokens=options.max_new_tokens,
                    temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                    eos_ids=options.eos_ids, num_samples=options.num_samples)


def score_teacher(teacher: CausalLM, rollout: Rollout, *, chunk_size: int, return_cache: bool) -> Scores:
    """q_t = log pi_T(y_t | x, y_<t) [B, N], the teacher's argmax (top-1) for the agreement
    diagnostic, and its KV cache of prompt + completion when the teacher must branch."""
    return score_rollout(teacher, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                         chunk_size=chunk_size, top_k=1, return_cache=return_cache)


def locate(student: CausalLM, teacher: CausalLM, rollout: Rollout, scores: Scores, key: Array, loss: TopdConfig,
           options: Sampling) -> Located | None:
    """Candidates, reference positions, both models' windows and their OT distances.

        d_t = b_t - q_t;   C = select_candidates(d)                         [B, M]
        references: R uniform valid positions per rollout                   [B, R]
        windows: student and teacher each decode K tokens from (x, y_<t) at C (and the references)
        D = ot_distance(E_s[student window], E_s[teacher window])          [B, M + R]

    E_s is the student's input embedding table (TOPD.md section 4). Only what the config uses is
    computed: nothing for `opd`; no branches for the window_kl locator without guidance; the
    teacher's windows at C (with its top-k per step for topk_fkl) whenever guidance is on.
    Returns None when the loss needs no candidates.
    """
    if not loss.uses_candidates:
        return None
    k_ref, k_student, k_teacher = jax.random.split(key, 3)
    divergence = rollout.logprobs - scores.logprobs
    positions, valid = select_candidates(divergence, rollout.mask, quantile=loss.candidate_quantile,
                                         max_candidates=loss.max_candidates)
    ref_positions = ref_valid = None
    if loss.num_reference > 0 and (loss.threshold_mode == "reference" or loss.locator == "ot"):
        ref_positions, ref_valid = reference_positions(k_ref, rollout.mask, loss.num_reference)
    if not loss.uses_windows:
        return Located(positions, valid, ref_positions, ref_valid)

    m = positions.shape[1]
    ot_branches = loss.locator == "ot"
    points = positions
    if ot_branches and ref_positions is not None:
        points = jnp.concatenate([positions, ref_positions], axis=1)
    window_options = dict(window=loss.window, top_p=options.top_p, top_k=options.top_k, eos_ids=options.eos_ids,
                          temperature=options.temperature if loss.window_temperature is None else loss.window_temperature)
    guided = loss.traj_weight != 0.0
    teacher_points = points if ot_branches else positions
    teacher_windows = branch(teacher, scores.cache, teacher_points, key=k_teacher, prompt_len=rollout.prompt_tokens.shape[1],
                             tokens=jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1),
                             top_k_logprobs=loss.traj_top_k if guided and loss.traj_loss == "topk_fkl" else 0,
                             **window_options)
    ot = reference_ot = None
    if ot_branches:
        student_windows = branch(student, rollout, points, key=k_student, **window_options)
        distance = ot_distance(window_embeddings(student, student_windows.tokens),
                               window_embeddings(student, teacher_windows.tokens),
                               student_windows.mask, teacher_windows.mask,
                               epsilon=loss.ot_epsilon, num_iters=loss.ot_num_iters)
        ot, reference_ot = distance[:, :m], (distance[:, m:] if ref_positions is not None else None)
    at_candidates = jax.tree.map(lambda x: x[:, :m], teacher_windows) if guided else None
    return Located(positions, valid, ref_positions, ref_valid, ot, reference_ot, at_candidates)


def experience(rollout: Rollout, scores: Scores, located: Located | None) -> Experience:
    """The arrays `update` needs, gathered from the three no-gradient phases."""
    agrees = (scores.topk_ids[..., 0] == rollout.tokens) & rollout.mask
    fields = dict(prompt_tokens=rollout.prompt_tokens, prompt_mask=rollout.prompt_mask, tokens=rollout.tokens,
                  mask=rollout.mask, behaviour_logprobs=rollout.logprobs, teacher_logprobs=scores.logprobs,
                  teacher_agrees=agrees, finished=rollout.finished)
    if located is not None:
        fields.update(positions=located.positions, valid=located.valid, ot=located.ot,
                      reference_ot=located.reference_ot, reference_valid=located.reference_valid,
                      reference_positions=located.reference_positions)
        windows = located.teacher_windows
        if windows is not None:
            fields.update(window_tokens=windows.tokens, window_mask=windows.mask,
                          window_teacher_topk_logprobs=windows.topk_logprobs, window_topk_ids=windows.topk_ids)
    return Experience(**fields)


def topd_objective(params: Any, graphdef: nnx.GraphDef, batch: Experience, loss: TopdConfig, *,
                   chunk_size: int) -> tuple[Array, dict[str, Array]]:
    """topd_loss of the student with `params` on `batch`: (L, metrics), differentiable in params.

    s_t (and the window log-probs log pi_s(v_k | x, y_<t, v_<k) when guidance is on) come from one
    packed forward of each rollout with its teacher windows (`packed_logprobs`); without guidance
    the rollout alone is scored.
    """
    student = nnx.merge(graphdef, params)
    window_logprobs = student_topk = None
    if batch.window_tokens is not None:
        out = packed_logprobs(student, batch.prompt_tokens, batch.prompt_mask, batch.tokens, batch.mask,
                              batch.positions, batch.window_tokens, batch.window_mask, chunk_size=chunk_size,
                              topk_ids=batch.window_topk_ids)
        student_logprobs, window_logprobs = out[0], out[1]
        if batch.window_topk_ids is not None:
            student_topk = out[2]
    else:
        student_logprobs = score_rollout(student, batch.prompt_tokens, batch.prompt_mask, batch.tokens, batch.mask,
                                         chunk_size=chunk_size).logprobs
    inputs = TopdInputs(
        student_logprobs=student_logprobs, behaviour_logprobs=batch.behaviour_logprobs,
        teacher_logprobs=batch.teacher_logprobs, mask=batch.mask, positions=batch.positions, valid=batch.valid,
        ot=batch.ot, reference_ot=batch.reference_ot, reference_valid=batch.reference_valid,
        reference_positions=batch.reference_positions, window_logprobs=window_logprobs,
        window_mask=batch.window_mask, window_student_topk_logprobs=student_topk,
        window_teacher_topk_logprobs=batch.window_teacher_topk_logprobs, teacher_agrees=batch.teacher_agrees,
        finished=batch.finished)
    return topd_loss(inputs, loss)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation,
                    loss: Array) -> tuple[TrainState, dict[str, Array]]:
    """One optax update, skipped when the loss or any gradient is not finite.

    A skipped step leaves params and optimizer state bit-for-bit untouched (step still counts),
    so one bad batch cannot poison Adam's moments. Metrics: grad_norm, skipped (1.0 or 0.0).
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                           opt_state=jax.tree.map(keep, opt_state, state.opt_state), key=state.key)
    return new_state, {"grad_norm": grad_norm, "skipped": (~finite).astype(jnp.float32)}


def update(state: TrainState, batch: Experience, *, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
           loss: TopdConfig, chunk_size: int) -> tuple[TrainState, dict[str, Array]]:
    """grad of `topd_objective` in the student's params, then `apply_gradients`. Jit it with the
    state's shardings in and out and the state donated (the trainer does)."""
    (value, metrics), grads = jax.value_and_grad(topd_objective, has_aux=True)(
        state.params, graphdef, batch, loss, chunk_size=chunk_size)
    state, extra = apply_gradients(state, grads, optimizer, value)
    return state, {**metrics, **extra}


def cross_entropy(params: Any, graphdef: nnx.GraphDef, tokens: Array, mask: Array, loss_mask: Array, *,
                  chunk_size: int) -> tuple[Array, dict[str, Array]]:
    """Next-token cross-entropy on given sequences (supervised fine-tuning):

        L = - sum_l w_l log p(tokens_l | tokens_<l) / sum_l w_l,   w_l = loss_mask_l * mask_l * mask_{l-1}

    tokens, mask, loss_mask [B, L] (loss_mask selects the targets, e.g. the answer after a prompt;
    padding anywhere is allowed). Log-probs in row chunks (`scoring.score`).
    """
    model = nnx.merge(graphdef, params)
    logprobs = score(model, tokens, mask, chunk_size=chunk_size).logprobs
    predicted = jnp.pad(mask[:, :-1] & mask[:, 1:], [(0, 0), (1, 0)])
    weights = (loss_mask > 0) & predicted
    count = jnp.sum(weights)
    value = -jnp.sum(jnp.where(weights, logprobs, 0.0)) / jnp.maximum(count, 1)
    return value, {"loss": value, "num_tokens": count.astype(jnp.float32)}


def sft_update(state: TrainState, tokens: Array, mask: Array, loss_mask: Array, *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, chunk_size: int = 512) -> tuple[TrainState, dict[str, Array]]:
    """One supervised step: grad of `cross_entropy`, then `apply_gradients` (non-finite: skipped)."""
    (value, metrics), grads = jax.value_and_grad(cross_entropy, has_aux=True)(
        state.params, graphdef, tokens.astype(jnp.int32), mask.astype(bool), loss_mask, chunk_size=chunk_size)
    state, extra = apply_gradients(state, grads, optimizer, value)
    return state, {**metrics, **extra}


def init_state(params: Any, optimizer: optax.GradientTransformation, key: Array) -> TrainState:
    """Step 0: the given student params, a fresh optimizer state of those params only."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      key=jnp.asarray(key, jnp.uint32))


__all__ = ["Experience", "Located", "Sampling", "TrainState", "apply_gradients", "cross_entropy", "experience",
           "init_state", "locate", "sample", "score_teacher", "sft_update", "topd_objective", "update"]
