"""Pruning: magnitude masks against a numpy sort, the Zhu & Gupta schedule against its closed form,
the optax wrapper's masks after each update (exact zeros that stay zero), a gradual-pruning run
that reaches its target and resumes exactly, and head pruning against the unpruned model with
those heads masked (outputs, parameter count, importance by an explicit head mask, Hugging Face
files and PyTorch parity)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import models
import tiny_runs
from flaxen import checkpoint, config, loop, pruning
from flaxen.errors import ConfigError
from models import attention, prune

BERT = models.ModelConfig(family="bert", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=32, initializer_range=0.2)
GPT2 = models.ModelConfig(family="gpt2", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=32, initializer_range=0.2, layer_norm_eps=1e-5)
HEADS = {0: [1, 3], 1: [2]}


@functools.lru_cache(maxsize=None)
def built(config, head):
    """One model per (config, head), built once (eager initialisation compiles per parameter shape);
    the functions tested return new models and leave their input as it is."""
    return models.build_model(config, head, seed=0)


def reference_masks(arrays, k, previous=None):
    """Masks by a stable numpy sort: previously pruned first, then the smallest |w|, ties by position."""
    flat = np.concatenate([np.abs(np.asarray(a, np.float64)).reshape(-1) for a in arrays])
    if previous is not None:
        flat = np.where(np.concatenate([np.asarray(p).reshape(-1) for p in previous]), flat, -1.0)
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    return np.split(keep, np.cumsum([np.size(a) for a in arrays])[:-1])


# ----------------------------------------------------------------------------- magnitude masks


def test_masks_have_the_exact_sparsity_and_keep_the_largest_magnitudes():
    rng = np.random.default_rng(0)
    # rounded values: many ties, broken by position; one -0.0 and signs mixed
    params = {"a": np.round(rng.normal(size=(7, 5)), 1).astype(np.float32),
              "b": np.round(rng.normal(size=(3, 4, 2)), 1).astype(np.float32)}
    params["a"][0, 0] = -0.0
    n = params["a"].size + params["b"].size
    for s in (0.0, 0.1, 0.5, 0.77, 0.99, 1.0):
        masks = prune.masks_for(params, s)
        k = int(round(s * n))
        assert sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) == k
        expected = reference_masks([params["a"], params["b"]], k)
        np.testing.assert_array_equal(np.asarray(masks["a"]).reshape(-1), expected[0])
        np.testing.assert_array_equal(np.asarray(masks["b"]).reshape(-1), expected[1])
        kept = np.concatenate([np.abs(params[x])[np.asarray(masks[x])] for x in "ab"])
        dropped = np.concatenate([np.abs(params[x])[~np.asarray(masks[x])] for x in "ab"])
        assert not len(kept) or not len(dropped) or kept.min() >= dropped.max()


def test_previously_pruned_weights_are_pruned_first():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(10,)).astype(np.float32)]
    previous = [rng.random(a.shape) > 0.3 for a in arrays]
    for k in (0, 5, 12, 20, 34):
        masks = jax.jit(prune.magnitude_masks)([jnp.asarray(a) for a in arrays], k, [jnp.asarray(p) for p in previous])
        for got, want in zip(masks, reference_masks(arrays, k, previous)):
            np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)


def test_magnitude_prune_zeroes_only_block_kernels_globally():
    model = built(BERT, "seq_cls")
    before = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    pruned = prune.magnitude_prune(model, 0.6)
    after = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(pruned) if isinstance(v, nnx.Param)}
    kernels = prune.kernel_paths(BERT.num_layers)
    assert len(kernels) == 2 * 6
    for path, value in before.items():
        np.testing.assert_array_equal(np.asarray(dict(nnx.iter_graph(model))[path][...]), value)  # input unchanged
        if path not in kernels:
            np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    n = sum(before[p].size for p in kernels)
    expected = reference_masks([before[p] for p in kernels], int(round(0.6 * n)))
    for path, keep in zip(kernels, expected):
        np.testing.assert_array_equal(after[path].reshape(-1), np.where(keep, before[path].reshape(-1), 0))
    assert prune.sparsity(pruned) == int(round(0.6 * n)) / n
    assert prune.sparsity(prune.magnitude_prune(model, 0.5, include=["intermediate", "output"]),
                          ["intermediate", "output"]) == 0.5


# ----------------------------------------------------------------------------- schedule and wrapper


def gradual(**changes):
    values = dict(name="gradual", sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=50, every=7)
    values.update(changes)
    return pruning.PruneConfig(**values)


def test_schedule_is_the_cubic_of_zhu_and_gupta():
    cfg = gradual()
    assert pruning.pruning_steps(cfg) == [10, 17, 24, 31, 38, 45, 50]
    for t in range(0, 60):
        t_clamped = min(max(t, 10), 50)
        closed = 0.8 + (0.1 - 0.8) * (1 - (t_clamped - 10) / (10 * 4)) ** 3
        assert pruning.sparsity_at(cfg, t) == pytest.approx(closed, abs=1e-15)
    assert pruning.sparsity_at(cfg, 10) == 0.1 and pruning.sparsity_at(cfg, 50) == 0.8
    assert pruning.schedule(cfg, 1000) == [(t, round(1000 * pruning.sparsity_at(cfg, t))) for t in
                                           [10, 17, 24, 31, 38, 45, 50]]
    assert pruning.pruning_steps(gradual(start_step=0, end_step=6, every=2)) == [2, 4, 6]


def test_wrapper_masks_after_each_update_and_weights_stay_zero():
    model = built(BERT, "seq_cls")
    params = nnx.state(model, nnx.Param)
    selected = pruning.selected_leaves(params, prune.BLOCK_KERNELS)
    assert sum(selected) == 12
    steps = [(1, 3000), (3, 9000)]
    wrapped = pruning.gradual_pruning(optax.adam(1e-2), selected, steps)
    plain = optax.adam(1e-2)
    state, plain_state = wrapped.init(params), plain.init(params)
    update = wrapped.update  # eager, like the plain Adam beside it: the same inner updates to the bit
    rng = np.random.default_rng(0)
    previous = None
    for t in range(1, 6):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        inner, plain_state = plain.update(grads, plain_state, params)  # Adam ignores the params: same moments
        updates, state = update(grads, state, params)
        candidate = jax.tree.map(lambda p, u: p + u, params, inner)
        new_params = optax.apply_updates(params, updates)
        leaves, masks = jax.tree.leaves(new_params), jax.tree.leaves(state.masks)
        cand = jax.tree.leaves(candidate)
        kernels = [i for i, s in enumerate(selected) if s]
        if t in (1, 3):
            k = dict(steps)[t]
            expected = reference_masks([cand[i] for i in kernels], k, previous)
        for i, want in zip(kernels, expected):
            np.testing.assert_array_equal(np.asarray(masks[i]).reshape(-1), want)
            value = np.asarray(leaves[i]).reshape(-1)
            assert np.all(value[~want] == 0) and not np.any(np.signbit(value[~want]))
            np.testing.assert_array_equal(value[want], np.asarray(cand[i]).reshape(-1)[want])
        for i, s in enumerate(selected):
            if not s:
                np.testing.assert_array_equal(np.asarray(leaves[i]), np.asarray(cand[i]))
        assert sum(int(np.sum(np.asarray(leaves[i]) == 0)) for i in kernels) == (3000 if t < 3 else 9000)
        previous = expected
        params = new_params
    assert int(state.count) == 5


# ----------------------------------------------------------------------------- config


def test_config_group_and_validation():
    cfg = config.compose(["experiment=quickstart_finetune", "prune=gradual", "prune.end_step=40", "run_dir=/tmp/x"])
    assert cfg.prune.name == "gradual" and cfg.prune.sparsity == 0.5 and cfg.prune.end_step == 40
    assert config.compose(["experiment=quickstart_finetune", "prune=gradual", "run_dir=/tmp/x"]).prune.end_step == \
        cfg.steps  # default: end_step = steps
    assert config.compose(["run_dir=/tmp/x"]).prune.name == "none"
    bad = {"prune.sparsity=1.0": r"prune\.sparsity=1\.0: expected a fraction in \[0, 1\)",
           "prune.start_step=40": r"start_step < end_step <= steps",
           f"prune.end_step={cfg.steps + 1}": r"start_step < end_step <= steps",
           "prune.every=0": r"prune\.every=0",
           "prune.initial_sparsity=0.6": r"prune\.initial_sparsity=0\.6",
           "prune.include=[query,mlp]": r"prune\.include=\['query', 'mlp'\]",
           "peft=lora": r"peft=lora: gradual pruning trains the block kernels"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            config.compose(["experiment=quickstart_finetune", "prune=gradual", "prune.end_step=40", override,
                            "run_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"prune\.sparsity=0\.3 has no effect with prune\.name=none"):
        config.compose(["prune.sparsity=0.3", "run_dir=/tmp/x"])


# ----------------------------------------------------------------------------- a gradual-pruning run


PRUNE = {"name": "gradual", "sparsity": 0.5, "initial_sparsity": 0.0, "start_step": 2, "end_step": 6, "every": 2}


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def final_params(run_dir, step):
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    out = saved.restore_arrays(step, items=("params",))
    saved.close()
    return out


@pytest.fixture(scope="module")
def gradual_runs(tmp_path_factory, in_memory_task_data):
    task = in_memory_task_data("seq_cls")
    base = tmp_path_factory.mktemp("prune")
    straight, resumed = base / "straight", base / "resumed"
    settings = {f"prune.{key}": value for key, value in PRUNE.items()}
    make = lambda run_dir: tiny_runs.make_cfg(run_dir, log_every=1, eval_every=4, checkpoint_every=4, **settings)
    results = loop.train(make(straight), task_data=task)
    stopped = loop.train(make(resumed), task_data=task, should_stop=lambda step: step == 3)
    again = loop.train(make(resumed), task_data=task)
    return {"straight": straight, "resumed": resumed, "results": results, "stopped": stopped, "again": again}


def test_gradual_run_ends_at_the_target_sparsity(gradual_runs):
    saved = json.load(open(gradual_runs["straight"] / "results.json"))["prune"]
    params = final_params(gradual_runs["straight"], 8)
    kernels = [v for k, v in params.items() if prune.is_block_kernel(k)]
    n = sum(np.size(v) for v in kernels)
    assert len(kernels) == 6 and saved["weights"] == n
    assert saved["zeros"] == sum(int(np.sum(np.asarray(v) == 0)) for v in kernels) == round(0.5 * n)
    assert saved["sparsity"] == round(0.5 * n) / n and saved["target_sparsity"] == 0.5
    others = {k: v for k, v in params.items() if not prune.is_block_kernel(k) and k[-1] in ("kernel", "embedding")}
    assert others and all(np.all(np.asarray(v) != 0) for v in others.values())  # nothing else pruned


def test_gradual_run_resumes_exactly(gradual_runs):
    assert gradual_runs["stopped"] == {"status": "interrupted", "steps": 3}
    assert gradual_runs["again"]["prune"] == gradual_runs["results"]["prune"]
    assert rows(gradual_runs["resumed"]) == rows(gradual_runs["straight"])
    ours, reference = final_params(gradual_runs["resumed"], 8), final_params(gradual_runs["straight"], 8)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]), err_msg=".".join(key))


# ----------------------------------------------------------------------------- attention heads


def masked_reference(model, heads):
    """`model` with each given head's rows of the output projection set to 0: its output masked."""
    masked = nnx.clone(model)
    for layer, pruned in heads.items():
        out = masked.backbone.layers[layer].attention.out.kernel
        out.set_value(out[...].at[np.asarray(pruned)].set(0.0))
    return masked


def count(model):
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("config,head", [(BERT, "seq_cls"), (GPT2, "causal_lm")])
def test_pruned_heads_equal_masked_heads_and_shrink_the_weights(config, head):
    model = built(config, head)
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    pruned = prune.prune_heads(model, HEADS)
    assert pruned.config.pruned_heads == ((0, (1, 3)), (1, (2,)))
    attn = pruned.backbone.layers[0].attention
    assert attn.query.kernel.shape == (32, 2, 8) and attn.out.kernel.shape == (2, 8, 32)
    assert pruned.backbone.layers[1].attention.value.kernel.shape == (32, 3, 8)
    e, d = config.hidden_size, config.head_dim
    assert count(model) - count(pruned) == 3 * (4 * e * d + 3 * d)
    ours, reference = pruned(ids, attention_mask=mask), masked_reference(model, HEADS)(ids, attention_mask=mask)
    np.testing.assert_allclose(ours.last_hidden_state, reference.last_hidden_state, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.logits, reference.logits, rtol=0, atol=1e-5)
    # pruning again, with original indices, removes exactly the new heads
    twice = prune.prune_heads(pruned, {0: [0, 1], 1: [0]})
    assert twice.config.pruned_heads == ((0, (0, 1, 3)), (1, (0, 2)))
    np.testing.assert_allclose(twice(ids, attention_mask=mask).logits,
                               masked_reference(model, {0: [0, 1, 3], 1: [0, 2]})(ids, attention_mask=mask).logits,
                               rtol=0, atol=1e-5)
    full = prune.expand_pruned_heads(pruned)
    assert full.config.pruned_heads is None and count(full) == count(model)
    np.testing.assert_allclose(full(ids, attention_mask=mask).logits, ours.logits, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="layer 1 would keep none of its 4 heads"):
        prune.prune_heads(model, {1: [0, 1, 2, 3]})


def test_pruned_decoder_runs_with_its_smaller_cache():
    pruned = prune.prune_heads(built(GPT2, "causal_lm"), HEADS)
    cache = pruned.backbone.init_cache(2, 8)
    assert [k.shape[2] for k, _ in cache] == [2, 3]
    prompt = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
    cached = pruned(prompt, attention_mask=np.array([[1] * 3 + [0] * 5] * 2, np.int32), cache=cache, cache_index=0)
    assert [k.shape for k, _ in cached.cache] == [k.shape for k, _ in cache]
    np.testing.assert_allclose(cached.logits, pruned(prompt).logits, rtol=0, atol=1e-5)


def cross_entropy(model, batch):
    logits = model(batch["ids"]).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], -1))


def test_head_importance_equals_an_explicit_head_mask(monkeypatch):
    model = built(BERT, "seq_cls")
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(1, 50, size=(4, 8)).astype(np.int32),
                "labels": rng.integers(0, 2, size=(4,)).astype(np.int32)} for _ in range(3)]
    original = attention.dot_product_attention

    def explicit(xi, batch):
        """The loss with ξ multiplying each head's attention output [batch, seq, heads, head_dim]."""
        calls = iter(xi)
        monkeypatch.setattr(attention, "dot_product_attention",
                            lambda *a, **k: original(*a, **k) * next(calls)[None, None, :, None])
        try:
            return cross_entropy(model, batch)
        finally:
            monkeypatch.setattr(attention, "dot_product_attention", original)

    xi = [jnp.ones(4, jnp.float32)] * 2
    gradient = jax.jit(jax.grad(explicit))
    expected = sum(np.abs(np.stack(gradient(xi, b))) for b in batches)
    raw = prune.head_importance(model, batches, cross_entropy, normalize=False)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    normalised = prune.head_importance(model, batches, cross_entropy)
    np.testing.assert_allclose(normalised, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    # a pruned model scores its remaining heads at their original indices, and the pruned ones 0
    pruned_scores = prune.head_importance(prune.prune_heads(model, HEADS), batches, cross_entropy)
    assert pruned_scores[0, 1] == pruned_scores[0, 3] == pruned_scores[1, 2] == 0
    assert np.all(pruned_scores[0, [0, 2]] > 0)


def test_prune_fraction_of_heads_takes_the_least_important():
    model = built(BERT, "seq_cls")
    importance = np.array([[0.9, 0.1, 0.5, 0.2], [0.05, 0.8, 0.3, 0.6]], np.float32)
    smaller, chosen = prune.prune_fraction_of_heads(model, 0.25, importance)
    assert chosen == {0: [1], 1: [0]} and smaller.config.pruned_heads == ((0, (1,)), (1, (0,)))
    _, chosen = prune.prune_fraction_of_heads(model, 0.5, importance, per_layer=True)
    assert chosen == {0: [1, 3], 1: [0, 2]}
    lopsided = np.array([[0.0, 0.0, 0.0, 0.0], [1, 2, 3, 4]], np.float32)
    _, chosen = prune.prune_fraction_of_heads(model, 0.5, lopsided)  # layer 0 keeps one head
    assert chosen == {0: [0, 1, 2], 1: [0]}


# ----------------------------------------------------------------------------- Hugging Face files


def test_pruned_model_saves_loads_and_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = built(BERT, None)
    pruned = prune.prune_heads(model, HEADS)
    path = models.save_pretrained(pruned, tmp_path / "pruned")
    saved = json.load(open(os.path.join(path, "config.json")))
    assert saved["pruned_heads"] == {"0": [1, 3], "1": [2]}
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert tensors["encoder.layer.0.attention.self.query.weight"].shape == (16, 32)
    assert tensors["encoder.layer.0.attention.output.dense.weight"].shape == (32, 16)
    assert tensors["encoder.layer.1.attention.self.value.bias"].shape == (24,)

    loaded = models.load_pretrained(path)
    assert loaded.config == pruned.config
    ours = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(pruned) if isinstance(v, nnx.Param)}
    again = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(loaded) if isinstance(v, nnx.Param)}
    assert ours.keys() == again.keys()
    for key in ours:
        np.testing.assert_array_equal(again[key], ours[key], err_msg=str(key))

    # transformers 5 dropped head pruning (no pruned_heads, no prune_heads): the reference is the
    # unpruned BertModel with the pruned heads' rows of the output projection zeroed (and their
    # query/key/value zero), built here from the saved smaller tensors
    assert not hasattr(transformers.BertModel, "prune_heads")
    d, full = BERT.head_dim, {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) > 4 and parts[3] == "attention" and parts[-2] in ("query", "key", "value", "dense"):
            kept = [h for h in range(4) if h not in HEADS.get(int(parts[2]), [])]
            rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in kept])
            if parts[4] == "self":
                tensor_full = np.zeros((32,) + tensor.shape[1:], np.float32)
                tensor_full[rows] = tensor
            elif parts[-1] == "weight":
                tensor_full = np.zeros((32, 32), np.float32)
                tensor_full[:, rows] = tensor
            else:
                tensor_full = tensor
            full[name] = tensor_full
        else:
            full[name] = tensor
    reference_dir = tmp_path / "full"
    reference_dir.mkdir()
    save_file(full, str(reference_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = {k: v for k, v in saved.items() if k != "pruned_heads"}
    json.dump(hf, open(reference_dir / "config.json", "w"))
    torch_model, info = transformers.BertModel.from_pretrained(str(reference_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 9))
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = torch_model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    got = loaded(ids.astype(np.int32), attention_mask=mask.astype(np.int32))
    real = mask.astype(bool)
    assert np.abs(np.asarray(got.last_hidden_state) - expected.last_hidden_state.numpy())[real].max() <= 1e-4
    assert np.abs(np.asarray(got.pooler_output) - expected.pooler_output.numpy()).max() <= 1e-4
    # expand_pruned_heads writes exactly that full-size checkpoint
    expanded = load_file(models.save_pretrained(prune.expand_pruned_heads(pruned), tmp_path / "expanded")
                         + "/model.safetensors")
    assert expanded.keys() == full.keys()
    for name in full:
        np.testing.assert_array_equal(expanded[name], full[name], err_msg=name)
