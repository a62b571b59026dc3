"""model.remat and model.dtype change memory and speed, not the math.

- Rematerialisation (`model.remat=true`: every block's activations recomputed in the backward
  pass) gives the gradient of the training loss the model without it gives, for BERT and GPT-2,
  with dropout on (the same dropout key) and with LoRA (its own dropout on too).
- bfloat16 compute (`model.dtype=bfloat16`): the logits stay within the rounding bf16 allows of the
  float32 model's with the same weights, and a train step (flaxen.state, as the loop builds it)
  keeps the parameters and the optimizer state in float32.

The reference is the same model without the feature: the same weights, inputs and dropout key.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from flaxen import modeling, sharding, state
from flaxen.config import MeshConfig, OptimizerConfig
from models import peft

# One block (remat wraps each block alike) and few dropout sites: XLA's CPU compile time grows with both.
BERT = models.ModelConfig(family="bert", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                          max_position_embeddings=16, hidden_dropout=0.1, attention_dropout=0.1)
GPT2 = dataclasses.replace(BERT, family="gpt2", layer_norm_eps=1e-5)
FAMILIES = {"bert": (BERT, "seq_cls", 3), "gpt2": (GPT2, "causal_lm", 0)}
LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["query", "value", "intermediate"]}
DROPOUT_KEY = jax.random.key(7, impl="rbg")


def spec(family, peft_method=None, head=None, **overrides) -> modeling.ModelSpec:
    """The family's tiny model (as a run describes it in model.json) with `overrides` on its config."""
    config, default_head, num_labels = FAMILIES[family]
    return modeling.ModelSpec(dataclasses.replace(config, **overrides), head or default_head, num_labels,
                              peft=peft_method)


def build(family, peft_method=None, **overrides):
    """The model of `spec`, initialised (seed 0) as a run initialises it."""
    return spec(family, peft_method, **overrides).build(0)


def with_weights(model_spec: modeling.ModelSpec, model):
    """`model_spec`'s model carrying `model`'s weights (no initialisation of its own)."""
    return nnx.merge(nnx.graphdef(model_spec.build_abstract()), nnx.state(model))


def inputs(batch=4, seq=12):
    ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, 64)
    mask = jnp.ones((batch, seq), jnp.int32).at[1, seq - 3:].set(0)
    return ids, mask


def randomize(model, filter_=nnx.Param, scale=0.2):
    """Random values for the variables `filter_` selects (LoRA's B starts at zero, which would give A no
    gradient; biases start at zero and LayerNorm scales at one, which would hide a dropped term)."""
    for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, filter_))):
        noise = jax.random.normal(jax.random.key(1000 + i), variable.shape)
        if path[-1] == "scale":
            variable.set_value(1.0 + scale * noise)
        elif path[-1] == "bias" or filter_ is not nnx.Param:
            variable.set_value(scale * noise)


def loss_gradients(model, keys):
    """jax.grad of the mean cross-entropy of the logits against fixed random labels, with respect to
    every parameter (LoRA factors included), dropout on, once per dropout key in `keys` (one compile)."""
    ids, mask = inputs()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, key):
        logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask, deterministic=False, dropout_rng=key).logits
        labels = jax.random.randint(jax.random.key(1), logits.shape[:-1], 0, logits.shape[-1])
        logits = logits.astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])

    grad = jax.jit(jax.grad(loss))
    return [{jax.tree_util.keystr(path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grad(params, key))}
            for key in keys]


# LoRA's layers are the same code in both families: one family with LoRA keeps the compile time down
@pytest.mark.parametrize("family, with_lora", [("bert", False), ("gpt2", False), ("gpt2", True)],
                         ids=["bert", "gpt2", "gpt2-lora"])
def test_remat_gives_the_same_gradient(family, with_lora):
    method = LORA if with_lora else None
    plain = build(family, method)
    if with_lora:
        randomize(plain, peft.PeftParam)
    remat = with_weights(spec(family, method, remat=True), plain)
    assert remat.config.remat and not plain.config.remat
    expected, other_key = loss_gradients(plain, [DROPOUT_KEY, jax.random.key(8, impl="rbg")])
    (got,) = loss_gradients(remat, [DROPOUT_KEY])
    assert got.keys() == expected.keys()
    assert sum("lora_" in key for key in got) == (2 * 3 if with_lora else 0)
    # rtol 1e-5 per entry; entries that are a cancellation of terms of the gradient's scale (the key
    # bias's gradient is zero in exact arithmetic: softmax ignores a shift shared by all keys) keep
    # the float32 rounding of that scale, ~1e-7 of max|g|, not of their own size: floor 1e-6 max|g|.
    floor = 1e-6 * max(np.abs(g).max() for g in expected.values())
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=floor, err_msg=key)
    # every block parameter gets a gradient, and dropout is really on (another key, another gradient)
    assert all(np.abs(expected[key]).max() > 0 for key in expected if "['layers']" in key and "key']['bias" not in key)
    assert any(not np.allclose(other_key[key], expected[key], rtol=1e-3, atol=floor) for key in expected)


def test_remat_trains_a_lora_model_like_without():
    """The loop's train step (flaxen.state.build, LoRA's trainable filter: base weights frozen) with
    and without remat: the same loss, gradient norm and updated parameters. (With nnx.remat this
    step failed: frozen weights traced by jit and trained ones by grad in one remat block.)"""
    ids = np.asarray(jax.random.randint(jax.random.key(0), (8, 16), 2, 64), np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "labels": np.concatenate([ids[:, 1:], np.full((8, 1), -100, np.int32)], axis=1)}
    outcomes = []
    for remat in (False, True):
        model = build("gpt2", LORA, remat=remat)
        randomize(model, peft.PeftParam)
        setup = state.build(model, "clm", sharding.make_mesh(MeshConfig(data=1)), {},
                            optimizer_cfg=OptimizerConfig(name="sgd", lr=0.5, momentum=0.0, clip_norm=0.0),
                            schedule=optax.constant_schedule(0.5), trainable_filter=peft.trainable_filter(model))
        params, _, metrics = setup.train_step(setup.params, setup.opt_state, setup.rest, setup.put_batch(batch),
                                              np.int32(0), DROPOUT_KEY)
        outcomes.append((jax.device_get(metrics), [np.asarray(p) for p in jax.tree.leaves(params)]))
    (expected, expected_params), (got, got_params) = outcomes
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert len(got_params) == len(expected_params)
    for a, b in zip(got_params, expected_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# bfloat16 keeps 8 significant bits: every rounding to it errs by up to u = 2^-8 (0.39 %) relative.
# A Dense rounds its input, its kernel and its output; about a dozen such roundings (embeddings,
# the block's 6 projections, the head) reach the logits, independently, so they add like a
# random walk, sqrt(12) u ~ 3.5 u; LayerNorm (in float32) keeps the activations' scale at one.
# Allowed: 4 u of the largest logit (a bias or LayerNorm term left out is ~5-10 % of it here).
BF16_UNIT_ROUNDOFF = 2.0 ** -8
BF16_TOLERANCE = 4 * BF16_UNIT_ROUNDOFF


@pytest.mark.parametrize("family, head", [("bert", "seq_cls"), ("gpt2", "causal_lm")])
def test_bfloat16_logits_stay_within_bf16_rounding_of_float32(family, head):
    f32 = spec(family, head=head).build(0)
    randomize(f32, scale=0.1)
    bf16 = with_weights(spec(family, head=head, dtype="bfloat16"), f32)
    assert bf16.config.dtype == "bfloat16"
    ids, mask = inputs()
    forward = nnx.jit(lambda m: m(ids, attention_mask=mask).logits)
    expected = np.asarray(forward(f32))
    got = np.asarray(forward(bf16), np.float32)
    assert got.shape == expected.shape
    error = np.abs(got - expected).max()
    assert 0 < error <= BF16_TOLERANCE * np.abs(expected).max(), (error, np.abs(expected).max())


def test_a_bfloat16_train_step_keeps_float32_parameters(in_memory_task_data):
    data = in_memory_task_data("clm", vocab_size=64, seq_len=16)
    model = build("gpt2", dtype="bfloat16")
    before = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
    assert {v.dtype for v in before.values()} == {np.dtype(np.float32)}
    setup = state.build(model, "clm", sharding.make_mesh(MeshConfig(data=1)), {}, optimizer_cfg=OptimizerConfig(),
                        schedule=optax.constant_schedule(1e-3))
    batch = next(data.loader("train", 8, seed=0, train=True))
    params, opt_state, metrics = setup.train_step(setup.params, setup.opt_state, setup.rest, setup.put_batch(batch),
                                                  np.int32(0), DROPOUT_KEY)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    assert after.keys() == before.keys()
    assert {key: v.dtype for key, v in after.items()} == {key: jnp.float32 for key in after}
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(opt_state) if jnp.issubdtype(v.dtype, jnp.floating))
    assert any(not np.array_equal(np.asarray(after[key]), before[key]) for key in after)
