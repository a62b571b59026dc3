"""flaxen.optim and the train step's update rule, against closed forms and a second code path."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from omegaconf import OmegaConf

import models
from flaxen import modeling, optim, steps
from flaxen.config import OptimizerConfig, ScheduleConfig

TINY = models.ModelConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0,
                          attention_dropout=0.0)


def closed_form(name, t, lr, warmup, total, end_ratio):
    end = lr * end_ratio
    if name == "constant":
        return lr
    if t < warmup:
        return lr * t / warmup
    progress = min((t - warmup) / (total - warmup), 1.0)
    if name == "warmup_linear":
        return lr + (end - lr) * progress
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["constant", "warmup_linear", "warmup_cosine"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedules_match_closed_form(name, warmup):
    cfg = ScheduleConfig(name=name, warmup_steps=warmup, end_lr_ratio=0.1)
    schedule = optim.make_schedule(cfg, 3e-3, 100)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100, 120]:
        assert float(schedule(t)) == pytest.approx(closed_form(name, t, 3e-3, warmup, 100, 0.1), rel=1e-5, abs=1e-10)


def test_weight_decay_mask_skips_biases_and_layernorm():
    model = nnx.eval_shape(lambda: models.build_model(TINY, "seq_cls", 2, rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)
    mask = optim.decay_mask(model, params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, m in flat.items() if m)
    assert all("kernel" in k or "embedding" in k for k in decayed)
    assert not any("norm" in k for k in decayed)
    assert all(not m for k, m in flat.items() if "bias" in k or "norm" in k)
    assert any("attention']['query']['kernel" in k for k in decayed)

    # AdamW with a zero gradient moves only decayed weights: p <- p - lr * wd * p.
    cfg = OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5, clip_norm=0.0)
    optimizer = optim.make_optimizer(cfg, optax.constant_schedule(0.1), mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda p, g: optimizer.update(g, optimizer.init(p), p))(params, zeros)
    for (path, update), param, decays in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params),
                                             jax.tree.leaves(mask)):
        expected = np.full(param.shape, -0.1 * 0.5 * 0.5) if decays else np.zeros(param.shape)
        np.testing.assert_allclose(np.asarray(update), expected, rtol=1e-6, atol=1e-12,
                                   err_msg=jax.tree_util.keystr(path))


def test_clipping_bounds_the_global_norm():
    cfg = OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, clip_norm=0.5)
    params = {"w": jnp.ones((3,)), "b": jnp.ones((2,))}
    optimizer = optim.make_optimizer(cfg, optax.constant_schedule(1.0), jax.tree.map(lambda _: True, params))
    grads = {"w": jnp.full((3,), 4.0), "b": jnp.full((2,), 3.0)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    norm = math.sqrt(3 * 16 + 2 * 9)
    np.testing.assert_allclose(np.asarray(updates["w"]), -4.0 * 0.5 / norm * np.ones(3), rtol=1e-6)
    assert float(optim.global_norm(grads)) == pytest.approx(norm, rel=1e-6)


def _token_batch(rng, rows=8, seq=12):
    ids = rng.integers(2, TINY.vocab_size, (rows, seq)).astype(np.int32)
    mask = (np.arange(seq)[None, :] < rng.integers(3, seq + 1, rows)[:, None]).astype(np.int32)
    labels = np.where(mask == 1, rng.integers(0, 3, (rows, seq)), -100).astype(np.int32)
    labels[rng.random((rows, seq)) < 0.3] = -100
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels}


def test_gradient_accumulation_equals_the_large_batch_update():
    model = modeling.ModelSpec(TINY, "token_cls", 3).build(0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mask = optim.decay_mask(model, params)
    cfg = OmegaConf.structured(OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, clip_norm=1.0))
    schedule = optax.constant_schedule(1e-2)
    optimizer = optim.make_optimizer(cfg, schedule, mask)
    batch = _token_batch(np.random.default_rng(0))
    key = jax.random.key(0, impl="rbg")

    # Reference: one plain loss over the whole batch (mean cross-entropy over labelled tokens).
    def reference_loss(p):
        logits = nnx.merge(graphdef, p, rest)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                              token_type_ids=batch["token_type_ids"]).logits
        valid = batch["labels"] != -100
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(valid, batch["labels"], 0))
        return jnp.sum(jnp.where(valid, ce, 0.0)) / valid.sum()

    @jax.jit
    def reference_update(p):
        loss, grads = jax.value_and_grad(reference_loss)(p)
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return loss, optax.tree.norm(grads), optax.apply_updates(p, updates)

    loss, grad_norm, expected = reference_update(params)

    step = steps.make_train_step(graphdef, "token_cls", optimizer, schedule=schedule, accum_steps=4, donate=False)
    new_params, _, metrics = step(params, optimizer.init(params), rest, batch, np.int32(0), key)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(grad_norm), rel=1e-5)
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_adafactor_matches_pytorch_reference():
    """Adafactor's parameters after 4 updates equal transformers' PyTorch Adafactor (scale_parameter,
    no relative step, no momentum) on a factored matrix (both dimensions >= 128) and a vector."""
    torch = pytest.importorskip("torch")
    from transformers.optimization import Adafactor
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(0, 0.05, (128, 160)).astype(np.float32), "b": rng.normal(0, 0.5, (160,)).astype(np.float32)}
    grads = [{k: rng.normal(0, 1, v.shape).astype(np.float32) * (i + 1) for k, v in params.items()} for i in range(4)]
    cfg = OptimizerConfig(name="adafactor", lr=1e-2, weight_decay=0.0, clip_norm=0.0, momentum=None)
    optimizer = optim.make_optimizer(cfg, optax.constant_schedule(1e-2), jax.tree.map(lambda _: True, params))
    p, state = jax.tree.map(jnp.asarray, params), None
    state = optimizer.init(p)
    ref = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    torch_opt = Adafactor(list(ref.values()), lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False)
    for g in grads:
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        for k, v in ref.items():
            v.grad = torch.tensor(g[k])
        torch_opt.step()
        for k in params:
            np.testing.assert_allclose(np.asarray(p[k]), ref[k].detach().numpy(), rtol=1e-5, atol=1e-6)
    # it moved: a relative step of about lr per update
    assert float(jnp.abs(p["w"] - params["w"]).max()) > 1e-4


def test_adafactor_weight_decay_is_decoupled_and_scaled_by_the_learning_rate():
    """With a zero gradient only the decay acts: p <- p - lr * wd * p where the mask is True."""
    params = {"w": jnp.full((4, 3), 0.5), "b": jnp.full((3,), 0.5)}
    mask = {"w": True, "b": False}
    cfg = OptimizerConfig(name="adafactor", lr=0.1, weight_decay=0.5, clip_norm=0.0, momentum=None)
    optimizer = optim.make_optimizer(cfg, optax.constant_schedule(0.1), mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0, atol=0)
