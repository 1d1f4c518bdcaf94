"""The locator table: every entry's shape of use, the oracle's rule, coupled and rollout windows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.data import synthetic as S
from topd_jax.losses.locators import LOCATORS, Locator, get_locator
from topd_jax.losses.topd import TopdConfig, TopdInputs, topd_weights
from topd_jax.trainer import placement
from topd_jax.trainer.config import ModelSpec, RandomModelConfig, RolloutConfig
from topd_jax.trainer.loop import build_model
from topd_jax.trainer.step import candidates, locate, rollout_windows, sample, score_teacher


def test_every_entry_is_consistent_and_a_bad_one_is_refused():
    for locator in LOCATORS.values():
        assert locator.branches == (locator.student_window is not None) == (locator.window_scores is not None)
        assert TopdConfig(locator=locator.name).locator == locator.name
    with pytest.raises(ValueError, match="branching locator needs student_window"):
        Locator("x", branches=True, window_scores=None, loss_scores=LOCATORS["ot"].loss_scores, metric_prefix="x")
    with pytest.raises(ValueError, match="embedding must be"):
        dataclasses.replace(LOCATORS["ot"], embedding="both")
    with pytest.raises(ValueError, match="unknown locator 'nope'; known: ot, "):
        get_locator("nope")


def _inputs(labels, ot=None):
    b, m = labels.shape
    t = 6
    d = jnp.asarray(np.linspace(3, 1, b * t).reshape(b, t), jnp.float32)
    return TopdInputs(student_logprobs=jnp.zeros((b, t)), behaviour_logprobs=d, teacher_logprobs=jnp.zeros((b, t)),
                      mask=jnp.ones((b, t), bool), positions=jnp.tile(jnp.arange(m), (b, 1)),
                      valid=jnp.ones((b, m), bool), candidate_labels=jnp.asarray(labels),
                      ot=ot, reference_ot=None if ot is None else jnp.full((b, 2), 0.5))


@pytest.mark.parametrize("mode", ["reference", "quantile"])
def test_the_oracle_suppresses_exactly_the_surface_forms_whatever_the_threshold_mode(mode):
    labels = np.array([[1, 0, -1], [0, 0, 1]], np.int32)
    config = TopdConfig(locator="oracle", threshold_mode=mode, threshold_quantile=0.9)
    selection = topd_weights(_inputs(labels), config)
    assert np.array_equal(np.asarray(selection.divergent), labels != 0)
    assert float(selection.tau) == 0.5
    assert np.array_equal(np.asarray(selection.suppressed)[:, :3], labels == 0)


def test_the_oracle_without_labels_is_a_one_line_error():
    inputs = dataclasses.replace(_inputs(np.zeros((1, 2), np.int32)), candidate_labels=None)
    with pytest.raises(ValueError, match="candidate_labels is required for locator='oracle'"):
        topd_weights(inputs, TopdConfig(locator="oracle"))


def test_rollout_windows_are_the_rollouts_own_continuation():
    tokens = jnp.asarray([[5, 6, 7, 1, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0]], bool)
    rollout = dataclasses.make_dataclass("R", ["tokens", "mask", "logprobs"])(tokens, mask, -jnp.ones((1, 5)))
    windows = rollout_windows(rollout, jnp.asarray([[1, 3]]), 3)
    assert windows.tokens.tolist() == [[[6, 7, 1], [1, 0, 0]]]
    assert windows.mask.tolist() == [[[True, True, True], [True, False, False]]]


TINY = RandomModelConfig(vocab_size=len(S.VOCAB), hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=8, init_seed=3)
OPTIONS = RolloutConfig(max_new_tokens=12, eos_ids=(S.EOS_ID,))


@pytest.fixture(scope="module")
def model_and_rollout():
    model, _ = build_model(ModelSpec(random=TINY), placement.data_mesh(jax.devices()[:1]))
    tok = S.SyntheticTokenizer()
    from topd_jax.prompts import left_pad
    problems = S.problems(0, 0, 4)
    prompts, mask = left_pad([tok.encode(p.prompt()) for p in problems], S.PROMPT_LENGTH)
    rollout = sample(model, jnp.asarray(prompts), jnp.asarray(mask), jax.random.PRNGKey(0), OPTIONS)
    scores = score_teacher(model, rollout, chunk_size=64, return_cache=True)
    return model, problems, rollout, scores


def test_coupled_windows_of_one_model_are_identical_and_independent_ones_are_not(model_and_rollout):
    model, _, rollout, scores = model_and_rollout
    ot = {}
    for name in ("ot", "ot_coupled"):
        loss = TopdConfig(locator=name, window=6, max_candidates=3, candidate_quantile=0.5)
        located = locate(model, model, rollout, scores, jax.random.PRNGKey(5), loss, OPTIONS)
        ot[name] = np.asarray(located.ot)[np.asarray(located.valid)]
    assert ot["ot_coupled"].size and np.allclose(ot["ot_coupled"], 0.0, atol=1e-4)
    assert ot["ot"].max() > 0.05  # independent noise: two samples of one state differ


def test_rollout_and_teacher_embedding_locators_branch_the_teacher_only_where_asked(model_and_rollout):
    model, _, rollout, scores = model_and_rollout
    for name in ("ot_rollout", "ot_teacher_embedding"):
        loss = TopdConfig(locator=name, window=4, max_candidates=2)
        located = locate(model, model, rollout, scores, jax.random.PRNGKey(5), loss, OPTIONS)
        assert located.ot.shape == (4, 2) and located.reference_ot.shape == (4, 2)
        assert np.all(np.isfinite(np.asarray(located.ot)))


def test_the_oracles_labels_are_the_tasks_fork_labels_at_the_candidates(model_and_rollout):
    _, problems, rollout, scores = model_and_rollout
    loss = TopdConfig.preset("opd_suppress", locator="oracle", max_candidates=3)
    located = jax.jit(lambda r, s: candidates(r, s, jax.random.PRNGKey(1), loss, S.candidate_labels))(rollout, scores)
    tokens, positions = np.asarray(rollout.tokens), np.asarray(located.positions)
    expected = np.stack([S.fork_labels(p, row)[pos] for p, row, pos in zip(problems, tokens, positions)])
    assert np.array_equal(np.asarray(located.labels), expected)
    # The labels come from the prompt source's labeller; without one the oracle cannot run.
    with pytest.raises(ValueError, match="reads fork labels, but no labeller was given"):
        candidates(rollout, scores, jax.random.PRNGKey(1), loss)
