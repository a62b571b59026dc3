"""Train a model: python train.py [experiment=NAME] [group=option ...] [key=value ...]

A thin Hydra entry point: the config (configs/config.yaml and its groups) is composed and
type-checked by Hydra, then flaxen.loop.train does the work in Hydra's run directory.
Re-running the same command resumes that run from its latest checkpoint.
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
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except FlaxenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    config_lib.register()
    main()
