"""Train a model: python train.py [experiment=NAME] [group=option ...] [key=value ...]

A thin Hydra entry point: the config (configs/config.yaml and its groups) is composed and
type-checked by Hydra, then flaxen.loop.train does the work in Hydra's run directory.
Re-running the same command resumes that run from its latest checkpoint.

Exit status: 0 when the run completed (or stopped early); 1 with `error: ...` for a mistake in
the config, data or run directory (a flaxen error); 130 / 143 after Ctrl-C / SIGTERM, once the
checkpoint of the step reached is saved (a scheduler can requeue on 143: docs/scaling.md).

The Hydra main returns the run's best evaluation of best_metric (None without evaluation): the
objective of a hyperparameter search, `python train.py -m hparams_search=finetune experiment=NAME`
(configs/hparams_search/; each run is one Optuna trial, flaxen.sweep). A trial that diverges fails
alone (recorded in the sweep's trials.jsonl, marked failed by Optuna); any other error ends the sweep.
"""
import sys

import hydra
from omegaconf import DictConfig

from flaxen import config as config_lib
from flaxen.errors import FlaxenError


def run(cfg: DictConfig) -> dict:
    """Trains `cfg` (a composed TrainConfig); returns the results dict (also in results.json)."""
    from flaxen import loop

    return loop.train(cfg)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flaxen import loop, sweep

    trial = sweep.trial_of()  # None unless this run is an Optuna sweep's trial
    try:
        if trial is not None:
            sweep.check(cfg, trial)
        results = run(cfg)
        if loop.exit_code(results):  # exiting 0 here would end a multirun sweep after its first run
            sys.exit(loop.exit_code(results))
        return loop.best_value(results) if trial is None else sweep.finish(trial, cfg, results)
    except sweep.TRIAL_FAILURES as error:
        if trial is None:
            _fail(error)
        print(f"trial {trial.number} failed: {error}", file=sys.stderr)
        if not isinstance(error, sweep.NonFiniteObjectiveError):  # finish() recorded that one
            sweep.fail(trial, cfg, error)
        raise  # the sweeper marks the trial failed and goes on (hydra.sweeper.max_failure_rate)
    except FlaxenError as error:
        _fail(error)
    except KeyboardInterrupt:
        print("aborted: nothing was saved since the last checkpoint; rerun the command to resume from it",
              file=sys.stderr)
        sys.exit(130)


def _fail(error: FlaxenError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    config_lib.register()
    main()
