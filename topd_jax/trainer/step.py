"""One training step as pure functions, one per arrow of the data flow (TOPD.md sections 1-5).

    rollout  = sample(student, prompts, prompt_mask, key, rollout_config)  # y ~ pi_s(.|x), b_t
    scores   = score_teacher(teacher, rollout, ...)                       # q_t, top-1, cache
    located  = locate(student, teacher, rollout, scores, key, loss, rollout_config)
                                                                          # C, references, windows, D
    batch    = experience(rollout, scores, located)                       # the three, caches dropped
    state, m = update(state, batch, graphdef=..., optimizer=..., loss=...)  # packed forward,
                                                                          # topd_loss, optax

Each arrow's structure travels to the next as it is: `Experience` nests the Rollout, Scores and
Located the phases made (a field keeps its name from where it is made to where it is used), and
`loss_inputs` is the one place that lays them out flat as the loss's public `TopdInputs`.
`sample`, `score_teacher` and `locate` never differentiate; only `update` does, and only with
respect to the student's parameters: the teacher appears in no argument of `update`, so it has
no gradient and no optimizer state. `sft_update` is the supervised (cross-entropy) step on given
sequences. The trainer (`loop.py`) jits the phases (`phases.py`), places them on the mesh and
composes them.

Shapes: B rollouts (prompts x samples), P prompt tokens, N completion tokens, M candidates,
R reference positions, K window tokens, k the teacher's top-k (topk_fkl guidance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from topd_jax.losses.candidates import reference_positions, select_candidates
from topd_jax.losses.locators import LOCATORS
from topd_jax.losses.topd import TopdConfig, TopdInputs, topd_loss, topd_weights
from topd_jax.models.decoder import CausalLM
from topd_jax.sampling import (Rollout, SamplingOptions, Windows, branch, continuation, generate, splice_rollout,
                               window_embeddings)
from topd_jax.scoring import Scores, packed_logprobs, score, score_rollout
from topd_jax.trainer.config import RolloutConfig

Array = jax.Array
# A prompt source's fork labeller: prompt ids [B, P], completion ids [B, N], positions [B, M] ->
# labels int32 [B, M] (1 fork, 0 surface form, -1 undecidable); numpy in, numpy out.
Labeller = Callable[[Any, Any, Any], Any]


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
    """Candidates C, reference positions and, when the config branches, windows and D.

    positions/valid [B, M]; reference_positions/reference_valid [B, R] or None; ot [B, M] and
    reference_ot [B, R]: D of a branching locator (`LOCATORS[...].window_scores`), or None;
    teacher_windows: the teacher's Windows [B, M, K] at C (guidance; with top-k for topk_fkl) or
    None; labels [B, M] int32: the task's fork labels at C for a locator that reads them (the
    oracle), or None. From `splice` (guidance relay): positions/valid [B, S] are the segments'
    starts, teacher_windows their tokens (with top-k for relay loss fkl) and teacher_written
    [B, N] bool the rollout tokens the teacher's segments wrote.
    """

    positions: Array
    valid: Array
    reference_positions: Array | None = None
    reference_valid: Array | None = None
    ot: Array | None = None
    reference_ot: Array | None = None
    teacher_windows: Windows | None = None
    labels: Array | None = None
    teacher_written: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Experience:
    """Everything `update` reads: the three no-gradient phases' structures, nested as they were
    made, without their KV caches (the largest buffers of a step). Every leaf has a leading B
    axis, so the mesh splits them along it.

    rollout: Rollout [B, ...] (cache None); scores: the teacher's Scores [B, N] with its top-1
    (cache None); located: Located, or None when the loss needs no candidates.
    """

    rollout: Rollout
    scores: Scores
    located: Located | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StudentLogprobs:
    """The student's training forward: rollout [B, N] (s_t); windows [B, M, K]
    (log pi_s(v_k | x, y_<t, v_<k) of the teacher's window tokens) and window_topk [B, M, K, k]
    (its log-probs at the teacher's top-k ids, topk_fkl), None when not computed."""

    rollout: Array
    windows: Array | None = None
    window_topk: Array | None = None


def sampling_options(rollout: RolloutConfig, *, window: bool = False) -> SamplingOptions:
    """The one place a RolloutConfig becomes `SamplingOptions`: the rollout's temperature, top_p,
    top_k and eos_ids; for look-ahead windows (window=True) the temperature is
    rollout.window_temperature unless that is None."""
    temperature = rollout.temperature
    if window and rollout.window_temperature is not None:
        temperature = rollout.window_temperature
    return SamplingOptions(temperature=temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                           eos_ids=rollout.eos_ids)


def sample(student: CausalLM, prompt_tokens: Array, prompt_mask: Array, key: Array,
           options: RolloutConfig) -> Rollout:
    """y ~ pi_s(. | x): num_samples completions per left-padded prompt [b, P] -> Rollout [B, ...]."""
    return generate(student, prompt_tokens, prompt_mask, key=key, max_new_tokens=options.max_new_tokens,
                    num_samples=options.num_samples, options=sampling_options(options))


def score_teacher(teacher: CausalLM, rollout: Rollout, *, chunk_size: int, return_cache: bool) -> Scores:
    """q_t = log pi_T(y_t | x, y_<t) [B, N], the teacher's argmax (top-1) for the agreement
    diagnostic, and its KV cache of prompt + completion when the teacher must branch."""
    return score_rollout(teacher, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                         chunk_size=chunk_size, top_k=1, return_cache=return_cache)


def candidates(rollout: Rollout, scores: Scores, key: Array, loss: TopdConfig,
               labeller: Labeller | None = None) -> Located:
    """C and the reference positions, before any branching.

        d_t = b_t - q_t;   C = select_candidates(d)                         [B, M]
        references: R uniform valid positions per rollout                   [B, R]

    References are drawn when the threshold needs them (reference mode) or the locator branches
    (their D is reported as a diagnostic in every mode). A locator that reads fork labels (the
    oracle) gets them here from `labeller(prompt_tokens [B, P], tokens [B, N], positions [B, M])
    -> int32 [B, M]`, the prompt source's labeller, run on the host (`pure_callback`).
    """
    divergence = rollout.logprobs - scores.logprobs
    positions, valid = select_candidates(divergence, rollout.mask, quantile=loss.candidate_quantile,
                                         max_candidates=loss.max_candidates)
    ref_positions = ref_valid = None
    if loss.num_reference > 0 and (loss.threshold_mode == "reference" or LOCATORS[loss.locator].branches):
        ref_positions, ref_valid = reference_positions(key, rollout.mask, loss.num_reference)
    labels = None
    if LOCATORS[loss.locator].labels:
        if labeller is None:
            raise ValueError(f"loss.locator {loss.locator!r} reads fork labels, but no labeller was given "
                             "(only a prompt source with labels, e.g. data.source synthetic, has one)")
        # The host reads whole arrays: replicate the operands on purpose (one all-gather each)
        # rather than leave the partitioner to gather them to device 0 behind our back.
        operands = replicated((rollout.prompt_tokens, rollout.tokens, positions))
        labels = jax.pure_callback(labeller, jax.ShapeDtypeStruct(positions.shape, jnp.int32), *operands)
    return Located(positions, valid, ref_positions, ref_valid, labels=labels)


def replicated(tree: Any) -> Any:
    """`tree` constrained to be whole on every device of the current mesh (as is without one)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.sharding.PartitionSpec())


def rollout_windows(rollout: Rollout, points: Array, window: int) -> Windows:
    """The rollout's own continuation y_t..y_{t+K-1} at each point t [B, P] -> Windows [B, P, K]
    (tokens 0 and mask 0 past the completion's end; log-probs the rollout's b_t)."""
    n = rollout.tokens.shape[1]
    index = points[..., None].astype(jnp.int32) + jnp.arange(window)  # [B, P, K]
    inside = index < n
    index = jnp.clip(index, 0, n - 1)

    def take(x):
        return jax.vmap(lambda row, ids: row[ids])(x, index)

    mask = inside & take(rollout.mask)
    return Windows(jnp.where(mask, take(rollout.tokens), 0), mask, jnp.where(mask, take(rollout.logprobs), 0.0))


def branch_windows(student: CausalLM, teacher: CausalLM, rollout: Rollout, scores: Scores, located: Located,
                   keys: tuple[Array, Array], loss: TopdConfig, options: RolloutConfig) -> Located:
    """Both models' K-token windows from (x, y_<t) and the locator's D, added to `located`.

        branching locator: the teacher decodes at C and the references (P = M + R points), the
                           student's windows there are (locator.student_window)
                             branch   its own K-token decode with its own key (the paper's)
                             coupled  its own decode with the teacher's key: the same per-step
                                      Gumbel noise, so equal distributions give equal windows
                             rollout  its rollout's continuation y_t..y_{t+K-1} (no decode);
                           D = locator.window_scores(E[student window], E[teacher window]),
                           E the student's or the teacher's table (locator.embedding)
        guidance:          the teacher's windows at C (with its top-k per step for topk_fkl):
                           the locator's sampled windows, or (window_tokens greedy) a second,
                           argmax decode from the same cache

    E_s, the student's input embedding table, is the paper's (TOPD.md section 4). The teacher
    branches from its scoring cache, the student from its rollout cache; neither prefix is
    recomputed.
    """
    locator = LOCATORS[loss.locator]
    k_student, k_teacher = keys
    if locator.student_window == "coupled":
        k_teacher = k_student
    m = located.positions.shape[1]
    points = located.positions
    if locator.branches and located.reference_positions is not None:
        points = jnp.concatenate([located.positions, located.reference_positions], axis=1)
    window_options = sampling_options(options, window=True)
    guided = loss.guides_windows
    greedy = loss.greedy_windows
    teacher_points = points if locator.branches else located.positions
    teacher_branch = functools.partial(branch, teacher, scores.cache, key=k_teacher, window=loss.window,
                                       prompt_len=rollout.prompt_tokens.shape[1],
                                       tokens=jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1))
    top_k = loss.guidance_top_k
    teacher_windows = None
    if locator.branches or not greedy:
        teacher_windows = teacher_branch(teacher_points, top_k_logprobs=0 if greedy else top_k, options=window_options)
    ot = reference_ot = None
    if locator.branches:
        if locator.student_window == "rollout":
            student_windows = rollout_windows(rollout, points, loss.window)
        else:
            student_windows = branch(student, rollout, points, key=k_student, window=loss.window,
                                     options=window_options)
        table = student if locator.embedding == "student" else teacher
        distance = locator.window_scores(window_embeddings(table, student_windows.tokens),
                                         window_embeddings(table, teacher_windows.tokens),
                                         student_windows.mask, teacher_windows.mask, loss)
        ot, reference_ot = distance[:, :m], (distance[:, m:] if located.reference_positions is not None else None)
    guidance = None
    if greedy:  # the teacher's argmax continuation at C, apart from the locator's sampled windows
        guidance = teacher_branch(located.positions, top_k_logprobs=top_k,
                                  options=dataclasses.replace(window_options, temperature=0.0))
    elif guided:
        guidance = jax.tree.map(lambda x: x[:, :m], teacher_windows)
    return dataclasses.replace(located, ot=ot, reference_ot=reference_ot, teacher_windows=guidance)


def locate(student: CausalLM, teacher: CausalLM, rollout: Rollout, scores: Scores, key: Array, loss: TopdConfig,
           options: RolloutConfig, labeller: Labeller | None = None) -> Located | None:
    """`candidates`, then `branch_windows` when the config branches (a branching locator, or
    guidance). Only what the config uses is computed: nothing for `opd` (returns None); no
    branches for a non-branching locator without guidance."""
    if not loss.uses_candidates:
        return None
    k_ref, k_student, k_teacher = jax.random.split(key, 3)
    located = candidates(rollout, scores, k_ref, loss, labeller)
    if not loss.uses_windows:
        return located
    return branch_windows(student, teacher, rollout, scores, located, (k_student, k_teacher), loss, options)


def first_at_or_after(hits: Array, positions: Array, start: Array) -> Array:
    """The earliest position p >= start[b] with hits, per row: hits [B, X] bool at positions [B, X]
    int -> [B] int32, -1 where there is none."""
    ok = hits & (positions >= start[:, None])
    return jnp.where(jnp.any(ok, axis=1), jnp.min(jnp.where(ok, positions, jnp.iinfo(jnp.int32).max), axis=1),
                     -1).astype(jnp.int32)


def relay_triggers(student: CausalLM, teacher: CausalLM, rollout: Rollout, scores: Scores, student_scores: Scores,
                   key: Array, start: Array, loss: TopdConfig, options: RolloutConfig,
                   labeller: Labeller | None = None) -> Array:
    """Where the teacher takes over: the earliest trigger t >= start[b] per row, [B] int32 (-1: none).

        topk:    argmax pi_T(. | x, y_<t) != y_t  and  not in top-k of pi_S(. | x, y_<t)
                 (Relay-OPD's vocabulary-agnostic rule; the teacher's argmax is its score's top-1)
        locator: the locator's divergent states R (`candidates`, `branch_windows`, `topd_weights`
                 with the run's threshold rule), as TOPD would guide them
    """
    if loss.option("trigger") == "topk":
        argmax = scores.topk_ids[..., 0]
        inside = jnp.any(student_scores.topk_ids == argmax[..., None], axis=-1)
        hits = rollout.mask & (argmax != rollout.tokens) & ~inside
        return first_at_or_after(hits, jnp.broadcast_to(jnp.arange(hits.shape[1]), hits.shape), start)
    k_ref, k_student, k_teacher = jax.random.split(key, 3)
    located = candidates(rollout, scores, k_ref, loss, labeller)
    if LOCATORS[loss.locator].branches:  # the student branches from its own prefix cache
        located = branch_windows(student, teacher, dataclasses.replace(rollout, cache=student_scores.cache), scores,
                                 located, (k_student, k_teacher), loss, options)
    batch = experience(rollout, scores, located)
    selection = topd_weights(loss_inputs(batch, StudentLogprobs(rollout.logprobs)), loss)
    return first_at_or_after(selection.valid & selection.divergent, selection.positions, start)


def splice(student: CausalLM, teacher: CausalLM, rollout: Rollout, scores: Scores, key: Array, loss: TopdConfig,
           options: RolloutConfig, *, chunk_size: int, labeller: Labeller | None = None
           ) -> tuple[Rollout, Scores, Located]:
    """Relay (guidance relay, Relay-OPD): teacher segments spliced into the student's rollouts.

    For round i < max_segments (1 with stop), from the rollout y and the teacher's scores q:
        s   = score_rollout(student, y; top-k, cache)     the student's top-k and prefix cache
        t_b = relay_triggers(...)                          earliest trigger after the last segment
        v   = branch(teacher, scoring cache, t; L tokens)  the teacher SAMPLES a segment from y_<t
        u   = continuation(student, its cache, t, v)       v forced, then the student's own draws
        y   = splice_rollout(y, t, u)                      y_<t, v, the student's continuation
        q   = score_teacher(teacher, y)                    the teacher scores the spliced rollout
    stop: the rollout ends at the first trigger instead (mask 0 from t on, no segment).

    The student's log-probs b of the spliced rollout are its own for every token (the teacher's
    segment included, forced through its decode), so OPD's ratio pi_theta / pi_theta_old is 1
    on-policy. Returns (rollout, scores, Located): positions/valid [B, S] the segments' starts,
    teacher_windows the segments [B, S, L] (with the teacher's top-k for loss fkl), teacher_written
    [B, N].
    """
    segment, k = loss.option("segment"), loss.option("top_k")
    fkl_top_k = loss.option("fkl_top_k") if loss.option("loss") == "fkl" else 0
    rounds = 1 if loss.option("stop") else loss.option("max_segments")
    b, n = rollout.tokens.shape
    p = rollout.prompt_tokens.shape[1]
    sampling = sampling_options(options)
    written = jnp.zeros((b, n), bool)
    start = jnp.zeros((b,), jnp.int32)
    starts, windows = [], []
    for i in range(rounds):
        k_trigger, k_segment, k_continue = jax.random.split(jax.random.fold_in(key, i), 3)
        mine = score_rollout(student, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask,
                             chunk_size=chunk_size, top_k=k, return_cache=True)
        t = relay_triggers(student, teacher, rollout, scores, mine, k_trigger, start, loss, options, labeller)
        if loss.option("stop"):
            cut = (t[:, None] >= 0) & (jnp.arange(n)[None, :] >= t[:, None])
            mask = rollout.mask & ~cut
            rollout = dataclasses.replace(rollout, mask=mask, tokens=jnp.where(mask, rollout.tokens, 0),
                                          logprobs=jnp.where(mask, rollout.logprobs, 0.0), cache=None)
            scores = dataclasses.replace(scores, logprobs=jnp.where(mask, scores.logprobs, 0.0), cache=None)
            break
        ids = jnp.concatenate([rollout.prompt_tokens, rollout.tokens], axis=1)
        v = branch(teacher, scores.cache, jnp.maximum(t, 0)[:, None], key=k_segment, window=segment, prompt_len=p,
                   tokens=ids, options=sampling, top_k_logprobs=fkl_top_k)
        length = jnp.where(t >= 0, jnp.sum(v.mask[:, 0], axis=-1), 0)
        u = continuation(student, mine.cache, t, v.tokens[:, 0], length, key=k_continue, options=sampling,
                         prompt_len=p, tokens=ids)
        rollout, new = splice_rollout(rollout, t, u, length, options.eos_ids)
        written = written | new
        valid = (t >= 0) & (length > 0)
        starts.append((jnp.maximum(t, 0), valid))
        windows.append(jax.tree.map(lambda x: jnp.where(valid.reshape((b,) + (1,) * (x.ndim - 1)), x, 0), v))
        start = jnp.where(t >= 0, t + length, start)
        scores = score_teacher(teacher, rollout, chunk_size=chunk_size, return_cache=i + 1 < rounds)
    if not starts:  # stop: no segment, nothing spliced
        zero = jnp.zeros((b, 1), jnp.int32)
        return rollout, scores, Located(zero, jnp.zeros((b, 1), bool), teacher_written=written)
    positions = jnp.stack([s[0] for s in starts], axis=1)
    valid = jnp.stack([s[1] for s in starts], axis=1)
    segments = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *windows) if fkl_top_k else None
    return rollout, dataclasses.replace(scores, cache=None), Located(positions, valid, teacher_windows=segments,
                                                                     teacher_written=written)


def experience(rollout: Rollout, scores: Scores, located: Located | None) -> Experience:
    """The three no-gradient phases' structures for `update`, their KV caches dropped."""
    return Experience(dataclasses.replace(rollout, cache=None), dataclasses.replace(scores, cache=None), located)


def student_forward(student: CausalLM, batch: Experience, *, chunk_size: int) -> StudentLogprobs:
    """s_t, and with guidance the window log-probs, differentiable in the student's params.

    With teacher windows: one packed forward of each rollout with its windows
    (`packed_logprobs`); otherwise the rollout alone (`score_rollout`).
    """
    r = batch.rollout
    windows = None if batch.located is None else batch.located.teacher_windows
    if windows is None:
        return StudentLogprobs(score_rollout(student, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask,
                                             chunk_size=chunk_size).logprobs)
    out = packed_logprobs(student, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask, batch.located.positions,
                          windows.tokens, windows.mask, chunk_size=chunk_size, topk_ids=windows.topk_ids)
    return StudentLogprobs(*out)


def loss_inputs(batch: Experience, student: StudentLogprobs) -> TopdInputs:
    """The one place the nested experience is laid out as the loss's flat `TopdInputs`.

    teacher_agrees = (teacher argmax == y_t) & mask.
    """
    r, located = batch.rollout, batch.located
    agrees = (batch.scores.topk_ids[..., 0] == r.tokens) & r.mask
    fields = {}
    if located is not None:
        fields = dict(positions=located.positions, valid=located.valid, ot=located.ot,
                      reference_ot=located.reference_ot, reference_valid=located.reference_valid,
                      reference_positions=located.reference_positions, candidate_labels=located.labels,
                      teacher_written=located.teacher_written)
        windows = located.teacher_windows
        if windows is not None:
            fields.update(window_logprobs=student.windows, window_mask=windows.mask,
                          window_student_topk_logprobs=student.window_topk,
                          window_teacher_topk_logprobs=windows.topk_logprobs)
    return TopdInputs(student_logprobs=student.rollout, behaviour_logprobs=r.logprobs,
                      teacher_logprobs=batch.scores.logprobs, mask=r.mask, teacher_agrees=agrees,
                      finished=r.finished, **fields)


def student_loss(params: Any, graphdef: nnx.GraphDef, batch: Experience, loss: TopdConfig, *,
                 chunk_size: int) -> tuple[Array, dict[str, Array]]:
    """topd_loss of the student with `params` on `batch`: (L, metrics), differentiable in params."""
    student = nnx.merge(graphdef, params)
    return topd_loss(loss_inputs(batch, student_forward(student, batch, chunk_size=chunk_size)), loss)


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
    """grad of `student_loss` in the student's params, then `apply_gradients`. Jit it with the
    state's shardings in and out and the state donated (the trainer does)."""
    (value, metrics), grads = jax.value_and_grad(student_loss, has_aux=True)(
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


__all__ = ["Experience", "Located", "first_at_or_after", "relay_triggers", "splice", "StudentLogprobs", "TrainState", "apply_gradients", "branch_windows", "candidates",
           "cross_entropy", "experience", "init_state", "locate", "loss_inputs", "rollout_windows", "sample",
           "sampling_options", "score_teacher", "sft_update", "student_forward", "student_loss", "update"]
