"""Mesh presets, FSDP and tensor-parallel placement on abstract meshes, activation constraints, and
the distributed start-up decisions, all in this process (no devices beyond the one CPU needed)."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from omegaconf import OmegaConf

import models
from flaxen import config, distributed, sharding
from flaxen.errors import ConfigError
from models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEGATRON = {"heads": "tensor", "mlp": "tensor"}


def abstract_mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


@pytest.mark.parametrize("preset,sizes", [("single", (-1, 1, 1)), ("dp", (-1, 1, 1)), ("fsdp", (1, -1, 1)),
                                          ("tp", (1, 1, -1)), ("dp_tp", (-1, 1, 2)), ("fsdp_tp", (1, -1, 2)),
                                          ("dp_fsdp", (-1, 2, 1)), ("dp_fsdp_tp", (-1, 2, 2))])
def test_mesh_presets_compose(preset, sizes):
    cfg = config.compose([f"mesh={preset}"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == sizes
    assert dict(cfg.mesh.logical_axis_rules) == MEGATRON
    assert cfg.distributed.initialize == "auto"


def test_every_preset_is_tested():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "mesh", "*.yaml"))}
    assert names == {"single", "dp", "fsdp", "tp", "dp_tp", "fsdp_tp", "dp_fsdp", "dp_fsdp_tp"}


GPT2_SMALL = models.ModelConfig(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=1, num_heads=12,
                                intermediate_size=3072, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def gpt2_small_params():
    model = nnx.eval_shape(lambda: models.build_model(GPT2_SMALL, "causal_lm", rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)[1]


def _specs(mesh, params, rules):
    shardings = sharding.state_shardings(mesh, params, rules)
    return {"/".join(str(getattr(k, "key", k)) for k in path[:-1]): tuple(s.spec)
            for path, s in jax.tree_util.tree_leaves_with_path(shardings)}


def test_gpt2_small_under_fsdp8_x_tensor4(gpt2_small_params):
    """The largest dimension fsdp divides, preferring one tensor leaves alone; 50257 divides by nothing."""
    specs = _specs(abstract_mesh(fsdp=8, tensor=4), gpt2_small_params, MEGATRON)
    block = "backbone/layers/0/"
    assert specs["backbone/word/embedding"] == (None, "fsdp")
    assert specs["backbone/position/embedding"] == ("fsdp", None)
    assert specs[block + "attention/query/kernel"] == ("fsdp", "tensor", None)
    assert specs[block + "attention/query/bias"] == ("tensor", "fsdp")
    assert specs[block + "attention/out/kernel"] == ("tensor", None, "fsdp")
    assert specs[block + "intermediate/kernel"] == ("fsdp", "tensor")
    assert specs[block + "intermediate/bias"] == (("tensor", "fsdp"),)
    assert specs[block + "output/kernel"] == ("tensor", "fsdp")
    assert specs[block + "mlp_norm/scale"] == ("fsdp",)


def test_fsdp_bytes_per_device_of_gpt2_small(gpt2_small_params):
    """Under fsdp=8 a device holds an eighth of every parameter but the few whose dimensions 8 divides not."""
    mesh = abstract_mesh(fsdp=8)
    shardings = sharding.state_shardings(mesh, gpt2_small_params, MEGATRON)
    leaves = jax.tree.leaves(gpt2_small_params)
    total = sum(np.prod(x.shape) for x in leaves)
    held = sum(np.prod(s.shard_shape(x.shape)) for x, s in zip(leaves, jax.tree.leaves(shardings)))
    assert held == total // 8


def test_a_rule_must_divide_its_dimension(gpt2_small_params):
    with pytest.raises(ConfigError, match=r"mesh.logical_axis_rules.heads=\['tensor'\] splits dimension 0 of "
                                          r"\S+\['bias'\].value \(size 12, shape \(12, 64\)\) into 8 shards"):
        sharding.state_shardings(abstract_mesh(tensor=8), gpt2_small_params, MEGATRON)
    with pytest.raises(ConfigError, match="mesh.logical_axis_rules.vocab"):
        sharding.state_shardings(abstract_mesh(tensor=2), gpt2_small_params, {"vocab": "tensor"})


def test_rules_that_name_fsdp_replace_the_largest_dimension_choice():
    mesh = abstract_mesh(fsdp=4)
    assert sharding.param_spec(mesh, ("embed", "mlp"), (64, 256), {"embed": "fsdp"}) == P("fsdp", None)
    assert sharding.param_spec(mesh, ("embed", "mlp"), (64, 256), {}) == P(None, "fsdp")
    assert sharding.param_spec(mesh, ("labels",), (3,), {}) == P(None)
    assert sharding.param_spec(abstract_mesh(), ("embed", "mlp"), (64, 256), MEGATRON) == P(None, "tensor")


def test_activation_sharding_resolves_batch_and_rules():
    resolve = sharding.activation_sharding(abstract_mesh(data=2, fsdp=2, tensor=2), MEGATRON)
    assert resolve(("batch", "length", "embed"), (8, 16, 32)).spec == P(("data", "fsdp"), None, None)
    assert resolve(("batch", "length", "mlp"), (8, 16, 64)).spec == P(("data", "fsdp"), None, "tensor")
    assert resolve(("batch", "length", "mlp"), (2, 16, 63)).spec == P(None, None, None)
    fsdp_embed = sharding.activation_sharding(abstract_mesh(fsdp=2), {"embed": "fsdp"})
    assert fsdp_embed(("batch", "length", "embed"), (8, 16, 32)).spec == P(("data", "fsdp"), None, None)


def test_constrain_is_the_identity_without_a_trainer():
    x = jnp.ones((2, 3, 4))
    assert layers.constrain(x, ("batch", "length", "embed")) is x


def test_models_name_their_block_boundaries():
    """Traced inside activation_sharding, the models ask for the embeddings, every block output, every
    MLP hidden layer and (for the lookup) each embedding table by their logical names."""
    seen = []
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)

    def resolve(names, shape):
        seen.append((names, shape))
        return NamedSharding(mesh, P())

    for family, head in (("bert", "token_cls"), ("gpt2", "causal_lm")):
        seen.clear()
        cfg = models.ModelConfig(family=family, vocab_size=32, hidden_size=8, num_layers=2, num_heads=2,
                                 intermediate_size=16, max_position_embeddings=8)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build_model(cfg, head, 3, rngs=nnx.Rngs(0))))
        ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
        with layers.activation_sharding(resolve):
            jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids).logits, state, ids)
        assert seen.count((("batch", "length", "embed"), (2, 5, 8))) == 3, (family, seen)
        assert seen.count((("batch", "length", "mlp"), (2, 5, 16))) == 2, (family, seen)
        assert (("vocab", "embed"), (32, 8)) in seen and (("position", "embed"), (8, 8)) in seen
        seen.clear()
        jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids).logits, state, ids)
        assert seen == []


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def test_distributed_start_up_decisions():
    cfg = OmegaConf.structured(config.DistributedConfig)
    assert distributed.initialize_arguments(cfg, {}) is None
    assert distributed.cluster_environment({**SLURM, "SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_environment(SLURM) == "slurm"
    assert distributed.initialize_arguments(cfg, SLURM) == {"initialization_timeout": 300}
    assert distributed.initialize_arguments(cfg, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) is not None
    assert distributed.cluster_environment({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    explicit = OmegaConf.merge(cfg, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                                     "local_device_ids": [0, 1]})
    assert distributed.initialize_arguments(explicit, {}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2, "local_device_ids": [0, 1],
        "initialization_timeout": 300}
    assert distributed.initialize_arguments(OmegaConf.merge(explicit, {"initialize": "never"}), SLURM) is None
    assert distributed.initialize_arguments(OmegaConf.merge(cfg, {"initialize": "always"}), {}) == {
        "initialization_timeout": 300}
    with pytest.raises(ConfigError, match="distributed.initialize='sometimes'"):
        distributed.initialize_arguments(OmegaConf.merge(cfg, {"initialize": "sometimes"}), {})
    with pytest.raises(ConfigError, match="distributed.process_id=4: expected 0 <= process_id < num_processes = 4"):
        distributed.initialize_arguments(OmegaConf.merge(explicit, {"process_id": 4}), {})


def test_single_process_start_up_is_a_no_op():
    assert distributed.initialize(OmegaConf.structured(config.DistributedConfig), {}) is None
    assert distributed.initialize(None, {}) is None
    assert jax.process_count() == 1


def test_start_up_after_devices_were_used_is_a_config_error():
    jax.devices()
    cfg = OmegaConf.merge(OmegaConf.structured(config.DistributedConfig), {"initialize": "always"})
    with pytest.raises(ConfigError, match="JAX already used its devices in this process"):
        distributed.initialize(cfg, {})
