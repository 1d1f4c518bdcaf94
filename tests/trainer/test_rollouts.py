"""rollout.mode continuous: carried rollouts keep their tokens, log-probs and versions; stale ones
are dropped; the pool is dropped at checkpoints so that a resumed run continues exactly."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from topd_jax.scoring import score_rollout
from topd_jax.trainer.config import ConfigError, load_config
from topd_jax.trainer.flops import PhaseTimer
from topd_jax.trainer.loop import Trainer
from topd_jax.trainer.rollouts import RolloutPool

# 12 of 128 ids end a row: rollouts of 1 to 12 tokens, so slots free up at different steps.
EOS = "rollout.eos_ids=[1,2,3,4,5,6,7,8,9,10,11,12]"
RUN = ["steps=4", "checkpoint.every=2", "rollout.prompts_per_step=4", "rollout.num_samples=2",
       "rollout.max_new_tokens=12", "data.prompt_length=5", "logging.progress=false", "preset=opd",
       "rollout.mode=continuous", EOS]


def config(output_dir, *extra):
    return load_config("configs/tiny_cpu.yaml", [f"output_dir={output_dir}", *RUN, *extra])


def metrics_of(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.startswith(("time_", "tokens_per_s", "mfu"))} for row in rows]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    t = Trainer(config(tmp_path_factory.mktemp("pool"), "checkpoint.every=100"))
    yield t
    t.close()


def student_at(trainer):
    return nnx.merge(trainer.graphdef, trainer.inference_params())


def test_carried_rollouts_keep_tokens_logprobs_and_versions(trainer):
    """A row still decoding at the end of step 0 is finished at step 1 on the updated student: its
    tokens and behaviour log-probs of step 0 are kept with version 0, the rest has version 1, and
    the loss's ratio exp(s - b) against the current student differs from 1 on its old tokens."""
    pool = RolloutPool(trainer.rollout_config, next_prompts=trainer._next_prompts, key=jax.random.PRNGKey(3))
    mesh = trainer.inference_mesh
    with jax.set_mesh(mesh):
        first, stats = pool.collect(student_at(trainer), version=0, mesh=mesh)
        decoding = np.flatnonzero(pool.holds[:, 0] >= 0)
        assert stats["rollouts_carried"] > 0 and len(decoding), stats
        state = jax.device_get(pool.state)
        before = {tuple(pool.holds[s]): (state.tokens[s][:state.length[s]], state.logprobs[s][:state.length[s]])
                  for s in decoding}
    trainer.train_step(PhaseTimer())  # the trainer's own update: the student moves to version 1
    assert trainer.step == 1
    with jax.set_mesh(mesh):
        student = student_at(trainer)
        second, stats = pool.collect(student, version=1, mesh=mesh)
    assert 0 < stats["off_policy_share"] < 1 and stats["version_lag"] > 0
    versions = pool.last_versions
    s = score_rollout(student, second.prompt_tokens, second.prompt_mask, second.tokens, second.mask).logprobs
    ratio = np.exp(np.asarray(s) - np.asarray(second.logprobs))
    mask = np.asarray(second.mask)
    # Rows that were decoding when step 0 ended: tokens of both versions (a row that had ended and
    # waited for its group keeps version 0 throughout).
    carried = [i for i in range(len(mask)) if {0, 1} <= set(versions[i][mask[i]].tolist())]
    assert carried
    for i in carried:
        old = (versions[i] == 0) & mask[i]
        n = int(old.sum())
        match = [k for k, (tokens, logprobs) in before.items() if len(tokens) == n
                 and np.array_equal(tokens, np.asarray(second.tokens[i][:n]))]
        assert match, "a carried row's step-0 tokens are kept"
        np.testing.assert_array_equal(np.asarray(second.logprobs[i][:n]), before[match[0]][1])
        assert np.all(versions[i][n:][mask[i][n:]] == 1)
        assert np.abs(ratio[i][old] - 1).max() > 1e-4  # the updated student disagrees with b
    fresh = [i for i in range(len(mask)) if (versions[i][mask[i]] == 1).all()]
    for i in fresh:  # drawn and scored by the same student: ratio 1
        np.testing.assert_allclose(ratio[i][mask[i]], 1.0, atol=1e-4)


def test_stale_groups_are_dropped(trainer):
    """max_staleness 0: what a step leaves decoding is dropped at the next, never trained on."""
    import dataclasses
    pool = RolloutPool(dataclasses.replace(trainer.rollout_config, max_staleness=0),
                       next_prompts=trainer._next_prompts, key=jax.random.PRNGKey(4))
    mesh = trainer.inference_mesh
    with jax.set_mesh(mesh):
        student = student_at(trainer)
        _, stats = pool.collect(student, version=0, mesh=mesh)
        assert stats["rollouts_carried"] > 0
        rollout, stats = pool.collect(student, version=1, mesh=mesh)
    assert stats["rollouts_dropped"] > 0
    assert stats["off_policy_share"] == 0.0
    assert np.all(pool.last_versions[np.asarray(rollout.mask)] == 1)


def test_drop_says_what_it_dropped(trainer):
    pool = RolloutPool(trainer.rollout_config, next_prompts=trainer._next_prompts, key=jax.random.PRNGKey(5))
    assert pool.drop(0) is None  # nothing to drop
    with jax.set_mesh(trainer.inference_mesh):
        pool.collect(student_at(trainer), version=0, mesh=trainer.inference_mesh)
    line = pool.drop(2)
    assert line.startswith("checkpoint at step 2: dropped the rollout pool (") and "\n" not in line
    assert (pool.holds < 0).all() and not pool.groups and not pool.queue


def test_continuous_run_resumes_exactly(tmp_path):
    """4 steps straight == 2 steps, a new trainer resuming from the step-2 checkpoint, 2 more: the
    pool dropped at the checkpoint in both (what a kill -9 after that checkpoint resumes from)."""
    straight = tmp_path / "straight"
    t = Trainer(config(straight))
    t.run()
    t.close()
    events = (straight / "events.log").read_text()
    assert "dropped the rollout pool" in events
    rows = metrics_of(straight)
    pool_metrics = {"slot_utilisation", "rollouts_carried", "off_policy_share", "version_lag", "rollouts_dropped"}
    assert pool_metrics <= set(rows[0])
    assert any(r["rollouts_carried"] > 0 for r in rows)
    parts = tmp_path / "parts"
    t = Trainer(config(parts))
    t.run(until=2)
    t.close()
    t = Trainer(config(parts))
    t.run()
    t.close()
    assert metrics_of(parts) == rows
    assert '"tokens_per_s_finished"' in (straight / "metrics.jsonl").read_text()


def test_bad_pool_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.slots must be 0 or >= num_samples \(2\), got 1"):
        config(tmp_path, "rollout.slots=1")
    with pytest.raises(ConfigError, match="rollout.mode"):
        config(tmp_path, "rollout.mode=lockstep")
