"""LoRA through the training system: a LoRA fine-tune from a base checkpoint (init_from), run
once straight through and once interrupted and resumed, checked against closed-form parameter
counts, the base checkpoint itself (frozen weights bitwise unchanged), the uninterrupted run
(bitwise resume) and eval.py's rebuild of the run (the loop's final evaluation).

The base checkpoint holds a plain model's parameters drawn from numpy's generator, saved as a run
saves its checkpoints (training or initialising it in JAX would only add compiles), so a copied
weight is told apart from the LoRA model's own initialisation."""
import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import models
import tiny_runs
from flaxen import checkpoint, config, evaluation_run, loop, modeling
from flaxen.errors import CheckpointError
from models import peft

TINY = tiny_runs.TINY
HIDDEN, LABELS, RANK = TINY["hidden_size"], 2, 2
LORA = {"name": "lora", "rank": RANK, "alpha": 4, "dropout": 0.1, "target_modules": ["query", "value"]}


def make_cfg(run_dir, **overrides):
    """tests/tiny_runs.py's tiny seq_cls run: 4 steps at lr 1e-2, checkpoints every 2, no evaluation."""
    settings = {"steps": 4, "eval_every": 0, "checkpoint_every": 2, "optimizer.lr": 1e-2, "schedule.warmup_steps": 1}
    return tiny_runs.make_cfg(run_dir, **{**settings, **overrides})


def arrays(run_dir, step, items=("params", "rest")):
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    out = saved.restore_arrays(step, items=items)
    saved.close()
    return out


def plain_spec(**changes):
    values = {k: v for k, v in TINY.items() if k != "name"}
    values.update(changes)
    return modeling.ModelSpec(models.ModelConfig.from_dict(values), "seq_cls", LABELS)


def save_base_checkpoint(run_dir):
    _, params, rest = nnx.split(plain_spec().build_abstract(), nnx.Param, ...)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), params)
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
    saved.save(1, params=params, opt_state=optax.sgd(0.1).init(params), rest=rest, meta={"step": 1})
    saved.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, in_memory_task_data):
    task = in_memory_task_data("seq_cls")
    base = tmp_path_factory.mktemp("peft")
    base_dir, lora_dir, resumed_dir = base / "base", base / "lora", base / "resumed"
    save_base_checkpoint(base_dir)
    lora_cfg = dict(peft=LORA, init_from=str(base_dir))
    results = loop.train(make_cfg(lora_dir, **lora_cfg), task_data=task)
    stopped = loop.train(make_cfg(resumed_dir, **lora_cfg), task_data=task, should_stop=lambda step: step == 2)
    resumed = loop.train(make_cfg(resumed_dir, **lora_cfg), task_data=task)
    return {"task": task, "base_dir": base_dir, "lora_dir": lora_dir, "resumed_dir": resumed_dir,
            "results": results, "stopped": stopped, "resumed": resumed}


def test_lora_trains_only_its_factors_and_the_head(runs):
    base = arrays(runs["base_dir"], 1)
    tuned = arrays(runs["lora_dir"], 4)
    frozen = arrays(runs["lora_dir"], 4, items=("rest",))
    assert set(frozen) == set(base) - {k for k in base if k[0] == "head"}
    for key in frozen:
        np.testing.assert_array_equal(np.asarray(frozen[key]), np.asarray(base[key]), err_msg=".".join(key))
    lora_keys = {k for k in tuned if k[-1] in ("lora_a", "lora_b")}
    assert {k[-2:] for k in lora_keys} == {(m, f) for m in ("query", "value") for f in ("lora_a", "lora_b")}
    assert all(np.abs(np.asarray(tuned[k])).max() > 0 for k in lora_keys if k[-1] == "lora_b")

    trainable = set(tuned) - set(frozen)
    assert trainable == lora_keys | {k for k in base if k[0] == "head"}
    opt_keys = {k for k, v in arrays(runs["lora_dir"], 4, items=("opt_state",)).items() if np.ndim(v) > 0}
    owners = {k: [p for p in trainable if k[-len(p):] == p] for k in opt_keys}
    assert all(owners.values()), [k for k, p in owners.items() if not p]
    assert {p for found in owners.values() for p in found} == trainable


def test_results_record_the_peft_split(runs):
    saved = json.load(open(runs["lora_dir"] / "results.json"))
    plain = modeling.count_parameters(nnx.state(plain_spec().build_abstract(), nnx.Param))
    lora = 2 * RANK * (HIDDEN + HIDDEN)
    head = HIDDEN * LABELS + LABELS
    assert saved["parameters"]["total"] == plain + lora
    assert saved["parameters"]["trainable"] == lora + head
    assert saved["parameters"]["trainable_percent"] == pytest.approx(100 * (lora + head) / (plain + lora))
    adam_moments = 2 * 4 * (lora + head)
    assert adam_moments <= saved["optimizer_state_bytes"] < adam_moments + 64
    assert saved["peft"]["name"] == "lora" and saved["peft"]["rank"] == RANK
    assert saved["init_from"]["fresh"] == sorted(
        ".".join(k) for k in arrays(runs["lora_dir"], 4, items=("params",)) if k[0] != "head")
    spec = json.load(open(runs["lora_dir"] / "model.json"))
    assert spec["peft"] == {**LORA, "alpha": 4.0, "rslora": False, "modules_to_save": [], "base_quantization": "none",
                            "base_quantization_group_size": 0}


def test_resumed_lora_run_is_bitwise_identical(runs):
    assert runs["stopped"] == {"status": "interrupted", "steps": 2}
    assert runs["resumed"]["status"] == "completed"
    ours, reference = arrays(runs["resumed_dir"], 4), arrays(runs["lora_dir"], 4)
    assert ours.keys() == reference.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]), err_msg=".".join(key))
    assert runs["resumed"]["final_eval"]["loss"] == runs["results"]["final_eval"]["loss"]


def test_eval_rebuilds_the_lora_model(runs, monkeypatch):
    monkeypatch.setattr(evaluation_run, "_load_task_data", lambda cfg, run_dir=None: runs["task"])
    run_dir = str(runs["lora_dir"])
    overrides = [f"run_dir={run_dir}", "step=4", "eval_batch_size=8", f"data_dir={run_dir}"]
    report = evaluation_run.evaluate_from_config(config.compose(overrides, config_name="eval"), overrides)
    final = runs["results"]["final_eval"]
    assert report["step"] == 4
    assert report["metrics"]["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert report["metrics"]["accuracy"] == final["accuracy"]


def test_init_from_a_base_without_some_frozen_weights_is_refused(runs):
    model = dataclasses.replace(plain_spec(num_layers=2), peft=LORA).build_abstract()
    _, params, rest = nnx.split(model, peft.trainable_filter(model), ...)
    with pytest.raises(CheckpointError, match=r"frozen parameters backbone\.layers\.1\."):
        loop._init_from(str(runs["base_dir"]), params, rest, log=lambda *a: None)


def test_peft_presets_compose_with_the_finetune_experiment():
    for name in ("lora", "adapter", "prefix", "bitfit"):
        cfg = config.compose(["experiment=quickstart_finetune", f"peft={name}", "run_dir=/tmp/x"])
        assert cfg.peft.name == name
