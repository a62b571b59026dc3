"""A trained run as a model in hand: what eval.py, predict.py, export.py and scripts/explain.py load.

    run = load_run("runs/sst2/...")                 # the run's best checkpoint (by its best_metric)
    run = load_run(path, step=300, overrides=["eval_batch_size=8"])
    run.model (models.Model with the checkpoint's weights), run.cfg (the run's config.yaml with
    overrides), run.task (flaxen Task), run.spec (model.json), run.step, run.checkpoint (path),
    run.tokenizer (the run's own tokenizer, RUN_DIR/tokenizer/, or None when the run has none;
    tokenizer_of(run) falls back to its pretrained model's)

`source` is a run directory, its checkpoints/ folder or one step folder (checkpoints/300). The run is
rebuilt from its own config.yaml and model.json; command-line `key=value` overrides re-apply on
top (data_dir, eval_batch_size, mesh.*), but group choices (data=, model=, ...) cannot change a
trained run and are refused. A corrupt checkpoint is reported with the run's other steps and
nothing is moved (loading is read-only).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from flax import nnx
from omegaconf import OmegaConf

from flaxen import checkpoint as checkpointing
from flaxen import config as config_lib
from flaxen import modeling, tasks
from flaxen.errors import ConfigError

RUN_KEYS = ("run_dir", "split", "checkpoint", "step", "output_dir", "input", "output", "out", "text")
GROUPS = ("model", "task", "data", "optimizer", "schedule", "peft", "mesh", "experiment", "privacy", "prune")


@dataclasses.dataclass
class TrainedRun:
    run_dir: str
    cfg: Any
    spec: modeling.ModelSpec
    model: Any
    step: int
    checkpoint: str
    tokenizer: Any

    @property
    def task(self):
        return tasks.for_run(self.cfg)

    @property
    def label_names(self) -> list[str] | None:
        return self.spec.label_names


def run_config(run_dir: str, overrides: Sequence[str] = (), ignore: Sequence[str] = RUN_KEYS):
    """RUN_DIR/config.yaml on the TrainConfig schema with `overrides` (key=value) applied; keys in
    `ignore` belong to the calling command and are skipped."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise checkpointing.CheckpointError(f"{path} not found: {run_dir} is not a flaxen run directory")
    cfg = OmegaConf.merge(OmegaConf.structured(config_lib.TrainConfig), config_lib.load_saved(path))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in ignore or key.startswith("hydra"):
            continue
        if key in GROUPS:
            raise ConfigError(f"{override.input_line}: a trained run keeps its own {key}; "
                              "override single keys instead (e.g. data_dir=..., eval_batch_size=...)")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{override.input_line}: key {key!r} is not in the run's config")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    return cfg


def load_run(source: str, *, step: int | None = None, overrides: Sequence[str] = (),
             ignore: Sequence[str] = RUN_KEYS, verb: str = "Use") -> TrainedRun:
    """The trained model of a run (see the module docstring). `step`: that checkpoint instead of
    the step folder named by `source` or the run's best; `verb` starts the hint a corrupt
    checkpoint's error gives ("Evaluate another step with step=N ...")."""
    from flaxen.data.tokenizers import load_tokenizer

    directory, path_step = checkpointing.find_checkpoint_dir(source)
    run_dir = os.path.dirname(directory)
    cfg = run_config(run_dir, overrides, ignore)
    ckpt = checkpointing.Checkpointer(directory, read_only=True, best_metric=config_lib.best_metric(cfg))
    try:
        chosen = step if step is not None else path_step if path_step is not None else ckpt.best_step()
        if chosen is None:
            raise checkpointing.CheckpointError(f"no checkpoint in {directory}")
        spec = modeling.read_spec(run_dir)
        graphdef, variables = nnx.split(spec.build_abstract())
        try:
            arrays = ckpt.restore_arrays(chosen)
        except checkpointing.CorruptCheckpointError as error:  # read-only: report, move nothing
            others = [s for s in ckpt.all_steps() if s != chosen]
            best = step is None and path_step is None
            raise checkpointing.CheckpointError(
                f"{'the best step of the run, ' if best else ''}checkpoint {directory}/{chosen}, is corrupt: "
                f"{error.cause}. "
                + (f"{verb} another step with step=N (saved steps: {', '.join(map(str, others))})" if others
                   else "The run has no other checkpoint")) from error
    finally:
        ckpt.close()
    variables = modeling.fill(variables, arrays, f"checkpoint {directory}/{chosen}")
    tokenizer_dir = os.path.join(run_dir, modeling.TOKENIZER_DIR)
    tokenizer = load_tokenizer(tokenizer_dir) if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) else None
    return TrainedRun(run_dir=run_dir, cfg=cfg, spec=spec, model=nnx.merge(graphdef, variables), step=chosen,
                      checkpoint=os.path.join(directory, str(chosen)), tokenizer=tokenizer)


def tokenizer_of(run: TrainedRun):
    """The tokenizer the run's rows were encoded with: its own (RUN_DIR/tokenizer/), else its
    model.pretrained (or init_from run's) one; ConfigError when it has neither."""
    if run.tokenizer is not None:
        return run.tokenizer
    from flaxen.data.tokenizers import load_tokenizer

    path = modeling.tokenizer_path(run.cfg, run.run_dir)
    if path is None:
        raise ConfigError(f"{run.run_dir} has no tokenizer/ directory and its config names no pretrained model: "
                          "cannot encode text the way the run was trained")
    return load_tokenizer(path)
