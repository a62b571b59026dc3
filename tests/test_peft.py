"""models.peft: LoRA, adapters, prefix tuning, BitFit on tiny BERT and GPT-2 models.

References: the base model itself (LoRA with B = 0 and adapters with a zero up-projection are
exact identities), a dense re-computation of the merged weights, a numpy attention for the
prefix, and bitwise comparison for frozen weights (the sharded LoRA model against the unsharded
one: tests/test_sharding_mesh.py).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from omegaconf import OmegaConf

import models
from flaxen.errors import CheckpointError, ConfigError
from models import peft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One layer and no dropout keep XLA compilation short on CPU (random bits cost seconds per dropout
# site); tests about several layers ask for two.
BERT = models.ModelConfig(family="bert", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
GPT2 = dataclasses.replace(BERT, family="gpt2", layer_norm_eps=1e-5)
CASES = {"bert-seq_cls": (BERT, "seq_cls"), "bert-token_cls": (BERT, "token_cls"), "gpt2-causal_lm": (GPT2, "causal_lm")}
METHODS = {
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "target_modules": ["attention.*", "output"]},
    "adapter": {"name": "adapter", "size": 4},
    "prefix": {"name": "prefix", "length": 3},
    "bitfit": {"name": "bitfit"},
}


_BASES = {}


def build(case, method=None, dtype="float32", seed=0, **overrides):
    """A tiny model (a copy of a cached initialisation) with `method` applied."""
    config, head = CASES[case]
    config = dataclasses.replace(config, dtype=dtype, **overrides)
    key = (config, head, seed)
    if key not in _BASES:
        _BASES[key] = models.build_model(config, head, num_labels=3, rngs=nnx.Rngs(rbg_key(seed)))
    model = nnx.clone(_BASES[key])
    if method is not None:
        peft.apply(model, METHODS[method] if isinstance(method, str) else method, rngs=nnx.Rngs(rbg_key(seed + 1)))
    return model


def rbg_key(seed):
    """A PRNG key whose random bits compile quickly on CPU (XLA's RngBitGenerator, not threefry)."""
    return jax.random.key(seed, impl="rbg")


def inputs(batch=2, seq=6, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, 64)
    mask = jnp.ones((batch, seq), jnp.int32).at[1, seq - 2:].set(0)
    return ids, mask


def randomize_peft(model, seed=0, scale=0.2):
    """Gives every PEFT parameter random values (B and the adapter up-projection start at zero)."""
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, peft.PeftParam))):
        variable.set_value(scale * jax.random.normal(rbg_key(seed * 1000 + i), variable.shape))


def labels_for(logits, seed=0):
    return jax.random.randint(jax.random.key(seed), logits.shape[:-1], 0, logits.shape[-1])


def cross_entropy(logits, labels):
    logits = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])


# ----------------------------------------------------------------------------- config


def test_yaml_configs_parse():
    for name in ("lora", "adapter", "prefix", "bitfit"):
        config = peft.from_dict(OmegaConf.load(os.path.join(ROOT, "configs", "peft", f"{name}.yaml")))
        assert config.name == name
    lora = peft.from_dict(OmegaConf.load(os.path.join(ROOT, "configs", "peft", "lora.yaml")))
    assert (lora.rank, lora.scaling, lora.target_modules) == (8, 2.0, ("query", "value"))
    assert peft.from_dict({"name": "lora", "rank": 16, "alpha": 8, "rslora": True}).scaling == 2.0


@pytest.mark.parametrize("values, key", [
    ({"name": "lora", "rnak": 4}, "peft.rnak"),
    ({"name": "lora", "rank": 0}, "peft.rank"),
    ({"name": "lora", "dropout": 1.5}, "peft.dropout"),
    ({"name": "adapter", "rank": 4}, "peft.rank"),
    ({"name": "adapter", "activation": "elu"}, "peft.activation"),
    ({"name": "prefix", "length": -1}, "peft.length"),
    ({"name": "lorra"}, "peft.name"),
])
def test_bad_config_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        peft.from_dict(values)


def test_unknown_target_and_module_patterns_raise():
    with pytest.raises(ConfigError, match=r"target_modules.*'qkv'.*attention\.query"):
        build("bert-seq_cls", {"name": "lora", "target_modules": ["qkv"]})
    with pytest.raises(ConfigError, match=r"modules_to_save.*'poolr'"):
        build("bert-seq_cls", {"name": "bitfit", "modules_to_save": ["poolr"]})
    model = build("bert-seq_cls", "lora")
    with pytest.raises(ConfigError, match="already has"):
        peft.apply(model, METHODS["adapter"])


# ----------------------------------------------------------------------------- every method, both families


@pytest.mark.parametrize("case, dtype", [("bert-seq_cls", "float32"), ("bert-token_cls", "bfloat16"),
                                         ("gpt2-causal_lm", "float32"), ("gpt2-causal_lm", "bfloat16")])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_starts_at_the_base_model(method, case, dtype):
    """Every method runs on every family/head in f32 and bf16; LoRA (B = 0), adapters (zero
    up-projection) and BitFit give the base model's outputs exactly."""
    ids, mask = inputs()
    expected = build(case, dtype=dtype)(ids, attention_mask=mask).logits
    model = build(case, method, dtype=dtype)
    got = model(ids, attention_mask=mask).logits
    assert got.shape == expected.shape and bool(jnp.all(jnp.isfinite(got)))
    if method == "prefix":
        assert not np.array_equal(np.asarray(got), np.asarray(expected))
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    counts = peft.parameter_counts(model)
    assert 0 < counts["trainable"] < counts["total"]


def test_trainable_sets_per_method():
    """The filter's selection, spelled out per method (independently of the filter's code)."""
    def trained(method):
        model = build("bert-seq_cls", method, num_layers=2)
        _, params, _ = nnx.split(model, peft.trainable_filter(model), ...)
        return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}

    head = {"head.dense.kernel", "head.dense.bias"}
    lora = trained("lora")
    assert lora - head == {f"backbone.layers.{i}.{m}.lora_{f}" for i in range(2) for f in "ab"
                           for m in ("attention.query", "attention.key", "attention.value", "attention.out", "output")}
    bitfit = trained("bitfit")
    dense = ("attention.query", "attention.key", "attention.value", "attention.out", "intermediate", "output")
    norms = ("attention_norm", "output_norm")
    assert bitfit - head == ({f"backbone.layers.{i}.{m}.bias" for i in range(2) for m in dense + norms}
                             | {"backbone.embeddings.norm.bias", "backbone.pooler.dense.bias"})
    without_norms = trained({"name": "bitfit", "include_layer_norm": False})
    assert not any("norm" in n for n in without_norms)
    adapter = trained("adapter")
    assert {n for n in adapter if "norm" in n} == (
        {f"backbone.layers.{i}.{m}.{p}" for i in range(2) for m in norms for p in ("scale", "bias")}
        | {"backbone.embeddings.norm.scale", "backbone.embeddings.norm.bias"})
    prefix = trained("prefix")
    assert prefix - head == {f"backbone.layers.{i}.attention.prefix_{kv}" for i in range(2) for kv in ("key", "value")}
    pooled = trained({"name": "lora", "modules_to_save": ["pooler"]})
    assert {"backbone.pooler.dense.kernel", "backbone.pooler.dense.bias"} <= pooled
    everything = trained({"name": "none"})
    assert len(everything) == len(nnx.to_flat_state(nnx.state(build("bert-seq_cls", num_layers=2), nnx.Param)))


def test_parameter_counts_closed_form():
    e, layers, labels, r = 16, 2, 3, 4
    model = build("bert-seq_cls", {"name": "lora", "rank": r, "target_modules": ["query", "value"]}, num_layers=2)
    base_total = peft.parameter_counts(build("bert-seq_cls", num_layers=2))["total"]
    lora = layers * 2 * (e * r + r * e)
    counts = peft.parameter_counts(model)
    assert counts == {"trainable": lora + e * labels + labels, "total": base_total + lora,
                      "trainable_percent": pytest.approx(100 * (lora + e * labels + labels) / (base_total + lora))}
    adapter = build("bert-seq_cls", {"name": "adapter", "size": 4, "train_layer_norm": False}, num_layers=2)
    assert peft.parameter_counts(adapter)["trainable"] == layers * 2 * (e * 4 + 4 + 4 * e + e) + e * labels + labels


# ----------------------------------------------------------------------------- training


def train(model, steps=3, lr=1e-2):
    """A few AdamW steps on the trainable parameters only; returns (model, opt_state, params)."""
    graphdef, params, frozen = nnx.split(model, peft.trainable_filter(model), ...)
    optimizer = optax.adamw(lr, weight_decay=0.01)
    opt_state = optimizer.init(params)
    ids, mask = inputs()

    @jax.jit
    def step(params, opt_state, frozen, key):
        def loss(params):
            m = nnx.merge(graphdef, params, frozen)
            logits = m(ids, attention_mask=mask, deterministic=False, dropout_rng=key).logits
            return cross_entropy(logits, labels_for(logits))

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = step(params, opt_state, frozen, rbg_key(i))
    return nnx.merge(graphdef, params, frozen), opt_state, params


TRAINED = [("bert-seq_cls", "lora", "float32"), ("bert-seq_cls", "adapter", "float32"),
           ("bert-seq_cls", "prefix", "float32"), ("bert-seq_cls", "bitfit", "float32"),
           ("gpt2-causal_lm", "lora", "bfloat16")]


@pytest.fixture(scope="module")
def trained():
    """Each (case, method, dtype) of TRAINED after three AdamW steps on its trainable parameters."""
    out = {}
    for case, method, dtype in TRAINED:
        model = build(case, method, dtype=dtype)
        before = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        model, opt_state, params = train(model)
        out[case, method] = before, model, opt_state, params
    return out


@pytest.mark.parametrize("case, method, dtype", TRAINED)
def test_training_freezes_base_and_optimizer_state_holds_trainables_only(trained, case, method, dtype):
    """Gradients reach every trainable parameter; frozen ones stay bitwise equal; AdamW's moments
    exist for the trainable parameters only."""
    before, model, opt_state, params = trained[case, method]
    trainable = {tuple(p) for p, _ in nnx.to_flat_state(params)}
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(after) == set(before)
    for path in set(after) - trainable:
        assert after[path].tobytes() == before[path].tobytes(), f"frozen {path} changed"
    unchanged = [p for p in trainable if np.array_equal(after[p], before[p])]
    assert not unchanged, unchanged

    adam = opt_state[0]
    for moments in (adam.mu, adam.nu):
        paths = {tuple(p) for p, _ in nnx.to_flat_state(moments)}
        assert paths == trainable
    n_trainable = peft.parameter_counts(model)["trainable"]
    opt_elements = sum(x.size for x in jax.tree.leaves(opt_state))
    assert opt_elements == 2 * n_trainable + 1


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("case", ["bert-seq_cls", "gpt2-causal_lm"])
def test_lora_merge_equals_lora_model(case):
    model = build(case, {"name": "lora", "rank": 3, "alpha": 5, "target_modules": ["attention.*", "intermediate",
                                                                                     "output"]})
    randomize_peft(model, seed=1)
    ids, mask = inputs()
    merged = peft.merge(model)
    assert type(merged) is models.Model and not hasattr(merged, "peft_config")
    assert not nnx.to_flat_state(nnx.state(merged, peft.PeftParam))
    expected = np.asarray(model(ids, attention_mask=mask).logits)
    np.testing.assert_allclose(np.asarray(merged(ids, attention_mask=mask).logits), expected, atol=1e-5, rtol=0)
    layer = model.backbone.layers[0].attention.out
    a = np.asarray(layer.lora_a[...]).reshape(16, 3)
    b = np.asarray(layer.lora_b[...]).reshape(3, 16)
    kernel = np.asarray(merged.backbone.layers[0].attention.out.kernel[...]).reshape(16, 16)
    np.testing.assert_allclose(kernel, np.asarray(layer.kernel[...]).reshape(16, 16) + 5 / 3 * a @ b, atol=1e-6)


def test_merge_of_trained_bitfit_and_refusal_for_adapters(trained):
    _, model, _, _ = trained["bert-seq_cls", "bitfit"]
    ids, mask = inputs()
    merged = peft.merge(model)
    np.testing.assert_array_equal(np.asarray(merged(ids, attention_mask=mask).logits),
                                  np.asarray(model(ids, attention_mask=mask).logits))
    with pytest.raises(ConfigError, match="adapter"):
        peft.merge(trained["bert-seq_cls", "adapter"][1])


# ----------------------------------------------------------------------------- adapter checkpoints


@pytest.mark.parametrize("case, method, dtype", TRAINED)
def test_adapter_checkpoint_round_trip(trained, tmp_path, case, method, dtype):
    _, model, _, params = trained[case, method]
    path = peft.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert set(meta["parameters"]) == {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    fresh = build(case, dtype=dtype)
    loaded = peft.load_adapter(fresh, path)
    ids, mask = inputs(seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(ids, attention_mask=mask).logits),
                                  np.asarray(model(ids, attention_mask=mask).logits))


def test_adapter_checkpoint_errors(trained, tmp_path):
    _, model, _, _ = trained["bert-seq_cls", "lora"]
    path = peft.save_adapter(model, tmp_path / "lora")
    with pytest.raises(CheckpointError, match="head='seq_cls'"):
        peft.load_adapter(build("bert-token_cls"), path)
    wider = nnx.eval_shape(lambda: models.build_model(dataclasses.replace(BERT, hidden_size=32), "seq_cls", 3))
    with pytest.raises(CheckpointError, match="hidden_size=16"):
        peft.load_adapter(wider, path)
    with pytest.raises(CheckpointError, match="differs"):
        peft.load_adapter(build("bert-seq_cls", {"name": "lora", "rank": 2}), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        peft.load_adapter(build("bert-seq_cls"), tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no PEFT"):
        peft.save_adapter(build("bert-seq_cls"), tmp_path / "plain")


def test_failed_save_keeps_the_earlier_checkpoint(trained, tmp_path, monkeypatch):
    import safetensors.numpy

    _, model, _, _ = trained["bert-seq_cls", "lora"]
    path = peft.save_adapter(model, tmp_path / "lora")
    good = {name: (tmp_path / "lora" / name).read_bytes() for name in os.listdir(path)}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        peft.save_adapter(model, path)
    assert {name: (tmp_path / "lora" / name).read_bytes() for name in os.listdir(path)} == good
    assert os.listdir(tmp_path) == ["lora"]


# ----------------------------------------------------------------------------- LoRA details


def test_lora_dropout_touches_only_the_lora_branch():
    """With B = 0 a LoRA model under dropout equals the base model under the same key (LoRA
    dropout draws its own bits); with B != 0 dropout acts in training calls only."""
    ids, mask = inputs()
    key = rbg_key(7)
    method = {"name": "lora", "rank": 4, "dropout": 0.5, "target_modules": ["intermediate"]}
    dropout = {"hidden_dropout": 0.1}
    base = build("bert-seq_cls", **dropout)
    model = build("bert-seq_cls", method, **dropout)
    run = nnx.jit(lambda m, key: (m(ids, attention_mask=mask).logits,
                                  m(ids, attention_mask=mask, deterministic=False, dropout_rng=key).logits))
    np.testing.assert_array_equal(run(model, key)[1], run(base, key)[1])
    randomize_peft(model, seed=2)
    no_dropout = build("bert-seq_cls", dict(method, dropout=0.0), **dropout)
    nnx.update(no_dropout, nnx.state(model, peft.PeftParam))
    (deterministic, dropped), (reference, kept) = run(model, key), run(no_dropout, key)
    np.testing.assert_allclose(deterministic, reference, atol=1e-6, rtol=0)
    assert not np.allclose(dropped, kept, atol=1e-4)


def test_lora_with_remat_matches_without():
    ids, mask = inputs()
    key = rbg_key(3)
    method = {"name": "lora", "rank": 4, "dropout": 0.3, "target_modules": ["value"]}
    plain = build("gpt2-causal_lm", method)
    remat = build("gpt2-causal_lm", method, remat=True)
    randomize_peft(plain, seed=4)
    randomize_peft(remat, seed=4)
    run = nnx.jit(lambda m: m(ids, attention_mask=mask, deterministic=False, dropout_rng=key).logits)
    np.testing.assert_allclose(run(remat), run(plain), atol=1e-6, rtol=0)


def test_lora_low_rank_backward_equals_autodiff():
    """The hand-written backward of (x · A) · B equals autodiff of the plain expression."""
    from models.peft.lora import low_rank

    kx, ka, kb, kd = jax.random.split(jax.random.key(0), 4)
    x, a = jax.random.normal(kx, (24, 16)), jax.random.normal(ka, (16, 4))
    b, dy = jax.random.normal(kb, (4, 12)), jax.random.normal(kd, (24, 12))
    value_and_grads = [jax.jit(jax.value_and_grad(lambda x, a, b: jnp.sum(jnp.tanh(f(x, a, b)) * dy), argnums=(0, 1, 2)))
                       for f in (low_rank, lambda x, a, b: (x @ a) @ b)]
    (ours, our_grads), (theirs, their_grads) = (f(x, a, b) for f in value_and_grads)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for g, h in zip(our_grads, their_grads):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)


def test_peft_parameters_carry_the_adapted_layers_axis_names():
    specs = lambda model: nnx.get_partition_spec(nnx.state(model, peft.PeftParam))
    lora = specs(build("bert-seq_cls", "lora"))["backbone"]["layers"][0]
    assert tuple(lora["attention"]["query"]["lora_a"].get_value()) == ("embed", "lora_rank")
    assert tuple(lora["attention"]["query"]["lora_b"].get_value()) == ("lora_rank", "heads", "head_dim")
    assert tuple(lora["attention"]["out"]["lora_a"].get_value()) == ("heads", "head_dim", "lora_rank")
    assert tuple(lora["output"]["lora_a"].get_value()) == ("mlp", "lora_rank")
    adapter = specs(build("bert-seq_cls", "adapter"))["backbone"]["layers"][0]["output"]
    assert tuple(adapter["adapter_down"]["kernel"].get_value()) == ("embed", "adapter")
    assert tuple(adapter["adapter_up"]["kernel"].get_value()) == ("adapter", "embed")
    assert tuple(adapter["adapter_up"]["bias"].get_value()) == ("embed",)
    prefix = specs(build("gpt2-causal_lm", "prefix"))["backbone"]["layers"][0]["attention"]
    assert tuple(prefix["prefix_key"].get_value()) == ("prefix", "heads", "head_dim")


# ----------------------------------------------------------------------------- prefix tuning


def test_prefix_attention_matches_numpy_reference():
    model = build("bert-seq_cls", "prefix")
    attention = model.backbone.layers[0].attention
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)[:, None, None, :]
    got, _ = attention(x, mask)

    def dense(layer, h, n_in):
        kernel = np.asarray(layer.kernel[...])
        return np.tensordot(h, kernel, axes=n_in) + np.asarray(layer.bias[...])

    xn = np.asarray(x, np.float64)
    q, k, v = (dense(layer, xn, 1) for layer in (attention.query, attention.key, attention.value))
    k = np.concatenate([np.broadcast_to(np.asarray(attention.prefix_key[...]), (2, 3, 2, 8)), k], axis=1)
    v = np.concatenate([np.broadcast_to(np.asarray(attention.prefix_value[...]), (2, 3, 2, 8)), v], axis=1)
    full_mask = np.concatenate([np.ones((2, 1, 1, 3), bool), np.asarray(mask)], axis=-1)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
    logits = np.where(full_mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = dense(attention.out, np.einsum("bnts,bsnh->btnh", probs, v), 2)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_prefix_decoder_cache_matches_full_forward():
    model = build("gpt2-causal_lm", {"name": "prefix", "length": 3, "reparameterize": True, "hidden": 8})
    randomize_peft(model, seed=5, scale=1.0)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    full = np.asarray(nnx.jit(lambda m: m(ids).logits)(model))
    step = nnx.jit(lambda m, ids, mask, cache, index: m(ids, attention_mask=mask, cache=cache, cache_index=index))
    cache = model.backbone.init_cache(2, 8)
    mask = jnp.zeros((2, 8), jnp.int32).at[:, :4].set(1)
    out = step(model, ids[:, :4], mask, cache, 0)
    steps = [np.asarray(out.logits)]
    for t in (4, 5):
        mask = mask.at[:, t].set(1)
        out = step(model, ids[:, t:t + 1], mask, out.cache, t)
        steps.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_prefix_reparameterization_is_one_shared_mlp():
    model = build("bert-seq_cls", {"name": "prefix", "length": 3, "reparameterize": True, "hidden": 8}, num_layers=2)
    encoders = {id(layer.attention.prefix_encoder) for layer in model.backbone.layers}
    assert len(encoders) == 1
    params = nnx.to_flat_state(nnx.state(model, peft.PrefixParam))
    e, h, p, layers = 16, 8, 3, 2
    assert sum(v.size for _, v in params) == p * e + e * h + h + h * layers * 2 * e + layers * 2 * e
    graphdef, trainable, frozen = nnx.split(model, peft.trainable_filter(model), ...)
    ids, mask = inputs()
    rebuilt = nnx.merge(graphdef, trainable, frozen)
    np.testing.assert_array_equal(np.asarray(rebuilt(ids, attention_mask=mask).logits),
                                  np.asarray(model(ids, attention_mask=mask).logits))


# ----------------------------------------------------------------------------- mesh
# LoRA on a tensor-parallel mesh (its factors split like the layers they adapt, one train step equal
# to the single-device one) runs in tests/test_sharding_mesh.py's 8-device process:
# test_lora_trains_on_a_tensor_mesh_like_on_one_device.
