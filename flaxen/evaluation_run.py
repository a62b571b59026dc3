"""eval.py's work: find what to evaluate (a run's best or chosen checkpoint, or a pretrained
model), rebuild the model, evaluate one split, print a table and write eval_<split>.json (and
predictions_<split>.json for tasks with predictions, e.g. qa: {question id: answer}).

Why separate from flaxen.evaluate: that module computes metrics from a step function and a
loader; this one resolves configs, run directories and checkpoints around it.

A run is evaluated with its own saved config (config.yaml) and model description (model.json);
command-line `key=value` overrides re-apply on top (e.g. data_dir, eval_batch_size, mesh.*), but
group choices (data=..., model=...) cannot change a trained run and are rejected.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx
from omegaconf import OmegaConf

from flaxen import checkpoint as checkpointing
from flaxen import config as config_lib
from flaxen import evaluate as evaluation
from flaxen import logging as run_logging
from flaxen import modeling, sharding, state, tasks
from flaxen.errors import ConfigError

EVAL_KEYS = ("run_dir", "split", "checkpoint", "step", "output_dir")
GROUPS = ("model", "task", "data", "optimizer", "schedule", "peft", "mesh", "experiment")


def _run_config(run_dir: str, overrides: list[str]):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise checkpointing.CheckpointError(f"{path} not found: {run_dir} is not a flaxen run directory")
    cfg = OmegaConf.merge(OmegaConf.structured(config_lib.TrainConfig), OmegaConf.load(path))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in EVAL_KEYS or key.startswith("hydra"):
            continue
        if key in GROUPS:
            raise ConfigError(f"{override.input_line}: a trained run keeps its own {key}; "
                              "override single keys instead (e.g. data_dir=..., eval_batch_size=...)")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{override.input_line}: key {key!r} is not in the run's config")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    return cfg


def _load_task_data(cfg, run_dir=None):
    from flaxen.data import load_task_data

    config_lib.check_data_dir(cfg)
    return load_task_data(cfg.data, tasks.get(cfg.task.name), os.path.abspath(os.path.expanduser(cfg.data_dir)),
                          tokenizer_path=modeling.tokenizer_path(cfg, run_dir), presets=config_lib.data_preset)


def evaluate_from_config(cfg: Any, overrides: list[str]) -> dict:
    """See the module docstring; returns what eval_<split>.json holds."""
    source = cfg.checkpoint or cfg.run_dir
    if source is None and cfg.model.pretrained is None:
        raise ConfigError("nothing to evaluate: give run_dir=PATH, checkpoint=PATH or model.pretrained=PATH")
    if source is not None:
        directory, path_step = checkpointing.find_checkpoint_dir(source)
        run_dir = os.path.dirname(directory)
        train_cfg = _run_config(run_dir, overrides)
        task_data = _load_task_data(train_cfg, run_dir)
        ckpt = checkpointing.Checkpointer(directory, read_only=True, best_metric=config_lib.best_metric(train_cfg))
        step = cfg.step if cfg.step is not None else path_step if path_step is not None else ckpt.best_step()
        if step is None:
            raise checkpointing.CheckpointError(f"no checkpoint in {directory}")
        spec = modeling.read_spec(run_dir)
        abstract = spec.build_abstract()
        graphdef, variables = nnx.split(abstract)
        try:
            arrays = ckpt.restore_arrays(step)
        except checkpointing.CorruptCheckpointError as error:  # read-only: report, move nothing
            others = [s for s in ckpt.all_steps() if s != step]
            best = cfg.step is None and path_step is None
            raise checkpointing.CheckpointError(
                f"{'the best step of the run, ' if best else ''}checkpoint {directory}/{step}, is corrupt: "
                f"{error.cause}. "
                + (f"Evaluate another step with step=N (saved steps: {', '.join(map(str, others))})" if others
                   else "The run has no other checkpoint")) from error
        finally:
            ckpt.close()
        variables = modeling.fill(variables, arrays, f"checkpoint {directory}/{step}")
        model = nnx.merge(graphdef, variables)
        origin = {"run_dir": run_dir, "checkpoint": os.path.join(directory, str(step)), "step": step}
        output_dir = cfg.output_dir or run_dir
    else:
        config_lib.validate(cfg)
        train_cfg = cfg
        task_data = _load_task_data(cfg)
        model, _ = modeling.build(cfg, task_data)
        origin = {"pretrained": os.path.abspath(os.path.expanduser(cfg.model.pretrained))}
        output_dir = cfg.output_dir or os.path.join("runs", f"{cfg.experiment_name}_pretrained")

    splits = getattr(task_data, "splits", None)
    if splits is not None and cfg.split not in splits:
        raise ConfigError(f"split={cfg.split!r}: the data has splits {', '.join(splits)}")
    mesh = sharding.make_mesh(train_cfg.mesh)
    batch_size = cfg.eval_batch_size
    if batch_size % sharding.batch_divisor(mesh):
        raise ConfigError(f"eval_batch_size={batch_size} is not divisible by the mesh's "
                          f"{sharding.batch_divisor(mesh)} batch shards")
    setup = state.from_config(train_cfg, model, mesh=mesh, with_optimizer=False)
    result, predictions = evaluation.evaluate(
        setup.eval_step, setup.params, setup.rest, task_data, setup.task, cfg.split, batch_size=batch_size,
        batch_sharding=setup.batch_sharding, max_batches=cfg.eval_batches, task_cfg=train_cfg.task,
        with_predictions=True)
    report = {"split": cfg.split, "task": train_cfg.task.name, **origin, "metrics": result}
    title = f"{train_cfg.task.name} on {cfg.split}: " + (
        f"{origin['checkpoint']}" if "checkpoint" in origin else origin["pretrained"])
    print(evaluation.format_table(result, title))
    if jax.process_index() == 0:
        path = os.path.join(output_dir, f"eval_{cfg.split}.json")
        run_logging.write_json(path, report)
        print(f"wrote {path}")
        if predictions is not None:
            path = os.path.join(output_dir, f"predictions_{cfg.split}.json")
            run_logging.write_json(path, predictions)
            print(f"wrote {path}")
    return report
