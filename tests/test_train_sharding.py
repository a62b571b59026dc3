"""flaxen.sharding on the one CPU device: mesh sizes, rules -> PartitionSpecs, state shardings."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from omegaconf import OmegaConf

import models
from flaxen import sharding
from flaxen.config import MeshConfig
from flaxen.errors import ConfigError

TINY = models.ModelConfig(family="gpt2", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=16, layer_norm_eps=1e-5)


def test_make_mesh_fills_the_free_axis_and_rejects_bad_sizes():
    mesh = sharding.make_mesh(OmegaConf.structured(MeshConfig()))
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh.data and mesh.fsdp"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=-1))
    too_many = jax.device_count() + 1
    with pytest.raises(ConfigError, match=f"data\\*fsdp\\*tensor = {too_many} but {jax.device_count()} devices"):
        sharding.make_mesh(MeshConfig(data=too_many, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match="mesh.tensor=0"):
        sharding.make_mesh(MeshConfig(tensor=0))


def test_logical_rules_to_partition_specs():
    rules = {"mlp": "tensor", "heads": "tensor", "embed": ["fsdp"], "vocab": None}
    assert sharding.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh(("vocab", "embed"), rules) == P(None, "fsdp")
    assert sharding.logical_to_mesh(("embed", "heads", "head_dim"), rules) == P("fsdp", "tensor", None)
    assert sharding.logical_to_mesh(("batch", "unknown"), {"batch": ["data", "fsdp"]}) == P(("data", "fsdp"), None)
    with pytest.raises(ConfigError, match="mesh axis 'tensor'"):
        sharding.logical_to_mesh(("mlp", "heads"), rules, "w")
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        sharding.logical_to_mesh(("mlp",), {"mlp": "model"})


def test_state_and_optimizer_shardings_follow_the_parameters():
    mesh = sharding.make_mesh(MeshConfig())
    model = nnx.eval_shape(lambda: models.build_model(TINY, "causal_lm", rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    rules = {"mlp": "tensor", "heads": "tensor", "vocab": "tensor"}
    shardings = sharding.state_shardings(mesh, params, rules)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    logical = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))}
    assert flat.keys() == logical.keys()
    for key, spec in logical.items():
        expected = tuple("tensor" if name in rules else None for name in spec)
        assert tuple(flat[key].spec) + (None,) * (len(expected) - len(flat[key].spec)) == expected, key

    optimizer = optax.adamw(1e-3)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = sharding.optimizer_state_shardings(mesh, opt_state, params, shardings)
    adam = opt_shardings[0]
    for moment in (adam.mu, adam.nu):
        for a, b in zip(jax.tree.leaves(moment), jax.tree.leaves(shardings)):
            assert a == b
    assert adam.count.spec == P()


def test_put_batch_shards_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh(MeshConfig())
    batch = {"input_ids": np.arange(12, dtype=np.int32).reshape(4, 3)}
    placed = sharding.put_batch(batch, sharding.batch_sharding(mesh))
    assert placed["input_ids"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(placed["input_ids"]), batch["input_ids"])
    assert sharding.batch_divisor(mesh) == jax.device_count()
