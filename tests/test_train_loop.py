"""flaxen.loop end to end on in-memory data: exact resume, the NaN guard, frozen parameters,
checkpoint retention and early stopping."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from flaxen import checkpoint, loop, modeling

from tiny_runs import make_cfg


def restore_state(run_dir, step, task_data, cfg):
    """params, opt_state and rest of a checkpoint, restored through a second code path (a fresh
    model built from model.json and the optax state of the same optimizer)."""
    spec = modeling.read_spec(str(run_dir))
    _, params, rest = nnx.split(spec.build(0), nnx.Param, ...)
    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    out = ckpt.restore(step, params=modeling.abstract_like(params), rest=modeling.abstract_like(rest))
    ckpt.close()
    return out


@pytest.fixture(scope="module")
def seq_task(in_memory_task_data):
    return in_memory_task_data("seq_cls")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, seq_task):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    results = loop.train(make_cfg(run_dir), task_data=seq_task)
    return run_dir, results


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, seq_task, uninterrupted):
    reference_dir, reference_results = uninterrupted
    run_dir = tmp_path / "resumed"
    stopped = loop.train(make_cfg(run_dir), task_data=seq_task, should_stop=lambda step: step == 3)
    assert stopped == {"status": "interrupted", "steps": 3}
    assert not (run_dir / "results.json").exists()
    resumed = loop.train(make_cfg(run_dir), task_data=seq_task)
    assert resumed["steps"] == 8 and resumed["status"] == "completed"

    ours = restore_state(run_dir, 8, seq_task, None)
    reference = restore_state(reference_dir, 8, seq_task, None)
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ours["meta"]["rng"] == reference["meta"]["rng"]
    assert ours["data"] == reference["data"]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    reference_logged = [json.loads(line) for line in open(reference_dir / "metrics.jsonl")]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r and r["step"] > 4}
    reference_losses = {r["step"]: r["loss"] for r in reference_logged if "loss" in r and r["step"] > 4}
    assert losses == reference_losses
    assert resumed["final_eval"]["accuracy"] == reference_results["final_eval"]["accuracy"]


def test_same_config_and_seed_twice_gives_bitwise_the_same_run(tmp_path, seq_task, uninterrupted):
    reference_dir, reference_results = uninterrupted
    again = loop.train(make_cfg(tmp_path / "again"), task_data=seq_task)
    ours, reference = restore_state(tmp_path / "again", 8, seq_task, None), restore_state(reference_dir, 8, seq_task, None)
    for a, b in zip(jax.tree.leaves(ours["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again["final_eval"] == reference_results["final_eval"]
    loop.train(make_cfg(tmp_path / "seed1", seed=1), task_data=seq_task)
    other = restore_state(tmp_path / "seed1", 8, seq_task, None)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(other["params"]), jax.tree.leaves(reference["params"])))


def test_run_directory_outputs(uninterrupted):
    run_dir, results = uninterrupted
    for name in ("config.yaml", "config.json", "model.json", "metrics.jsonl", "results.json"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(train_rows[-1])
    assert [r["step"] for r in rows if "validation/accuracy" in r] == [4, 8]
    saved = json.load(open(run_dir / "results.json"))
    assert saved["steps"] == 8 and saved["parameters"]["trainable"] == saved["parameters"]["total"] > 0
    assert set(saved["final_eval"]) >= {"loss", "accuracy", "macro_f1", "report"}
    assert saved["checkpoints"]["steps"] == [4, 8]


class PoisonedTaskData:
    """Wraps a TaskData; the train loader's batch number `bad_batch` (1-based) holds token ids past
    the vocabulary, whose embedding lookup gives NaN (as a tokenizer/vocabulary mismatch would)."""

    def __init__(self, task_data, bad_batch):
        self.inner, self.bad_batch = task_data, bad_batch

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loader(self, split, batch_size, **kwargs):
        inner = self.inner.loader(split, batch_size, **kwargs)
        if split != "train":
            return inner
        bad_batch, vocab = self.bad_batch, self.inner.tokenizer.vocab_size

        class Loader:
            count = 0

            def __iter__(self):
                return self

            def __next__(self):
                batch = next(inner)
                Loader.count += 1
                if Loader.count == bad_batch:
                    batch = dict(batch, input_ids=batch["input_ids"] + vocab)
                return batch

            def get_state(self):
                return inner.get_state()

            def set_state(self, state):
                inner.set_state(state)

        return Loader()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, seq_task):
    cfg = make_cfg(tmp_path, checkpoint_every=1, log_every=4)
    with pytest.raises(loop.NonFiniteLossError, match="at step 5") as error:
        loop.train(cfg, task_data=PoisonedTaskData(seq_task, bad_batch=5))
    saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    assert saved.all_steps() == [1, 2, 3, 4]
    saved.close()
    assert f"step 4 in {tmp_path}" in str(error.value)
    state = restore_state(tmp_path, 4, seq_task, cfg)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(tmp_path, seq_task):
    head_only = nnx.All(nnx.Param, nnx.PathContains("head"))
    cfg = make_cfg(tmp_path, steps=3, eval_every=0, eval_split=None, checkpoint_every=0)
    results = loop.train(cfg, task_data=seq_task, trainable_filter=head_only)
    spec = modeling.read_spec(str(tmp_path))
    _, head, backbone = nnx.split(spec.build(cfg.seed), head_only, ...)
    assert results["parameters"]["trainable"] == modeling.count_parameters(head)
    adam_moments = 2 * 4 * modeling.count_parameters(head)
    assert results["optimizer_state_bytes"] < adam_moments + 64
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    out = ckpt.restore(3, params=modeling.abstract_like(head), rest=modeling.abstract_like(backbone))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(out["rest"]), jax.tree.leaves(backbone)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(head)))


def test_keeps_last_k_and_best_and_stops_early(tmp_path, seq_task):
    cfg = make_cfg(tmp_path, eval_every=1, checkpoint_every=1, keep_checkpoints=1,
                   best_metric="accuracy", early_stopping_patience=2)
    results = loop.train(cfg, task_data=seq_task)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [(r["step"], r["validation/accuracy"]) for r in rows if "validation/accuracy" in r]
    best_step = max(evals, key=lambda e: (e[1], -e[0]))[0]
    assert results["status"] == "early_stopping"
    assert results["steps"] == evals[-1][0] == best_step + 2
    assert results["best_eval"]["step"] == best_step
    assert results["checkpoints"]["steps"] == sorted({best_step, results["steps"]})
    assert results["checkpoints"]["best_step"] == best_step


def test_init_from_takes_the_best_step_not_the_latest_and_records_what_it_loaded(tmp_path, seq_task):
    """A source run whose best evaluation is its first (this toy run's validation loss rises from
    step 4 to 12, so best_metric=loss picks step 4): init_from copies step 4, not the latest step
    12, and results.json says so with the counts."""
    source = tmp_path / "source"
    loop.train(make_cfg(source, best_metric="loss", steps=12), task_data=seq_task)
    ckpt = checkpoint.Checkpointer(os.path.join(source, "checkpoints"), read_only=True,
                                   best_metric=("loss", "min"))
    best, latest = ckpt.best_step(), ckpt.latest_step()
    best_arrays = ckpt.restore_arrays(best)
    latest_arrays = ckpt.restore_arrays(latest)
    ckpt.close()
    assert best == 4 and latest == 12
    target = tmp_path / "target"
    # only the head trains, so the backbone at the target's step 2 is exactly what init_from loaded
    results = loop.train(make_cfg(target, init_from=str(source), steps=2, eval_every=0, log_every=1,
                                  checkpoint_every=0), task_data=seq_task, trainable_filter=nnx.PathContains("head"))
    record = results["init_from"]
    assert record["run"] == str(source) and record["step"] == 4 and record["chosen"] == "best"
    assert record["fresh"] == [] and record["parameters_fresh"] == 0
    assert record["parameters_restored"] == results["parameters"]["total"]
    start = checkpoint.Checkpointer(os.path.join(target, "checkpoints"), read_only=True)
    loaded = start.restore_arrays(2)
    start.close()
    backbone = [key for key in best_arrays if key[0] == "backbone"]
    assert backbone and any(not np.array_equal(best_arrays[k], latest_arrays[k]) for k in backbone)
    for key in backbone:
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(best_arrays[key]), err_msg=".".join(key))
