"""DP-SGD (flaxen.privacy, flaxen.steps.private_gradient, flaxen.data.pipeline.PoissonLoader):
per-example gradients against a loop over single examples, clipping, the noise's standard
deviation with and without gradient accumulation, epsilon against dp_accounting's own
computation, target-epsilon calibration, the Poisson loader's draws and resume, a train run end
to end (epsilon in metrics.jsonl and results.json, exact resume), and bad configs."""
import functools
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

import models
from flaxen import config, loop, privacy, steps, tasks
from flaxen.errors import ConfigError

from tiny_runs import make_cfg

TINY = dict(family="bert", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
ROWS = 8


@functools.lru_cache(maxsize=None)
def _setup(task_name, dropout=0.0, seed=0):
    """(graphdef, params, rest) of the tiny model, one per arguments for the whole module, so the
    jitted functions below (keyed by the same arguments) compile once."""
    cfg = models.ModelConfig(**{**TINY, "hidden_dropout": dropout, "attention_dropout": dropout})
    num_labels = 3
    model = models.build_model(cfg, tasks.get(task_name).head, num_labels, seed=seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


@functools.lru_cache(maxsize=None)
def _per_example_grads(task_name):
    """steps.per_example_grads on `_setup(task_name)`, jitted: f(params, batch)."""
    graphdef, _, rest = _setup(task_name)
    return jax.jit(lambda p, b: steps.per_example_grads(graphdef, task_name, p, rest, b))


@functools.lru_cache(maxsize=None)
def _private_gradient(plan_values, accum_steps, noise=True, lengths=(), dropout=0.0):
    """steps.private_gradient of seq_cls on `_setup("seq_cls", dropout)`, jitted: f(params, batch, key).
    plan_values: (clip_norm, noise_multiplier, batch_size)."""
    graphdef, _, rest = _setup("seq_cls", dropout)
    plan = types.SimpleNamespace(**dict(zip(("clip_norm", "noise_multiplier", "batch_size"), plan_values)))
    return jax.jit(lambda p, b, key: steps.private_gradient(graphdef, "seq_cls", plan, p, rest, b, key, accum_steps,
                                                            noise=noise, lengths=lengths))


def _batch(task_name, rows=ROWS, seq=12, seed=0, valid=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 50, (rows, seq)).astype(np.int32)
    lengths = rng.integers(3, seq + 1, rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    valid = np.ones(rows, np.int32) if valid is None else np.asarray(valid, np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "valid": valid}
    if task_name == "seq_cls":
        batch["labels"] = np.where(valid == 1, rng.integers(0, 3, rows), -100).astype(np.int32)
    else:
        labels = rng.integers(0, 3, (rows, seq))
        scored = (mask == 1) & (rng.random((rows, seq)) < 0.6)
        scored[:, 0] = True
        batch["labels"] = np.where(scored & (valid[:, None] == 1), labels, -100).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _single_example_grad(task_name):
    """The gradient of one row's loss, written out by hand on the model called on a one-row batch
    (no vmap), on `_setup(task_name)`, jitted: f(params, one)."""
    graphdef, _, rest = _setup(task_name)

    def loss(params, one):
        model = nnx.merge(graphdef, params, rest)
        output = model(one["input_ids"], attention_mask=one["attention_mask"], token_type_ids=one["token_type_ids"])
        labels, valid = one["labels"], one["valid"].astype(jnp.float32)
        if task_name == "seq_cls":
            safe = jnp.where(labels == -100, 0, labels)
            nll = -jax.nn.log_softmax(output.logits)[0, safe[0]]
            return jnp.where(valid[0] > 0, nll, 0.0)
        scored = labels != -100
        logp = jax.nn.log_softmax(output.logits)[0]
        picked = jnp.take_along_axis(logp, jnp.where(scored, labels, 0)[0][:, None], axis=-1)[:, 0]
        total = -jnp.sum(jnp.where(scored[0], picked, 0.0))
        return total / jnp.maximum(jnp.sum(scored), 1) * valid[0]

    return jax.jit(jax.grad(loss))


def _loop_grads(task_name, batch):
    """Each row's gradient by itself: the model called on the one-row batch, outside any vmap."""
    _, params, _ = _setup(task_name)
    grad = _single_example_grad(task_name)
    return [grad(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(batch["input_ids"].shape[0])]


@pytest.mark.parametrize("task_name", ["seq_cls", "token_cls"])
def test_per_example_gradients_equal_a_loop_over_single_examples(task_name):
    _, params, _ = _setup(task_name)
    valid = np.ones(ROWS, np.int32)
    valid[[2, 7]] = 0  # padding rows contribute nothing
    batch = _batch(task_name, valid=valid)
    grads, _ = _per_example_grads(task_name)(params, batch)
    reference = _loop_grads(task_name, batch)
    for i, expected in enumerate(reference):
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda g: g[i], grads)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
        if not valid[i]:
            assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(expected))
    norms = steps.per_example_norms(grads)
    assert np.all(np.asarray(norms)[valid == 1] > 0) and np.all(np.asarray(norms)[valid == 0] == 0)


def test_clipped_gradients_have_norm_at_most_c_and_sum_as_clipped_loop():
    _, params, _ = _setup("seq_cls")
    batch = _batch("seq_cls")
    grads, _ = _per_example_grads("seq_cls")(params, batch)
    norms = np.asarray(steps.per_example_norms(grads))
    clip = float(np.median(norms))  # half the rows are clipped, half are not
    factors = steps.clip_factors(jnp.asarray(norms), clip)
    clipped = jax.tree.map(lambda g: g * factors.reshape((-1,) + (1,) * (g.ndim - 1)), grads)
    clipped_norms = np.asarray(steps.per_example_norms(clipped))
    assert np.all(clipped_norms <= clip * (1 + 1e-6))
    small = norms <= clip
    np.testing.assert_allclose(clipped_norms[small], norms[small], rtol=1e-6)  # rows within C are untouched
    np.testing.assert_allclose(clipped_norms[~small], clip, rtol=1e-6)
    mean, stats = _private_gradient((clip, 0.0, ROWS), 1, noise=False)(params, batch, jax.random.key(0))
    reference = _loop_grads("seq_cls", batch)
    for path_leaves in zip(jax.tree.leaves(mean), *[jax.tree.leaves(g) for g in reference]):
        got, rows = path_leaves[0], path_leaves[1:]
        scales = [min(1.0, clip / n) for n in norms]
        want = sum(s * np.asarray(r) for s, r in zip(scales, rows)) / ROWS
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert float(stats[1]) == ROWS and float(stats[2]) == float(np.sum(norms > clip))


@functools.lru_cache(maxsize=None)
def _noise_fn(plan_values, accum_steps, dropout):
    """f(params, batch, key) -> the noisy and the noiseless mean gradient of seq_cls with the same key
    (same dropout), in one jitted program."""
    noisy = _private_gradient(plan_values, accum_steps, dropout=dropout)
    clean = _private_gradient(plan_values, accum_steps, noise=False, dropout=dropout)
    return jax.jit(lambda p, b, key: (noisy(p, b, key)[0], clean(p, b, key)[0]))


def _noise(params, batch, plan_values, accum_steps, key, dropout=0.0):
    """(noisy - noiseless mean gradient) flattened, with the same key (same dropout)."""
    noisy, clean = _noise_fn(plan_values, accum_steps, dropout)(params, batch, key)
    return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean))])


@pytest.mark.parametrize("accum_steps", [1, 4])
def test_noise_standard_deviation_is_sigma_c_over_b_once_per_batch(accum_steps):
    _, params, _ = _setup("seq_cls", dropout=0.1)
    batch = _batch("seq_cls")
    diff = _noise(params, batch, (0.5, 1.3, ROWS), accum_steps, jax.random.key(3, impl="rbg"), dropout=0.1)
    expected = 1.3 * 0.5 / ROWS
    # thousands of coordinates: the sample std is within a few percent of the configured std
    assert diff.size > 3000
    assert abs(diff.std() / expected - 1) < 4 / math.sqrt(2 * diff.size) + 0.01
    assert abs(diff.mean()) < 4 * expected / math.sqrt(diff.size)


def test_accumulation_sums_clipped_gradients_before_one_noise():
    """Micro-batches (some all padding, so skipped) give the large batch's clipped sum; the noise
    of the accumulated gradient has std sigma C / B, not sqrt(micro-batches) times that."""
    _, params, _ = _setup("seq_cls")
    valid = np.array([1, 0, 1, 1, 0, 0, 1, 0] * 2, np.int32)
    batch = _batch("seq_cls", rows=16, valid=valid)
    lengths = np.array([3, 12, 4, 7, 5, 9, 12, 3, 8, 2, 11, 4, 6, 12, 3, 10])
    batch["attention_mask"] = jnp.asarray((np.arange(12)[None, :] < lengths[:, None]).astype(np.int32))
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
    plan = (0.05, 2.0, 8)
    key = jax.random.key(1, impl="rbg")
    whole, whole_stats = _private_gradient(plan, 1, noise=False)(params, batch, key)
    for accum in (2, 4, 8):
        # lengths: micro-batches whose rows all fit run cut to 4 or 8 of the batch's 12 positions
        parts, stats = _private_gradient(plan, accum, noise=False, lengths=(4, 8))(params, batch, key)
        for a, b in zip(jax.tree.leaves(parts), jax.tree.leaves(whole)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats), np.asarray(whole_stats), rtol=1e-6)
    diff = _noise(params, batch, plan, 8, key)
    assert abs(diff.std() / (2.0 * 0.05 / 8) - 1) < 0.05


def _plain_cfg(**values):
    """A TrainConfig with the schema's defaults and `values` merged in."""
    return OmegaConf.merge(OmegaConf.structured(config.TrainConfig), values)


def _dp_accounting_epsilon(sigma, q, steps_done, delta, accountant):
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps_done)
    counter = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    return counter.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting(accountant):
    cfg = _plain_cfg(batch_size=64, steps=500, privacy={"name": "dp_sgd", "noise_multiplier": 0.9,
                                                        "accountant": accountant})
    plan = privacy.plan(cfg, 10_000)
    assert plan.sampling_rate == 64 / 10_000 and plan.delta == 1 / 10_000
    for done in (1, 100, 500):
        assert plan.epsilon(done) == _dp_accounting_epsilon(0.9, 0.0064, done, 1e-4, accountant)
    assert plan.record(500)["epsilon"] == plan.epsilon(500) and plan.epsilon(0) == 0.0


def test_target_epsilon_chooses_the_smallest_sigma_within_budget():
    cfg = _plain_cfg(batch_size=128, steps=300, privacy={"name": "dp_sgd", "target_epsilon": 3.0, "delta": 1e-5})
    plan = privacy.plan(cfg, 20_000)
    sigma = plan.noise_multiplier
    reached = _dp_accounting_epsilon(sigma, 128 / 20_000, 300, 1e-5, "rdp")
    assert reached <= 3.0 and reached > 2.99
    assert _dp_accounting_epsilon(sigma - 2e-3, 128 / 20_000, 300, 1e-5, "rdp") > 3.0


# ---------------------------------------------------------------------- Poisson loader


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """The generated quickstart_cls data (seq_cls, 256 train sentences) as a real TaskData."""
    from flaxen.data import load_task_data

    data_dir = tmp_path_factory.mktemp("data")
    cfg = config.compose(["experiment=quickstart_scratch", f"data_dir={data_dir}", "run_dir=unused"])
    return load_task_data(cfg.data, tasks.get("seq_cls"), str(data_dir), presets=config.data_preset)


def test_poisson_loader_draws_per_seed_and_step_with_the_expected_size_and_resumes(synthetic_data):
    n = synthetic_data.num_examples("train")
    rate, max_rows = 32 / n, privacy.poisson_max_rows(32, n, 8)
    assert max_rows % 8 == 0 and max_rows > 32
    make = lambda seed=0, **kw: synthetic_data.poisson_loader("train", rate=rate, max_rows=max_rows, seed=seed, **kw)
    first, again, other = make(), make(), make(seed=1)
    sizes = []
    for _ in range(300):
        a, b, _ = next(first), next(again), next(other)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert a["input_ids"].shape[0] == max_rows
        sizes.append(int(a["valid"].sum()))
        assert sizes[-1] == first.last_drawn
    assert not all(np.array_equal(next(make())["input_ids"], next(other)["input_ids"]) for _ in range(3))
    # Binomial(n, q) sizes: mean q n = 32 within 4 standard errors
    assert abs(np.mean(sizes) - 32) < 4 * math.sqrt(32 * (1 - rate) / len(sizes))
    assert abs(np.var(sizes) - 32 * (1 - rate)) < 0.35 * 32
    # the rows of a batch are exactly its drawn records, in stored order
    loader = make()
    chosen, drawn = loader.sample(0)
    batch = next(loader)
    rows = [synthetic_data.task.rows(synthetic_data, "train", False, 0)[int(i)] for i in chosen]
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][index, :len(row["input_ids"])], row["input_ids"])
        assert batch["labels"][index] == row["labels"]
    # resume: a fresh loader set to a saved state yields what the original yields next
    for _ in range(4):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # two processes: their rows together are the one-process batch's rows
    whole = next(make())
    halves = [next(make(process_index=p, process_count=2)) for p in range(2)]
    assert sorted(map(tuple, np.concatenate([h["input_ids"] for h in halves]).tolist())) == \
        sorted(map(tuple, whole["input_ids"].tolist()))


def test_poisson_loader_truncates_and_counts_an_overflow(synthetic_data):
    n = synthetic_data.num_examples("train")
    loader = synthetic_data.poisson_loader("train", rate=0.5, max_rows=8, seed=0)
    batch = next(loader)
    assert batch["valid"].sum() == 8 and loader.last_drawn > 8
    assert loader.truncated_batches == 1 and loader.dropped_rows == loader.last_drawn - 8
    assert loader.get_state()["truncated_batches"] == 1
    assert privacy.poisson_max_rows(n // 2, n) >= n // 2


# ---------------------------------------------------------------------- train() end to end

SMALL = ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=1",
         "batch_size=16", "micro_batch_size=8", "eval_batch_size=64", "progress_bar=false", "loggers=[]",
         "privacy=dp_sgd", "privacy.noise_multiplier=null", "privacy.target_epsilon=2.0", "privacy.clip_norm=0.5",
         "optimizer.clip_norm=0", "steps=4", "log_every=2", "eval_every=0", "checkpoint_every=2",
         "schedule.warmup_steps=1"]


def test_dp_sgd_run_logs_epsilon_and_resumes_exactly(tmp_path, synthetic_data):
    from test_train_loop import restore_state

    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    compose = lambda run_dir: config.compose(["experiment=quickstart_scratch", *SMALL, f"data_dir={data_dir}",
                                              f"run_dir={run_dir}"])
    run_dir = tmp_path / "dp"
    results = loop.train(compose(run_dir), task_data=synthetic_data)
    record = results["privacy"]
    n = synthetic_data.num_examples("train")
    assert record["steps"] == 4 and record["sampling_rate"] == 16 / n and record["delta"] == 1 / n
    assert record["epsilon"] == _dp_accounting_epsilon(record["noise_multiplier"], 16 / n, 4, 1 / n, "rdp")
    assert 1.99 < record["epsilon"] <= 2.0 and record["accountant"] == "rdp" and record["truncated_batches"] == 0
    with open(run_dir / "results.json") as f:
        assert json.load(f)["privacy"] == record
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    logged = {r["step"]: r for r in rows if "epsilon" in r}
    assert sorted(logged) == [2, 4]
    assert logged[2]["epsilon"] == _dp_accounting_epsilon(record["noise_multiplier"], 16 / n, 2, 1 / n, "rdp")
    assert logged[4]["epsilon"] == record["epsilon"] and 0 <= logged[4]["clipped_fraction"] <= 1
    assert logged[4]["examples"] > 0

    resumed_dir = tmp_path / "resumed"
    stopped = loop.train(compose(resumed_dir), task_data=synthetic_data, should_stop=lambda step: step == 2)
    assert stopped["status"] == "interrupted"
    longer = compose(resumed_dir)
    longer.steps = 6
    with pytest.raises(ConfigError, match="steps: 4 -> 6: privacy.target_epsilon"):
        loop.train(longer, task_data=synthetic_data)
    assert loop.train(compose(resumed_dir), task_data=synthetic_data)["privacy"] == record
    ours, reference = restore_state(resumed_dir, 4, None, None), restore_state(run_dir, 4, None, None)
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ours["data"] == reference["data"]


def test_fixed_sampling_trains_on_the_usual_batches(tmp_path, in_memory_task_data):
    data = in_memory_task_data("token_cls")
    cfg = make_cfg(tmp_path, task="token_cls", steps=2, eval_every=0, checkpoint_every=0,
                   **{"privacy.name": "dp_sgd", "privacy.noise_multiplier": 1.0, "privacy.sampling": "fixed"})
    results = loop.train(cfg, task_data=data)
    assert results["privacy"]["sampling"] == "fixed" and "estimate" in results["privacy"]["accounting"]
    assert results["privacy"]["epsilon"] == _dp_accounting_epsilon(1.0, 8 / 64, 2, 1 / 64, "rdp")


# ---------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides, key", [
    (["privacy.clip_norm=0"], "privacy.clip_norm=0"),
    (["privacy.clip_norm=-1"], "privacy.clip_norm=-1"),
    (["privacy.target_epsilon=8"], "privacy.target_epsilon=8.0 are both set"),
    (["privacy.noise_multiplier=null"], "privacy.noise_multiplier and privacy.target_epsilon are both null"),
    (["privacy.noise_multiplier=0"], "privacy.noise_multiplier=0"),
    (["privacy.noise_multiplier=null", "privacy.target_epsilon=-1"], "privacy.target_epsilon=-1"),
    (["privacy.sampling=shuffle"], "privacy.sampling='shuffle'"),
    (["privacy.accountant=moments"], "privacy.accountant='moments'"),
    (["privacy.delta=1.5"], "privacy.delta=1.5"),
    (["privacy.name=dp"], "privacy.name='dp'"),
    (["data.length_grouping=8"], "data.length_grouping=8"),
    (["task=mlm", "data=quickstart"], "task mlm's train rows"),
])
def test_bad_privacy_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
        config.compose(["experiment=quickstart_scratch", "privacy=dp_sgd", *overrides])


def test_privacy_keys_without_dp_sgd_are_refused():
    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier=2\.0 has no effect with privacy\.name=none"):
        config.compose(["experiment=quickstart_scratch", "privacy.noise_multiplier=2"])


def test_a_missing_accountant_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import dp_accounting -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'flaxen\[privacy\]'"):
        privacy.epsilon(1.0, 0.01, 10, 1e-5)
