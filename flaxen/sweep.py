"""Hyperparameter-search trials: train.py runs inside an Optuna sweep (hydra-optuna-sweeper,
`pip install -e ".[sweep]"`; `python train.py -m hparams_search=finetune experiment=NAME`, presets in
configs/hparams_search/).

A trial is an ordinary run in a run directory of its own; its objective is the run's best
evaluation of best_metric (results.json `best_eval[best_metric.name]`, `loop.best_value`), which
train.py returns to the sweeper. What a sweep adds to a run:
- `trial_of()`: the Optuna sweep this Hydra job is a trial of (None for a single run, or a sweep by
  another sweeper).
- `check(cfg, trial)`, before anything is built: the run evaluates (eval_split is set), the
  sweeper's direction agrees with best_metric's mode (maximize for max: accuracy, F1; minimize for
  min: a loss), and the trial's run directory holds no earlier run: a trial that resumed another
  trial's checkpoints would report that training as its own.
- `finish(trial, cfg, results)` / `fail(trial, cfg, error)`: one JSON line per trial in
  <sweep dir>/trials.jsonl: {"trial", "status", "value", "metric", "direction", "params" (the values
  of the keys hydra.sweeper.params searches), "run_dir", "overrides" (the trial's command line),
  "error" for a failed trial}. Optuna's sweeper adds optimization_results.yaml (best params and value).
Failures: a mistake in the config or data (a FlaxenError) ends the sweep with exit status 1 as it
ends a single run (every trial would repeat it). What the sampled values themselves can cause
(`TRIAL_FAILURES`: a diverged loss, a non-finite objective) fails that trial only: it is recorded
and raised to the sweeper, which marks the trial FAIL and goes on while hydra.sweeper.max_failure_rate
allows (1.0 in the presets). Ctrl-C / SIGTERM end the sweep as they end a run.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
from omegaconf import OmegaConf

from flaxen import config as config_lib
from flaxen import logging as run_logging
from flaxen.errors import ConfigError, FlaxenError
from flaxen.loop import NonFiniteLossError, best_value

TRIALS_FILE = "trials.jsonl"
# what a run directory holds once a run started there (flaxen.loop.RunDirectory)
RUN_FILES = ("config.yaml", "commands.jsonl", "checkpoints", "results.json")


class NonFiniteObjectiveError(FlaxenError):
    """A trial's best evaluation of best_metric is NaN or Inf."""


# errors the sampled hyperparameters can cause: they fail one trial, not the sweep
TRIAL_FAILURES = (NonFiniteLossError, NonFiniteObjectiveError)


@dataclasses.dataclass(frozen=True)
class Trial:
    number: int                   # hydra.job.num: the trial's index in this sweep
    sweep_dir: str
    direction: object             # hydra.sweeper.direction: maximize | minimize (a list is refused)
    search_keys: tuple[str, ...]  # the keys of hydra.sweeper.params
    overrides: tuple[str, ...]    # the trial's overrides (the preset's fixed values and the sampled ones)


def trial_of() -> Trial | None:
    """The Optuna sweep trial this Hydra job is; None outside an Optuna sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not str(hydra_cfg.sweeper.get("_target_", "")).endswith("OptunaSweeper"):
        return None
    direction = hydra_cfg.sweeper.get("direction")
    direction = getattr(direction, "name", direction)  # the sweeper's default is its Direction enum
    if OmegaConf.is_list(direction):
        direction = [getattr(d, "name", d) for d in direction]
    return Trial(number=int(hydra_cfg.job.num), sweep_dir=os.path.abspath(str(hydra_cfg.sweep.dir)),
                 direction=direction, search_keys=tuple(str(k) for k in (hydra_cfg.sweeper.get("params") or {})),
                 overrides=tuple(hydra_cfg.overrides.task))


def check(cfg, trial: Trial) -> None:
    """Refuses (ConfigError) a trial without an objective, one whose direction contradicts
    best_metric's mode, and a run directory that already holds a run."""
    if not cfg.eval_split:
        raise ConfigError(f"eval_split={cfg.eval_split}: a sweep trial returns its best evaluation of best_metric; "
                          "expected a split to evaluate (e.g. eval_split=validation)")
    if isinstance(trial.direction, list):
        raise ConfigError(f"hydra.sweeper.direction={trial.direction}: a flaxen run returns one value (its best "
                          "evaluation of best_metric); expected maximize or minimize")
    name, mode = config_lib.best_metric(cfg)
    expected = "maximize" if mode == "max" else "minimize"
    if trial.direction != expected:
        raise ConfigError(f"hydra.sweeper.direction={trial.direction}: this run's best_metric {name} is better when "
                          f"{'higher' if mode == 'max' else 'lower'} (mode {mode}); expected "
                          f"hydra.sweeper.direction={expected}")
    path = os.path.abspath(os.path.expanduser(cfg.run_dir))
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if found:
        raise ConfigError(
            f"hydra.sweep.subdir: trial {trial.number}'s run directory {path} already holds a run "
            f"({', '.join(found)}); each trial trains from scratch in a directory of its own: start the sweep in a "
            "new hydra.sweep.dir (the default is timestamped) with a subdir that names the trial "
            "(hydra.sweep.subdir=trial_${hydra.job.num}, as the configs/hparams_search/ presets set it)")


def finish(trial: Trial, cfg, results: dict) -> float:
    """The value `trial` returns to the sweeper (its best evaluation of best_metric), recorded in
    trials.jsonl; NonFiniteObjectiveError (recorded as failed) when it is NaN or Inf."""
    value = best_value(results)
    if value is None or not math.isfinite(value):
        error = NonFiniteObjectiveError(
            f"trial {trial.number} ({cfg.run_dir}): its best {results['best_metric']['name']} is {value}; "
            "the trial is recorded as failed")
        fail(trial, cfg, error)
        raise error
    _record(trial, cfg, results["status"], value)
    if jax.process_index() == 0:
        print(f"trial {trial.number}: best {results['best_metric']['name']} {value:.6g} "
              f"(hydra.sweeper.direction={trial.direction}); recorded in {os.path.join(trial.sweep_dir, TRIALS_FILE)}")
    return value


def fail(trial: Trial, cfg, error: BaseException) -> None:
    """Records `trial` as failed with `error` in trials.jsonl."""
    _record(trial, cfg, "failed", None, error=f"{type(error).__name__}: {error}")


def _record(trial: Trial, cfg, status: str, value: float | None, error: str | None = None) -> None:
    if jax.process_index() != 0:
        return
    name, _ = config_lib.best_metric(cfg)
    row = {"trial": trial.number, "status": status, "value": value, "metric": name, "direction": trial.direction,
           "params": {key: _plain(OmegaConf.select(cfg, key)) for key in trial.search_keys},
           "run_dir": os.path.abspath(os.path.expanduser(cfg.run_dir)), "overrides": list(trial.overrides)}
    if error is not None:
        row["error"] = error
    os.makedirs(trial.sweep_dir, exist_ok=True)
    run_logging.append_jsonl(os.path.join(trial.sweep_dir, TRIALS_FILE), row)


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
