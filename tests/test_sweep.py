"""Hyperparameter search: `python train.py -m hparams_search=finetune ...` (configs/hparams_search/,
flaxen/sweep.py) as a user runs it, on a tiny fine-tuning preset (the quickstart classification data,
one 32-wide layer) written into a --config-dir; each trial trains 3 steps (epochs=0.375 of 64
examples at batch 8, the preset's unit of training length).

- A 2-trial TPE sweep minimizing the validation loss (3 steps from scratch barely move the accuracy
  off chance, 0.25 for both trials; the loss tells trials apart): each trial trains from scratch in
  its own run directory (trial_0, trial_1), with the values Optuna sampled (read back from the
  study's SQLite storage, a second record besides flaxen's) and different from the other trial's;
  the value each trial returned to Optuna is the lowest validation loss its metrics.jsonl logged;
  trials.jsonl and optimization_results.yaml agree with the study.
- The preset's own objective (accuracy, maximize): a trial that diverges (learning rate 1e30) is
  recorded as failed while the other trial completes and returns its best logged accuracy.
  scripts/reproduce.py --search records the sweep (command, trials, best completed trial).
- The checks before a trial trains (flaxen.sweep.check), in-process: no evaluation, a direction
  against the metric, a run directory that already holds a run.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
optuna = pytest.importorskip("optuna")

from flaxen import config, sweep  # noqa: E402
from flaxen.errors import ConfigError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "sweep_tiny"
PRESET = f"""# @package _global_
defaults:
  - override /model: gpt_nano
  - override /task: seq_cls
  - override /data: quickstart_cls
experiment_name: {EXPERIMENT}
model: {{hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1, max_position_embeddings: 64}}
data: {{synthetic: {{num_train: 64, num_validation: 64}}}}
batch_size: 8
eval_batch_size: 64
log_every: 1
eval_every: 1
checkpoint_every: 0
progress_bar: false
loggers: []
"""
# the search at test size: epochs (3 steps) and warmup fixed on the command line, so lr and weight decay are sampled
FIXED = ["epochs=0.375", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    conf, data = base / "conf" / "experiment", base / "data"
    os.makedirs(conf)
    os.makedirs(data)
    (conf / f"{EXPERIMENT}.yaml").write_text(PRESET)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    return {"base": base, "config_dir": str(base / "conf"), "data_dir": str(data), "env": env,
            "cache": str(base / "xla_cache")}


def run_sweep(workdir, name: str, *overrides) -> tuple[str, str, subprocess.CompletedProcess]:
    """Runs a 2-trial sweep into <base>/<name> with the study in <base>/<name>.db."""
    sweep_dir, db = str(workdir["base"] / name), str(workdir["base"] / f"{name}.db")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "-m", "--config-dir", workdir["config_dir"],
               "hparams_search=finetune", f"experiment={EXPERIMENT}", "hydra.sweeper.n_trials=2",
               f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweeper.study_name={name}",
               f"data_dir={workdir['data_dir']}", f"compilation_cache_dir={workdir['cache']}", *overrides]
    result = subprocess.run(command, cwd=str(workdir["base"]), env=workdir["env"], capture_output=True, text=True,
                            timeout=600)
    return sweep_dir, f"sqlite:///{db}", result


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def best_logged(run_dir: str, metric: str, best=max) -> float:
    """The best validation `metric` among metrics.jsonl's evaluation rows."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    values = [row[f"validation/{metric}"] for row in rows if f"validation/{metric}" in row]
    assert len(values) == 3  # eval_every=1, 3 steps
    return best(values)


def test_two_trial_sweep_runs_each_trial_in_its_own_directory_and_returns_its_best_metric(workdir):
    sweep_dir, storage, result = run_sweep(workdir, "search", *FIXED, "best_metric=loss",
                                           "hydra.sweeper.direction=minimize")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "error:" not in result.stderr

    study = optuna.load_study(study_name="search", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert sorted(name for name in os.listdir(sweep_dir) if name.startswith("trial_")) == ["trial_0", "trial_1"]

    records = read_jsonl(os.path.join(sweep_dir, sweep.TRIALS_FILE))
    assert [r["trial"] for r in records] == [0, 1]
    for trial, record in zip(trials, records):
        run_dir = os.path.join(sweep_dir, f"trial_{trial.number}")
        saved = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
        assert os.path.realpath(saved.run_dir) == os.path.realpath(run_dir)
        assert set(trial.params) == {"optimizer.lr", "optimizer.weight_decay"}
        for key, value in trial.params.items():  # the run trained with what Optuna sampled
            assert OmegaConf.select(saved, key) == pytest.approx(value, rel=1e-12)
        assert saved.epochs == 0.375 and saved.schedule.warmup_steps == 1
        results = json.load(open(os.path.join(run_dir, "results.json")))
        assert results["status"] == "completed" and results["steps"] == 3
        assert results["best_metric"] == {"name": "loss", "mode": "min"}
        assert trial.value == results["best_eval"]["loss"] == best_logged(run_dir, "loss", min)
        assert os.path.realpath(record["run_dir"]) == os.path.realpath(run_dir)
        assert record["status"] == "completed" and record["value"] == trial.value
        assert record["metric"] == "loss" and record["direction"] == "minimize"
        assert record["params"] == {"optimizer.lr": OmegaConf.select(saved, "optimizer.lr"),
                                    "optimizer.weight_decay": OmegaConf.select(saved, "optimizer.weight_decay"),
                                    "schedule.warmup_steps": 1, "epochs": 0.375}
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in record["overrides"]
    assert trials[0].params["optimizer.lr"] != trials[1].params["optimizer.lr"]
    assert trials[0].params["optimizer.weight_decay"] != trials[1].params["optimizer.weight_decay"]
    assert trials[0].value != trials[1].value

    with open(os.path.join(sweep_dir, "optimization_results.yaml")) as f:
        best = yaml.safe_load(f)
    top = min(trials, key=lambda t: t.value)
    assert best["best_value"] == min(t.value for t in trials)
    assert best["best_params"] == pytest.approx(top.params, rel=1e-12)


def test_a_diverged_trial_is_recorded_as_failed_and_the_search_goes_on(workdir):
    # the preset's TPE sampler (seed 0, optuna 2.10.1 as setup.cfg pins it) draws 1e-3, then 1e30
    sweep_dir, storage, result = run_sweep(workdir, "diverge", *FIXED, "optimizer.lr=choice(1e30,1e-3)",
                                           "optimizer.weight_decay=0.01")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    trials = {t.params["optimizer.lr"]: t for t in optuna.load_study(study_name="diverge", storage=storage).trials}
    assert set(trials) == {1e30, 1e-3}, f"the sampler drew {[t.params for t in trials.values()]}"
    assert trials[1e30].state == optuna.trial.TrialState.FAIL and trials[1e30].value is None
    assert trials[1e-3].state == optuna.trial.TrialState.COMPLETE
    records = {r["params"]["optimizer.lr"]: r for r in read_jsonl(os.path.join(sweep_dir, sweep.TRIALS_FILE))}
    assert records[1e30]["status"] == "failed" and records[1e30]["value"] is None
    assert records[1e30]["error"].startswith("NonFiniteLossError")
    good = os.path.join(sweep_dir, f"trial_{trials[1e-3].number}")
    assert records[1e-3]["value"] == trials[1e-3].value == best_logged(good, "accuracy", max)
    assert records[1e-3]["metric"] == "accuracy" and records[1e-3]["direction"] == "maximize"
    with open(os.path.join(sweep_dir, "optimization_results.yaml")) as f:
        assert yaml.safe_load(f)["best_params"] == {"optimizer.lr": 1e-3}

    # scripts/reproduce.py --search: what results/<experiment>_search.json records of this sweep
    reproduce = reproduce_script()
    record = reproduce.search_record(sweep_dir)
    assert [t["status"] for t in record["trials"]] == ["completed", "failed"]
    assert record["best"]["trial"] == trials[1e-3].number == 0 and record["best"]["value"] == trials[1e-3].value
    assert record["best"]["params"] == records[1e-3]["params"] and record["best"]["steps"] == 3
    assert record["metric"] == "accuracy" and record["direction"] == "maximize"
    assert record["command"].startswith("python ") and "hparams_search=finetune" in record["command"]
    assert '"optimizer.lr=choice(1e30,1e-3)"' in record["command"]  # the sweep's own command line, quoted for a shell
    assert record["wall_seconds_total"] >= record["trials"][0]["wall_seconds"] > 0
    with pytest.raises(SystemExit, match="trials.jsonl: no such file"):
        reproduce.search_record(os.path.join(sweep_dir, "trial_0"))


def reproduce_script():
    spec = importlib.util.spec_from_file_location("flaxen_reproduce_sweep", os.path.join(ROOT, "scripts", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trial(direction="maximize") -> sweep.Trial:
    return sweep.Trial(number=3, sweep_dir="unused", direction=direction, search_keys=("optimizer.lr",),
                       overrides=())


def test_a_trial_is_refused_before_training_without_evaluation_against_its_metric_or_in_a_used_directory(tmp_path):
    common = [f"data_dir={tmp_path}", f"run_dir={tmp_path / 'run'}"]
    classify = config.compose(["experiment=quickstart_finetune", *common])
    sweep.check(classify, trial("maximize"))  # accuracy: maximize

    with pytest.raises(ConfigError, match=r"eval_split=None: a sweep trial returns .* expected a split"):
        sweep.check(config.compose(["experiment=quickstart_finetune", "eval_split=null", *common]), trial())
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction=minimize: .*accuracy.* expected "
                                          r"hydra.sweeper.direction=maximize"):
        sweep.check(classify, trial("minimize"))
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction=maximize: .*loss.* expected "
                                          r"hydra.sweeper.direction=minimize"):
        sweep.check(config.compose(["experiment=quickstart", *common]), trial("maximize"))
    with pytest.raises(ConfigError, match=r"hydra.sweeper.direction=\['maximize', 'minimize'\]: .*one value"):
        sweep.check(classify, trial(["maximize", "minimize"]))

    os.makedirs(tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match=r"hydra.sweep.subdir: trial 3's run directory .* already holds a run "
                                          r"\(checkpoints\)"):
        sweep.check(classify, trial())
