"""AdaLoRA: the SVD-form layers (models.peft.adalora), the training rules (flaxen.adalora: the
orthogonality regulariser, importance averages, cubic budget and allocation, checked against
Hugging Face PEFT's formulas re-implemented in numpy), the Hugging Face PEFT export loaded by
PyTorch `peft`, merging, and a run through the training loop that resumes exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
import tiny_runs
from flaxen import adalora as rule
from flaxen import checkpoint, loop, update_rules
from flaxen.errors import ConfigError
from models import peft
from models.peft.adalora import orthogonality

TINY = dict(family="bert", vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            max_position_embeddings=16)
IDS = np.random.RandomState(0).randint(0, 50, (2, 7))
MASK = np.ones((2, 7), np.int64)
MASK[1, 5:] = 0


def tiny_model(family="bert", head="seq_cls", seed=0):
    values = dict(TINY, family=family)
    return models.build_model(models.ModelConfig.from_dict(values), head, 3, rngs=nnx.Rngs(seed))


def adalora_model(**settings):
    model = tiny_model()
    config = {"name": "adalora", "init_r": 4, "target_r": 2, "total_step": 10, **settings}
    return peft.apply(model, config, rngs=nnx.Rngs(1))


def _forward(model, ids, mask):
    return model(ids, attention_mask=mask).logits


_jitted_forward = nnx.jit(_forward)


def logits(model, jit=True):
    return np.asarray((_jitted_forward if jit else _forward)(model, jnp.asarray(IDS), jnp.asarray(MASK)))


# ------------------------------------------------------------------------------------ config, model

def test_config_keys_and_errors():
    config = peft.from_dict({"name": "adalora", "lora_alpha": 16, "target_modules": "query"})
    assert config.lora_alpha == 16.0 and config.target_modules == ("query",)
    assert (config.init_r, config.target_r, config.tinit, config.tfinal, config.deltaT) == (12, 8, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.total_step) == (0.85, 0.85, 0.5, None)
    assert peft.for_run(config, 300).total_step == 300
    assert peft.for_run({**peft.to_dict(config), "total_step": 50}, 300).total_step == 50
    for bad, key in [({"target_r": 12}, "peft.target_r"), ({"deltaT": 0}, "peft.deltaT"),
                     ({"beta1": 1.0}, "peft.beta1"), ({"orth_reg_weight": -1}, "peft.orth_reg_weight"),
                     ({"total_step": 10, "tinit": 6, "tfinal": 4}, "peft.tinit"), ({"rank": 4}, "peft.rank")]:
        with pytest.raises(ConfigError, match=key):
            peft.from_dict({"name": "adalora", **bad})
    with pytest.raises(ConfigError, match="peft.tinit"):
        peft.for_run({"name": "adalora", "tinit": 100, "tfinal": 100}, 150)


def test_model_equals_the_base_at_init_and_trains_only_its_factors():
    base = logits(tiny_model(), jit=False)
    model = adalora_model(target_modules=["attention.*", "intermediate", "output"])
    np.testing.assert_array_equal(logits(model, jit=False), base)  # eager: the same operations, + 0
    layers = peft.adalora_layers(model)
    assert len(layers) == 2 * 6
    for _, layer in layers:
        assert not np.any(np.asarray(layer.lora_e[...]))
        assert layer.lora_a.shape[-1] == layer.lora_b.shape[0] == layer.lora_e.shape[0] == 4
        assert 0.015 < np.std(np.asarray(layer.lora_a[...])) < 0.025
        assert layer.scaling == pytest.approx(8.0 / (4 + 1e-5), rel=1e-12)
    counts = peft.parameter_counts(model)
    factors = sum(4 * (np.prod(layer.in_shape) + np.prod(layer.out_shape) + 1) for _, layer in layers)
    assert counts["trainable"] == factors + 32 * 3 + 3  # + the classifier


def test_orthogonality_value_and_gradient():
    rng = np.random.default_rng(0)
    factors = [(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)),
               (jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32), jnp.asarray(rng.normal(size=(3, 6)), jnp.float32))]

    def direct(factors):
        norms = []
        for a, b in factors:
            r = a.shape[-1]
            q = a.reshape(-1, r).T  # PEFT's lora_A [r, in]
            p = b.reshape(r, -1).T  # PEFT's lora_B [out, r]
            norms.append(jnp.linalg.norm(q @ q.T - jnp.eye(r), "fro"))
            norms.append(jnp.linalg.norm(p.T @ p - jnp.eye(r), "fro"))
        return sum(norms) / len(norms)

    np.testing.assert_allclose(orthogonality(factors), direct(factors), rtol=1e-6)
    ours, reference = jax.grad(orthogonality)(factors), jax.grad(direct)(factors)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    model = adalora_model()
    pairs = [(layer.lora_a[...], layer.lora_b[...]) for _, layer in peft.adalora_layers(model)]
    np.testing.assert_allclose(orthogonality(model), direct(pairs), rtol=1e-6)


# ------------------------------------------------------------------------ the rules against PEFT's

def test_budget_schedule_closed_form():
    kw = dict(init_bgt=48, target_bgt=32, tinit=10, tfinal=20, total_step=100, deltaT=10)
    assert rule.budget_schedule(0, **kw) == (48, False)
    assert rule.budget_schedule(10, **kw) == (48, False)
    for step in (11, 20, 33, 50, 79):
        coeff = 1 - (step - 10) / (100 - 20 - 10)
        assert rule.budget_schedule(step, **kw) == (int(16 * coeff ** 3 + 32), step % 10 == 0)
    assert rule.budget_schedule(20, **kw) == (int(16 * (6 / 7) ** 3 + 32), True) == (42, True)
    assert rule.budget_schedule(80, **kw) == (32, True)
    assert rule.budget_schedule(81, **kw) == (32, True)
    torch_peft = pytest.importorskip("peft")
    allocator = torch_peft.tuners.adalora.RankAllocator.__new__(torch_peft.tuners.adalora.RankAllocator)
    allocator.peft_config = torch_peft.AdaLoraConfig(init_r=12, target_r=8, tinit=10, tfinal=20, deltaT=10,
                                                     total_step=100)
    allocator.init_bgt, allocator.target_bgt = 48, 32
    for step in range(0, 101):
        assert rule.budget_schedule(step, **kw) == allocator.budget_schedule(step), step


def _numpy_rules(params, grads_per_step, keys, settings, lr, clip_norm):
    """Hugging Face PEFT's AdaLoraModel.forward regulariser and update_and_allocate, in numpy
    float32, around plain SGD with global-norm clipping: the parameters after every step."""
    f32 = np.float32
    p = {k: np.array(v, f32) for k, v in params.items()}
    init_r, n = settings["init_r"], len(keys)
    init_bgt, target_bgt = init_r * n, settings["target_r"] * n
    tinit, tfinal, total, delta_t = settings["tinit"], settings["tfinal"], settings["total_step"], settings["deltaT"]
    beta1, beta2, weight = f32(settings["beta1"]), f32(settings["beta2"]), f32(settings["orth_reg_weight"])
    ipt_avg = {k: np.zeros_like(p[k]) for triple in keys for k in triple}
    unc_avg = {k: np.zeros_like(p[k]) for triple in keys for k in triple}
    pattern, history = None, []
    for step, grads in enumerate(grads_per_step):
        g = {k: np.array(v, f32) for k, v in grads.items()}
        for a, _, b in keys:  # d/dX of weight * mean ||.||_F: 2 q M / ||M|| and 2 M p / ||M||
            q = p[a].reshape(-1, init_r)
            m = q.T @ q - np.eye(init_r, dtype=f32)
            g[a] = g[a] + weight * (2 * q @ m / np.sqrt((m ** 2).sum()) / (2 * n)).reshape(p[a].shape)
            pb = p[b].reshape(init_r, -1)
            m = pb @ pb.T - np.eye(init_r, dtype=f32)
            g[b] = g[b] + weight * (2 * m @ pb / np.sqrt((m ** 2).sum()) / (2 * n)).reshape(p[b].shape)
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        if norm >= clip_norm:
            g = {k: v / f32(norm) * f32(clip_norm) for k, v in g.items()}
        p = {k: p[k] - f32(lr) * g[k] for k in p}
        if step < total - tfinal:  # update_ipt
            for k in ipt_avg:
                ipt = np.abs(p[k] * g[k])
                ipt_avg[k] = beta1 * ipt_avg[k] + (1 - beta1) * ipt
                unc_avg[k] = beta2 * unc_avg[k] + (1 - beta2) * np.abs(ipt - ipt_avg[k])
        budget, mask_ind = rule.budget_schedule(step, init_bgt=init_bgt, target_bgt=target_bgt, tinit=tinit,
                                                tfinal=tfinal, total_step=total, deltaT=delta_t)
        if (step < total - tfinal and mask_ind) or step == total - tfinal:  # mask_to_budget
            scores = {}
            for a, e, b in keys:
                score_a = (ipt_avg[a] * unc_avg[a]).reshape(-1, init_r).T  # PEFT's [r, in]
                score_b = (ipt_avg[b] * unc_avg[b]).reshape(init_r, -1).T  # PEFT's [out, r]
                ab = np.concatenate([score_a.mean(axis=1, keepdims=True), score_b.mean(axis=0).reshape(-1, 1)], 1)
                scores[e] = (ipt_avg[e] * unc_avg[e]) + ab.sum(axis=1)
            threshold = np.sort(np.concatenate(list(scores.values())))[init_bgt - budget - 1]
            pattern = {e: ~(s <= threshold) for e, s in scores.items()}
            for e, keep in pattern.items():
                p[e] = np.where(keep, p[e], 0)
            if step == total - tfinal:
                ipt_avg = {k: np.zeros_like(v) for k, v in ipt_avg.items()}
                unc_avg = {k: np.zeros_like(v) for k, v in unc_avg.items()}
        elif step > total - tfinal:  # mask_using_rank_pattern
            for e, keep in pattern.items():
                p[e] = np.where(keep, p[e], 0)
        history.append((dict(p), pattern and dict(pattern), dict(ipt_avg), dict(unc_avg)))
    return history


def test_importance_allocation_and_final_mask_match_a_numpy_reimplementation():
    settings = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, deltaT=2, beta1=0.85, beta2=0.7,
                    orth_reg_weight=0.5)
    model = adalora_model(**settings, target_modules=["query", "output"])
    _, params, _ = nnx.split(model, peft.trainable_filter(model), ...)
    layers = [path for path, _ in peft.adalora_layers(model)]
    keys = [tuple(m + (f,) for f in ("lora_a", "lora_e", "lora_b")) for m in layers]
    lr, clip_norm, steps = 0.05, 2.0, 10
    config = peft.from_dict({"name": "adalora", **settings})
    optimizer = rule.adalora(optax.chain(optax.clip_by_global_norm(clip_norm), optax.sgd(lr)), config, layers,
                             clip_norm=clip_norm)
    rng = np.random.default_rng(3)
    flat = rule._by_path(params)
    grads_per_step = [{k: (rng.normal(size=v.shape) * (0.01 if step % 3 else 1.0)).astype(np.float32)
                       for k, v in flat.items()} for step in range(steps)]
    reference = _numpy_rules(flat, grads_per_step, keys, settings, lr, clip_norm)

    @jax.jit
    def step_fn(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    clipped_steps = 0
    for step in range(steps):
        grads = rule._replace(params, {k: jnp.asarray(v) for k, v in grads_per_step[step].items()})
        clipped_steps += float(optax.global_norm(grads)) > clip_norm
        params, state = step_fn(params, state, grads)
        ours, (want, want_pattern, want_ipt, want_unc) = rule._by_path(params), reference[step]
        for k in want:
            np.testing.assert_allclose(ours[k], want[k], rtol=1e-5, atol=1e-7, err_msg=f"step {step} {k}")
        ipt, unc = rule._by_path(state.exp_avg_ipt), rule._by_path(state.exp_avg_unc)
        for k in want_ipt:
            np.testing.assert_allclose(ipt[k], want_ipt[k], rtol=1e-5, atol=1e-9, err_msg=f"step {step} {k}")
            np.testing.assert_allclose(unc[k], want_unc[k], rtol=1e-5, atol=1e-9, err_msg=f"step {step} {k}")
        kept = rule._by_path(state.rank_pattern)
        if want_pattern is not None:
            assert {e: np.asarray(kept[e]).tolist() for e in want_pattern} == \
                   {e: keep.tolist() for e, keep in want_pattern.items()}, step
    assert 0 < clipped_steps < steps
    assert int(state.count) == steps
    # after the final allocation (step 6) the budget is target_r per layer and stays fixed
    kept = rule._by_path(state.rank_pattern)
    assert sum(int(np.sum(v)) for v in kept.values()) == 2 * len(layers)
    for e, keep in kept.items():
        assert not np.any(np.asarray(rule._by_path(params)[e])[~np.asarray(keep)])


def test_ranks_concentrate_in_the_layer_the_loss_depends_on():
    """Two adapted layers; the loss reads only the first one's update: after the budget falls to
    target_r · 2 = init_r, every kept singular value belongs to that layer."""
    settings = dict(init_r=4, target_r=2, tinit=5, tfinal=10, total_step=40, deltaT=5)
    model = adalora_model(**settings, target_modules=["layers.0.attention.query", "layers.1.attention.value"])
    (used_path, used), (idle_path, _) = peft.adalora_layers(model)
    assert used_path[-1] == "query" and idle_path[-1] == "value"
    graphdef, params, rest = nnx.split(model, peft.trainable_filter(model), ...)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(32, 3)) @ rng.normal(size=(3, 32)) * 0.3, jnp.float32)
    optimizer = rule.adalora(optax.adam(1e-2), peft.from_dict({"name": "adalora", **settings}),
                             [used_path, idle_path])

    def loss_fn(params):
        layer = nnx.merge(graphdef, params, rest)
        for key in used_path:
            layer = layer[key] if isinstance(key, int) else getattr(layer, key)
        return jnp.mean(jnp.square(x @ layer.delta().reshape(32, 32) - x @ target))

    @jax.jit
    def step_fn(params, state):
        updates, state = optimizer.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    first = float(loss_fn(params))
    for _ in range(40):
        params, state = step_fn(params, state)
    kept = {path[:-1]: np.asarray(v) for path, v in rule._by_path(state.rank_pattern).items()}
    assert kept[used_path].tolist() == [True] * 4 and kept[idle_path].tolist() == [False] * 4
    assert rule.rank_pattern(state)[".".join(map(str, used_path))] == [True] * 4
    assert float(loss_fn(params)) < 0.8 * first


# ----------------------------------------------------------------------- Hugging Face PEFT, merging

def _prune_like_an_allocation(model, seed):
    """Random factors (as if trained) with some singular values pruned, one layer to rank 0."""
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, peft.AdaLoRAParam))):
        variable.set_value(0.3 * jax.random.normal(jax.random.key(seed * 100 + i), variable.shape))
    for i, (_, layer) in enumerate(peft.adalora_layers(model)):
        e = np.array(layer.lora_e[...])
        e[np.arange(e.size) % 3 == i % 3] = 0
        if i == 2:
            e[:] = 0
        layer.lora_e.set_value(jnp.asarray(e))
    if model.head is not None and getattr(model.head, "dense", None) is not None:
        kernel = model.head.dense.kernel
        kernel.set_value(kernel[...] + 0.3)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_hf_peft_export_loads_in_pytorch_peft_and_merges(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch_peft = pytest.importorskip("peft")
    head = "seq_cls" if family == "bert" else "causal_lm"
    base = tiny_model(family, head, seed=2)
    base_dir = models.save_pretrained(base, tmp_path / "base")
    model = models.load_pretrained(base_dir, head=head)
    targets = ["attention.*", "intermediate", "output"] if family == "bert" else ["query", "value", "intermediate"]
    peft.apply(model, {"name": "adalora", "init_r": 3, "target_r": 2, "total_step": 10, "lora_alpha": 5,
                       "target_modules": targets}, rngs=nnx.Rngs(4))
    _prune_like_an_allocation(model, 4)
    path = peft.export_hf_peft(model, tmp_path / "adapter")

    saved = json.load(open(os.path.join(path, "adapter_config.json")))
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 10 and saved["target_r"] == 2
    slots = 3 if family == "bert" else 6  # GPT-2's c_attn holds the query and value factors: 2 x 3
    assert saved["init_r"] == slots
    assert all(key.endswith(".lora_E") and len(kept) == slots for key, kept in saved["rank_pattern"].items())
    assert sum(not any(kept) for kept in saved["rank_pattern"].values()) >= 1

    cls = transformers.BertForSequenceClassification if family == "bert" else transformers.GPT2LMHeadModel
    reference = torch_peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir).eval(), path).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
        plain = cls.from_pretrained(base_dir).eval()(input_ids=torch.tensor(IDS),
                                                    attention_mask=torch.tensor(MASK)).logits.numpy()
    ours = logits(model)
    rows = [(0, slice(None)), (1, slice(0, 5))]  # real tokens (GPT-2 pads differently after them)
    for row, cols in rows:
        np.testing.assert_allclose(ours[row, cols], theirs[row, cols], atol=1e-4, rtol=0)
    assert not np.allclose(ours, plain, atol=1e-3)

    merged = peft.merge(model)
    np.testing.assert_allclose(logits(merged), ours, atol=1e-5, rtol=0)
    unloaded = reference.merge_and_unload()
    merged_dir = models.save_pretrained(merged, tmp_path / "merged")
    with torch.no_grad():
        for candidate in (unloaded, cls.from_pretrained(merged_dir).eval()):
            out = candidate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
            for row, cols in rows:
                np.testing.assert_allclose(out[row, cols], ours[row, cols], atol=1e-4, rtol=0)


def test_adapter_checkpoint_round_trip(tmp_path):
    model = adalora_model(target_modules=["query", "output"])
    _prune_like_an_allocation(model, 5)
    path = peft.save_adapter(model, tmp_path / "adapter")
    loaded = peft.load_adapter(tiny_model(), path)
    assert peft.config_of(loaded) == peft.config_of(model)
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_untrained_export_keeps_every_singular_value(tmp_path):
    model = adalora_model()
    path = peft.export_hf_peft(model, tmp_path / "adapter")
    saved = json.load(open(os.path.join(path, "adapter_config.json")))
    assert saved["rank_pattern"] is None and saved["init_r"] == 4
    with pytest.raises(ConfigError, match="peft.total_step"):
        peft.export_hf_peft(peft.apply(tiny_model(), {"name": "adalora", "init_r": 4, "target_r": 2}),
                            tmp_path / "other")


# ------------------------------------------------------------------------------- the training loop

ADALORA = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2, "lora_alpha": 8,
           "target_modules": ["query", "value", "intermediate"]}


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def _arrays(run_dir, step):
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    out = saved.restore_arrays(step, items=("params", "opt_state"))
    saved.close()
    return out


def test_train_with_adalora_resumes_exactly(tmp_path, in_memory_task_data):
    """12 steps (total_step = steps): allocations at steps 4 and 6, the final one at 8; a run stopped
    at step 5 (between allocations) and resumed equals the uninterrupted run."""
    task = in_memory_task_data("seq_cls")

    def cfg(run_dir):
        return tiny_runs.make_cfg(run_dir, peft=ADALORA, steps=12, eval_every=0, checkpoint_every=4, log_every=1,
                                  **{"optimizer.lr": 1e-2})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    results = loop.train(cfg(straight), task_data=task)
    assert loop.train(cfg(resumed), task_data=task, should_stop=lambda step: step == 5)["steps"] == 5
    assert loop.train(cfg(resumed), task_data=task)["status"] == "completed"
    assert results["peft"]["total_step"] == 12
    assert _rows(resumed) == _rows(straight)
    assert [row["step"] for row in _rows(straight) if "grad_norm" in row] == list(range(1, 13))
    ours, reference = _arrays(resumed, 12), _arrays(straight, 12)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]), err_msg=".".join(key))
    kept = {k: np.asarray(v) for k, v in reference.items() if k[0] == "rank_pattern"}
    assert len(kept) == 3 and sum(int(v.sum()) for v in kept.values()) == 2 * 3
    for key, keep in kept.items():
        assert not np.any(np.asarray(reference[key[1:]])[~keep]), key
    assert int(reference[("count",)]) == 12


def test_the_rule_is_registered_and_off_without_adalora(tmp_path):
    cfg = tiny_runs.make_cfg(tmp_path, peft=ADALORA)
    model = peft.apply(tiny_model(), ADALORA, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, peft.trainable_filter(model), ...)
    wrapped = update_rules.wrap(cfg, model, params, optax.sgd(0.1))
    state = jax.eval_shape(wrapped.init, params)
    found = rule.find_state(state)
    assert found is not None
    # every leaf of the rule's state mirrors a parameter (path suffix and shape), so
    # flaxen.sharding.optimizer_state_shardings gives it that parameter's sharding
    shapes = {path: leaf.shape for path, leaf in rule._by_path(params).items()}
    for field in ("exp_avg_ipt", "exp_avg_unc", "rank_pattern"):
        leaves = rule._by_path(getattr(found, field))
        assert leaves and all(shapes[path] == leaf.shape for path, leaf in leaves.items()), field
    assert set(rule._by_path(found.exp_avg_ipt)) == {p for p in shapes if p[-1] in ("lora_a", "lora_e", "lora_b")}
    plain = tiny_model()
    _, plain_params, _ = nnx.split(plain, nnx.Param, ...)
    state = jax.eval_shape(update_rules.wrap(cfg, plain, plain_params, optax.sgd(0.1)).init, plain_params)
    assert rule.find_state(state) is None
