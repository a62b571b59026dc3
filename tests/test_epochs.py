"""Training length in epochs: steps = ceil(epochs * examples per epoch / batch_size), the errors for
steps and epochs together or neither, and a run whose schedule, results and resume use the resolved
steps (with a few-shot subset, balanced resampling and class weights on)."""
import json
import math
import os

import numpy as np
import pytest

from flaxen import config, loop
from flaxen.errors import ConfigError

TINY = ["experiment=quickstart_scratch", "model=bert_tiny", "model.hidden_size=16", "model.num_heads=2",
        "model.intermediate_size=32", "model.num_layers=1", "data.synthetic.num_train=64",
        "data.synthetic.num_validation=16", "progress_bar=false", "loggers=[]", "eval_split=null",
        "checkpoint_every=0", "log_every=1"]


def compose(*overrides):
    return config.compose([*TINY, *overrides])


@pytest.mark.parametrize("epochs, examples, batch, micro, steps", [
    (3, 256, 32, None, 24), (1, 100, 32, None, 4), (0.3, 1000, 10, None, 30), (2.5, 45, 8, 4, 15),
    (0.001, 10, 8, None, 1)])
def test_epochs_to_steps(epochs, examples, batch, micro, steps):
    cfg = compose("steps=null", f"epochs={epochs}", f"batch_size={batch}", f"micro_batch_size={micro or 'null'}",
                  "schedule.warmup_steps=0")
    resolved = config.resolve_epochs(cfg, examples)
    assert resolved.steps == steps == max(1, math.ceil(round(epochs * examples, 9) / batch))
    assert cfg.steps is None and resolved.epochs == epochs  # the given config is left as it was
    length = config.train_length(resolved, examples)
    assert length["set_by"] == "epochs" and length["steps"] == steps
    assert length["epochs"] == pytest.approx(steps * batch / examples)
    plain = compose("steps=40")
    assert config.resolve_epochs(plain, examples) is plain and config.train_length(plain, 80)["epochs"] == 40 * 32 / 80


def test_epochs_decides_the_length_and_errors_name_the_keys():
    # an experiment's steps (60 here) gives way to epochs
    assert config.resolve_epochs(compose("epochs=2", "batch_size=32", "schedule.warmup_steps=0"), 80).steps == 5
    with pytest.raises(ConfigError, match=r"steps and epochs are both null"):
        compose("steps=null")
    with pytest.raises(ConfigError, match=r"epochs=0.0: expected a positive number"):
        compose("steps=null", "epochs=0")
    cfg = compose("steps=null", "epochs=1", "schedule.warmup_steps=10", "batch_size=32")
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps=10 exceeds steps=2 \(from epochs=1.0\)"):
        config.resolve_epochs(cfg, 64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same epochs-long run uninterrupted, and stopped after step 2 then resumed."""
    base = tmp_path_factory.mktemp("epochs")
    data_dir = base / "data"
    data_dir.mkdir()
    overrides = ["steps=null", "epochs=2", "batch_size=8", "schedule.warmup_steps=1", "optimizer.lr=0.01",
                 "data.train_examples_per_class=5", "data.resample=balanced", "task.class_weights=[1,2,3,4]",
                 f"data_dir={data_dir}"]
    whole_cfg = compose(*overrides, f"run_dir={base / 'whole'}")
    stopped_cfg = compose(*overrides, f"run_dir={base / 'stopped'}")
    whole = loop.train(whole_cfg)
    stopped = loop.train(stopped_cfg, should_stop=lambda step: step == 2)
    resumed = loop.train(stopped_cfg)
    return {"base": base, "whole": whole, "stopped": stopped, "resumed": resumed, "cfg": whole_cfg}


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_trains_the_resolved_steps_and_records_both(runs):
    results = runs["whole"]
    # 4 labels x 5 examples (resampled: every label 5 times per epoch) = 20 rows, 2 epochs at batch 8
    assert results["steps"] == 5 == math.ceil(2 * 20 / 8)
    assert results["train_length"] == {"steps": 5, "epochs": 2.0, "epoch_examples": 20, "batch_size": 8,
                                       "set_by": "epochs", "epochs_given": 2.0}
    assert results["train_data"]["class_counts"] == {"animal": 5, "person": 5, "machine": 5, "food": 5}
    assert results["train_data"]["class_weights"] == {"animal": 1.0, "person": 2.0, "machine": 3.0, "food": 4.0}
    from omegaconf import OmegaConf

    saved = OmegaConf.load(os.path.join(runs["base"], "whole", "config.yaml"))
    assert saved.steps == 5 and saved.epochs == 2.0 and list(saved.task.class_weights) == [1, 2, 3, 4]
    # warmup_linear over the resolved 5 steps: 0 at step 0, then lr decaying linearly to 0 at step 5
    lr = 0.01
    want = [0.0, lr, 0.75 * lr, 0.5 * lr, 0.25 * lr]
    assert np.allclose([row["learning_rate"] for row in _metrics(os.path.join(runs["base"], "whole"))], want,
                       rtol=1e-6, atol=1e-12)


def test_interrupted_epochs_run_resumes_to_the_same_run(runs):
    assert runs["stopped"]["status"] == "interrupted" and runs["stopped"]["steps"] == 2
    assert runs["resumed"]["steps"] == 5 and runs["resumed"]["train_length"] == runs["whole"]["train_length"]
    whole, resumed = (_metrics(os.path.join(runs["base"], name)) for name in ("whole", "stopped"))
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in whole]
    with open(os.path.join(runs["base"], "stopped", "commands.jsonl")) as f:
        starts = [json.loads(line) for line in f]
    assert [s["start"] for s in starts] == ["new", "resume"] and starts[1]["changed"] == {}
