"""The mesh and the rules table: sharded forward equals single-device, and weights are split."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from apo_jax import models, sharding
from apo_jax.io import hf
from hf_fixtures import padded_batch, random_causal_lm, random_reward_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def test_mesh_config_resolves_and_rejects():
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert sharding.MeshConfig().resolve(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="= 4 but there are 8"):
        sharding.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)


def test_mesh_axes_are_auto():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    if hasattr(jax.sharding, "AxisType"):
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_table_specs():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    spec = lambda axes, shape: sharding.logical_to_spec(axes, mesh, shape)
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8)) == P(None, "fsdp", "tensor", None)
    assert spec(("act_batch", "act_length", "act_embed"), (4, 8, 32)) == P(("data", "fsdp"), None, None)
    # A mesh axis that does not divide a dimension is dropped instead of failing.
    assert spec(("layers", "embed", "kv_heads", "head_dim"), (2, 32, 1, 8)) == P(None, "fsdp", None, None)
    assert spec(("act_batch",), (2,)) == P("data")
    # Optimizer moments follow their parameter's rule through the path.
    assert sharding.logical_axes_for("1/0/mu/model/layers/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    # One layer of the sampler's split layout has no layer axis; a layer-less rule is untouched.
    assert sharding.logical_axes_for("model/layer_12/mlp/down_proj/kernel", 2) == ("mlp", "embed")
    assert sharding.logical_axes_for("model/layer_0/attn_norm/scale", 1) == ("norm",)
    assert sharding.logical_axes_for("model/embed/embedding", 2) == ("vocab", "embed")
    with pytest.raises(sharding.ShardingRuleError, match="rank 3"):
        sharding.logical_axes_for("model/layer_3/mlp/up_proj/kernel", 3)


@pytest.mark.parametrize("kind", ["lm", "rm"])
def test_sharded_forward_equals_single_device(tmp_path, kind):
    src = random_reward_model(seed=1) if kind == "rm" else random_causal_lm(seed=1)
    src.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(str(tmp_path))
    ids, mask = padded_batch(4, 16, config.vocab_size, "left", seed=3)
    fn = models.rewards if kind == "rm" else models.lm_logits
    ref = np.asarray(jax.jit(fn, static_argnums=0)(config, params, ids, mask))

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_params = sharding.shard_tree(params, mesh)
    batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)

    def run(p, b):
        with sharding.activation_sharding(mesh):
            return fn(config, p, b["ids"], b["mask"])

    out = jax.jit(run)(sharded_params, batch)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)

    # Every matrix is really split by the table, not just numerically right.
    layers = sharded_params["model"]["layers"]
    assert layers["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["o_proj"]["kernel"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert layers["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert sharded_params["model"]["embed"]["embedding"].sharding.spec == P(None, "fsdp")  # 97 % 2 != 0
    for leaf in jax.tree_util.tree_leaves(layers):
        if leaf.ndim >= 3:
            shard = leaf.addressable_shards[0].data
            assert shard.size * 4 == leaf.size, leaf.shape  # split 4 ways (fsdp x tensor)
    assert batch["ids"].sharding.spec[0] == ("data", "fsdp")


def test_load_pretrained_places_params_on_mesh(tmp_path):
    random_causal_lm(seed=2, vocab_size=96).save_pretrained(tmp_path)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    config, params = hf.load_pretrained(str(tmp_path), mesh=mesh)
    assert params["model"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    _, host = hf.load_pretrained(str(tmp_path))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, host)


def test_a_parameter_no_rule_covers_is_an_error_not_silently_replicated():
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    params = {"model": {"final_norm": {"scale": np.ones(4, np.float32)},
                        "adapter": {"lora_a": np.zeros((4, 2), np.float32)}}}
    with pytest.raises(sharding.ShardingRuleError, match="model/adapter/lora_a.*matches no rule"):
        sharding.tree_shardings(params, mesh)
    # A rule that matches with the wrong rank is an error too.
    with pytest.raises(sharding.ShardingRuleError, match="rank 2 .*final_norm"):
        sharding.tree_shardings({"model": {"final_norm": {"scale": np.ones((2, 4), np.float32)}}}, mesh)
    # Listed as replicated on purpose: fine; scalars (step counters) are always replicated.
    old = sharding.REPLICATED
    sharding.REPLICATED = (r"adapter/lora_a$",)
    try:
        shardings = sharding.tree_shardings({**params, "step": np.zeros((), np.int32)}, mesh)
        assert all(axis is None for axis in shardings["model"]["adapter"]["lora_a"].spec)
    finally:
        sharding.REPLICATED = old
