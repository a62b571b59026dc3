"""Evaluate a run, a checkpoint or a pretrained model on one split.

    python eval.py run_dir=PATH split=validation [step=N]
    python eval.py checkpoint=PATH split=test
    python eval.py experiment=sst2 model.pretrained=PATH split=validation

A thin Hydra entry point over flaxen.evaluation_run: prints a table and writes
eval_<split>.json into the run directory (see configs/eval.yaml).
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from flaxen import config as config_lib
from flaxen.errors import FlaxenError


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluates per `cfg` (a composed EvalConfig); `overrides` are the command-line key=value
    pairs to re-apply on top of a run's saved config. Returns the eval_<split>.json content."""
    from flaxen import compilation, distributed, evaluation_run

    distributed.initialize(cfg.get("distributed"))
    compilation.use_cache(cfg.get("compilation_cache_dir"))
    return evaluation_run.evaluate_from_config(cfg, overrides or [])


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    try:
        run(cfg, overrides)
    except FlaxenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    config_lib.register()
    main()
