"""The inference layout: the no-gradient phases on their own mesh give the training layout's results.

Float32 on 8 simulated CPU devices. Tokens must be identical; log-probs and OT distances agree to
2e-5 (tensor and expert parallelism only reorder float sums).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topd_jax.configuration import ConfigError
from topd_jax.losses.topd import TopdConfig
from topd_jax.models import CausalLM, ModelConfig
from topd_jax.models.sharding import batch_sharding, make_mesh
from topd_jax.trainer import phases, placement
from topd_jax.trainer.config import InferenceConfig, MeshConfig, RolloutConfig, TrainConfig
from topd_jax.trainer.runtime import auto_inference_sizes, inference_mesh

STUDENT = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
# An MoE teacher, as in the paper: layer 0 routes each token to 2 of 4 experts.
TEACHER = ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=(1,))
ROLLOUT = RolloutConfig(prompts_per_step=8, max_new_tokens=8)
LOSS = TopdConfig.preset("topd", window=4, max_candidates=2, num_reference=2)
B, P = 8, 5


def _params(cfg, seed):
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    return graphdef, params


def run_phases(mesh):
    """The trainer's chain (`phases.no_gradient_phases`) on `mesh` (None: one device, no mesh)."""
    graphdef, params = _params(STUDENT, 0)
    t_graphdef, t_params = _params(TEACHER, 1)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 64, size=(B, P)).astype(np.int32)
    mask = np.ones((B, P), bool)
    mask[1, :2] = mask[5, :3] = False
    keys = jax.random.split(jax.random.PRNGKey(3))
    if mesh is not None:
        params = jax.device_put(params, placement.tree_shardings(params, mesh))
        t_params = jax.device_put(t_params, placement.tree_shardings(t_params, mesh))
        prompts, mask = (jax.device_put(a, batch_sharding(mesh, a.shape)) for a in (prompts, mask))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        rollout, scores, located = phases.no_gradient_phases(
            lambda name, phase, *a, **k: phase(*a, **k), lambda tree, name: tree, graphdef, params, t_graphdef,
            (t_params, t_params), prompts, mask, keys[0], keys[1], options=ROLLOUT, loss=LOSS, chunk_size=16)
    return {"tokens": rollout.tokens, "logprobs": rollout.logprobs, "teacher": scores.logprobs,
            "positions": located.positions, "windows": located.teacher_windows.tokens,
            "window_logprobs": located.teacher_windows.logprobs, "ot": located.ot, "reference_ot": located.reference_ot}


@pytest.fixture(scope="module")
def single_device():
    return jax.tree.map(np.asarray, run_phases(None))


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(data=2, tensor=4), dict(tensor=2, expert=4)], ids=str)
def test_phases_under_every_layout_equal_one_device(single_device, sizes):
    got = jax.tree.map(np.asarray, run_phases(make_mesh(**sizes)))
    for name in ("tokens", "positions", "windows"):
        np.testing.assert_array_equal(got[name], single_device[name], err_msg=name)
    for name in ("logprobs", "teacher", "window_logprobs", "ot", "reference_ot"):
        np.testing.assert_allclose(got[name], single_device[name], rtol=2e-5, atol=2e-5, err_msg=name)


def test_reshard_round_trip_is_exact():
    _, params = _params(STUDENT, 0)
    train = jax.device_put(params, placement.tree_shardings(params, make_mesh(fsdp=8)))
    inference = jax.device_put(train, placement.tree_shardings(params, make_mesh(data=2, tensor=4)))
    back = jax.device_put(inference, placement.tree_shardings(params, make_mesh(fsdp=8)))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    leaf = jax.tree.leaves(inference)[0]
    assert leaf.sharding.mesh.shape["tensor"] == 4


def test_auto_sizes_split_kv_heads_over_tensor_and_experts_over_expert():
    assert auto_inference_sizes(8, STUDENT, TEACHER) == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 4}
    # The paper's pair on a v5p-64: both models' kv heads (8, 4) allow tensor 4; 128 experts take the rest.
    qwen4b = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=32, num_kv_heads=8, head_dim=8)
    qwen30b = ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=32, num_kv_heads=4, head_dim=8, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=16)
    assert auto_inference_sizes(32, qwen4b, qwen30b) == {"data": 1, "fsdp": 1, "tensor": 4, "expert": 8}
    assert auto_inference_sizes(32, qwen4b, qwen4b) == {"data": 4, "fsdp": 1, "tensor": 8, "expert": 1}
    assert auto_inference_sizes(1, qwen4b, qwen30b) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}


def test_inference_mesh_layouts():
    train = make_mesh(fsdp=8)
    assert inference_mesh(InferenceConfig(layout="train"), train, STUDENT, TEACHER) is train
    auto = inference_mesh(InferenceConfig(), train, STUDENT, TEACHER)
    assert dict(auto.shape) == {"data": 1, "fsdp": 1, "tensor": 2, "expert": 4}
    assert set(auto.devices.flat) == set(train.devices.flat)
    given = inference_mesh(InferenceConfig(layout="mesh", mesh=MeshConfig(data=2, tensor=4)), train, STUDENT, TEACHER)
    assert dict(given.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
    # The same sizes as the training mesh: the training mesh itself (no reshard).
    assert inference_mesh(InferenceConfig(layout="mesh", mesh=MeshConfig(data=1, fsdp=8)), train, STUDENT,
                          TEACHER) is train
    with pytest.raises(ConfigError, match="needs 6 devices, but there are 8"):
        inference_mesh(InferenceConfig(layout="mesh", mesh=MeshConfig(data=3, tensor=2)), train, STUDENT, TEACHER)


def test_inference_config_from_yaml_keys():
    config = TrainConfig.from_dict({"inference": {"layout": "mesh", "mesh": {"tensor": 4}}})
    assert config.inference == InferenceConfig(layout="mesh", mesh=MeshConfig(data=-1, tensor=4))
    with pytest.raises(ConfigError, match="inference.layout"):
        TrainConfig.from_dict({"inference": {"layout": "fast"}})
