"""Checkpointer: bitwise round trips, resharding restores, keep-last-k, async saves, crash safety."""

import glob
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from topd_jax.trainer.checkpointing import Checkpointer, CheckpointError, abstract_like


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "embed": jax.random.normal(k1, (16, 8), jnp.float32),
        "block": {
            "w": jax.random.normal(k2, (8, 8)).astype(jnp.bfloat16),
            "count": jnp.arange(6, dtype=jnp.int32),
        },
        "rng": jax.random.PRNGKey(7),  # uint32[2]
    }


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        x_bytes, y_bytes = (np.asarray(v).reshape(-1).view(np.uint8) for v in (x, y))
        np.testing.assert_array_equal(x_bytes, y_bytes)


def _stale_tmp_dirs(directory):
    return glob.glob(os.path.join(str(directory), "*.orbax-checkpoint-tmp*"))


def test_round_trip_is_bitwise_for_params_opt_state_and_json(tmp_path):
    params = _params()
    float_params = {"embed": params["embed"], "w": params["block"]["w"]}
    opt = optax.adamw(1e-3)
    opt_state = opt.init(float_params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, float_params), opt_state, float_params)
    meta = {"step": 3, "tokens": 1234, "name": "run", "lr": 1e-3, "nested": {"a": [1, 2]}}

    with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
        assert ckpt.save(3, {"params": params, "opt_state": opt_state}, {"meta": meta})
    with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 3
        out = ckpt.restore(
            None,
            {"params": abstract_like(params), "opt_state": abstract_like(opt_state)},
            json_names=("meta",),
        )
        _assert_bitwise_equal(out["params"], params)
        _assert_bitwise_equal(out["opt_state"], opt_state)
        assert out["meta"] == meta
        assert type(out["opt_state"][0]) is type(opt_state[0])  # optax state namedtuples kept
        # Subsets: one tree without opt_state, one json item without any tree structure.
        _assert_bitwise_equal(ckpt.restore_tree(3, "params", abstract_like(params)), params)
        assert ckpt.restore_json(3, "meta") == meta


def test_restore_reshards_onto_a_different_mesh_and_replicated(tmp_path):
    assert jax.device_count() == 8
    saved_mesh = jax.make_mesh((4, 2), ("a", "b"))
    x = jax.device_put(
        jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), NamedSharding(saved_mesh, P("a", "b"))
    )
    y = jax.device_put(jnp.arange(32, dtype=jnp.int32), NamedSharding(saved_mesh, P("b")))
    tree = {"x": x, "y": y}
    with Checkpointer(tmp_path, every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, {"params": tree}, {})

        other_mesh = jax.make_mesh((2, 4), ("a", "b"))
        targets = {"x": NamedSharding(other_mesh, P("b", "a")), "y": NamedSharding(other_mesh, P())}
        out = ckpt.restore_tree(1, "params", abstract_like(tree, targets))
        for name in tree:
            assert out[name].sharding == targets[name]
            np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(tree[name]))

        replicated = NamedSharding(other_mesh, P())
        out = ckpt.restore_tree(1, "params", abstract_like(tree, replicated))
        assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(out))
        np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(x))


def test_should_save_pattern_keep_last_k_and_forced_saves(tmp_path):
    tree = {"params": {"w": jnp.zeros(4)}}
    with Checkpointer(tmp_path, every=2, keep=2) as ckpt:
        assert [s for s in range(7) if ckpt.should_save(s)] == [0, 2, 4, 6]
        assert not ckpt.save(1, tree, {"meta": {}})  # not due, not forced
        assert ckpt.all_steps() == []
        for step in range(1, 5):
            assert ckpt.save(step, tree, {"meta": {"step": step}}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert sorted(os.listdir(tmp_path)) == ["3", "4"]
        # A forced final save at a step just saved periodically is a no-op, not an error.
        assert not ckpt.save(4, tree, {"meta": {}}, force=True)
        assert ckpt.restore_json(4, "meta") == {"step": 4}
    with Checkpointer(tmp_path, every=0, keep=2) as ckpt:
        assert not any(ckpt.should_save(s) for s in range(5))
        assert ckpt.all_steps() == [3, 4]


def test_async_save_returns_before_the_write_and_is_latest_once_complete(tmp_path):
    big = {"w": jnp.ones((2048, 2048), jnp.float32)}  # 16 MB
    with Checkpointer(tmp_path, every=1, keep=2, async_save=True) as ckpt:
        assert ckpt.save(5, {"params": big}, {"meta": {"step": 5}})
        # The arrays are already copied off the devices: the trainer may donate or free them.
        big["w"].delete()
        # The write may still be running; a step is only reported once complete on disk.
        if ckpt.latest_step() == 5:
            assert os.path.isdir(tmp_path / "5")
        ckpt.wait()
        assert ckpt.latest_step() == 5 and ckpt.all_steps() == [5]
        assert os.path.isdir(tmp_path / "5") and not _stale_tmp_dirs(tmp_path)
        w = ckpt.restore_tree(5, "params", {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)})["w"]
        assert bool(jnp.all(w == 1.0))


_KILLED_SAVE = textwrap.dedent(
    """
    import glob, os, signal, sys, time
    import jax.numpy as jnp
    from topd_jax.trainer.checkpointing import Checkpointer
    directory = sys.argv[1]
    ckpt = Checkpointer(directory, every=1, keep=5, async_save=True)
    ckpt.save(1, {"params": {"w": jnp.full((4,), 1.0)}}, {"meta": {"step": 1}})
    ckpt.wait()
    big = jnp.ones((4096, 4096), jnp.float32)  # 64 MB: the write takes a while
    big.block_until_ready()
    ckpt.save(2, {"params": {"w": jnp.full((4,), 2.0), "big": big}}, {"meta": {"step": 2}})
    # Orbax creates the tmp dir in the background: kill as soon as it exists, mid-write.
    deadline = time.time() + 10
    while not glob.glob(os.path.join(directory, "2.orbax-checkpoint-tmp*")) and time.time() < deadline:
        time.sleep(0.0005)
    print("complete" if os.path.isdir(os.path.join(directory, "2")) else "partial", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_during_async_save_leaves_last_complete_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    if proc.stdout.decode().strip() == "complete":
        pytest.skip("the 64 MB write finished before the kill; nothing partial to test")
    assert os.path.isdir(tmp_path / "1") and not os.path.isdir(tmp_path / "2")
    assert [os.path.basename(p) for p in _stale_tmp_dirs(tmp_path)] == ["2.orbax-checkpoint-tmp"]

    with Checkpointer(tmp_path, every=1, keep=5) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        w = ckpt.restore_tree(None, "params", {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})["w"]
        np.testing.assert_array_equal(np.asarray(w), np.full((4,), 1.0))
        assert ckpt.save(2, {"params": {"w": jnp.full((4,), 3.0)}}, {"meta": {"step": 2}})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore_json(None, "meta") == {"step": 2}
        assert not _stale_tmp_dirs(tmp_path)


def test_restore_errors_name_the_directory(tmp_path):
    with Checkpointer(tmp_path / "empty", every=1, keep=1) as ckpt:
        with pytest.raises(CheckpointError, match=str(tmp_path / "empty")):
            ckpt.restore(None, {"params": {}})
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore_json(None, "meta")
        ckpt.save(1, {"params": {"w": jnp.zeros(2)}}, {"meta": {}})
        with pytest.raises(CheckpointError, match="step 9"):
            ckpt.restore_json(9, "meta")
        with pytest.raises(CheckpointError, match="config"):
            ckpt.restore_json(1, "config")


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="keep"):
        Checkpointer(tmp_path, every=1, keep=0)
    with pytest.raises(CheckpointError, match="every"):
        Checkpointer(tmp_path, every=-1, keep=1)
    with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        with pytest.raises(CheckpointError, match="meta"):
            ckpt.save(1, {"meta": {"w": jnp.zeros(2)}}, {"meta": {}})


def test_a_read_only_checkpointer_restores_but_never_saves_or_cleans_up(tmp_path):
    with Checkpointer(tmp_path, every=1, keep=2) as writer:
        writer.save(1, {"x": {"a": jnp.arange(4)}}, {"meta": {"step": 1}})
    stale = tmp_path / "2.orbax-checkpoint-tmp"
    stale.mkdir()  # a save another process is writing right now
    with Checkpointer(tmp_path, every=1, keep=2, read_only=True) as reader:
        assert reader.latest_step() == 1
        assert reader.restore_json(None, "meta") == {"step": 1}
        with pytest.raises(CheckpointError, match="read-only"):
            reader.save(3, {"x": {"a": jnp.arange(4)}}, {}, force=True)
    assert stale.is_dir()


def _two_steps(directory):
    with Checkpointer(directory, every=1, keep=3, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"params": {"w": jnp.full(4, float(step))}}, {"meta": {"step": step}})


def test_a_shape_or_structure_mismatch_is_one_line_naming_the_array_and_both_shapes(tmp_path):
    _two_steps(tmp_path)
    with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(2, {"params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}})
        assert str(info.value) == f"checkpoint step 2 in {tmp_path}: params/w has shape (4,) but the config builds (5,)"
        with pytest.raises(CheckpointError, match=r"params/b is built by the config but not in the checkpoint"):
            ckpt.restore(2, {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32),
                                        "b": jax.ShapeDtypeStruct((4,), jnp.float32)}})
        with pytest.raises(CheckpointError, match="has shape"):  # a mismatch is never fallen back from
            ckpt.restore_latest({"params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}})
        assert ckpt.all_steps() == [1, 2]


@pytest.mark.parametrize("read_only", [False, True])
def test_restore_latest_passes_over_an_unreadable_step(tmp_path, read_only):
    from topd_jax.trainer.checkpointing import UnreadableCheckpoint

    _two_steps(tmp_path)
    os.remove(tmp_path / "2" / "meta" / "metadata")
    target = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}
    with Checkpointer(tmp_path, every=1, keep=3, read_only=read_only) as ckpt:
        with pytest.raises(UnreadableCheckpoint, match=f"^checkpoint step 2 in {tmp_path} is unreadable: "):
            ckpt.restore(2, target, ["meta"])
        reports = []
        step, items = ckpt.restore_latest(target, ["meta"], report=reports.append)
        assert step == 1 and items["meta"] == {"step": 1} and np.all(np.asarray(items["params"]["w"]) == 1)
        [report] = reports
        assert report.startswith(f"checkpoint step 2 in {tmp_path} is unreadable") and "resuming from step 1" in report
        moved = glob.glob(str(tmp_path / "2.corrupt-*"))
        assert len(moved) == (0 if read_only else 1) and ("moved it to" in report) != read_only
        assert ckpt.all_steps() == ([1, 2] if read_only else [1])
