"""eval.py's work: find what to evaluate (a run's best or chosen checkpoint, or a pretrained
model), rebuild the model, evaluate one split, print a table and write eval_<split>.json (and
predictions_<split>.json for tasks with predictions, e.g. qa: {question id: answer}; for tasks
that generate text, seq2seq, predictions_<split>.txt: one detokenised hypothesis per line, in
record order, generated with the run's decoding settings, task.generation).

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

from flaxen import config as config_lib
from flaxen import evaluate as evaluation
from flaxen import logging as run_logging
from flaxen import inference, modeling, sharding, state, tasks
from flaxen.errors import ConfigError
from flaxen.generate import write_text


def _load_task_data(cfg, run_dir=None):
    from flaxen.data import load_task_data

    config_lib.check_data_dir(cfg)
    return load_task_data(cfg.data, tasks.for_run(cfg), os.path.abspath(os.path.expanduser(cfg.data_dir)),
                          tokenizer_path=modeling.tokenizer_path(cfg, run_dir), presets=config_lib.data_preset)


def evaluate_from_config(cfg: Any, overrides: list[str]) -> dict:
    """See the module docstring; returns what eval_<split>.json holds."""
    source = cfg.checkpoint or cfg.run_dir
    if source is None and cfg.model.pretrained is None:
        raise ConfigError("nothing to evaluate: give run_dir=PATH, checkpoint=PATH or model.pretrained=PATH")
    if source is not None:
        run = inference.load_run(source, step=cfg.step, overrides=overrides, verb="Evaluate")
        run_dir, train_cfg, model = run.run_dir, run.cfg, run.model
        task_data = _load_task_data(train_cfg, run_dir)
        origin = {"run_dir": run_dir, "checkpoint": run.checkpoint, "step": run.step}
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
        with_predictions=True, graphdef=setup.graphdef)
    report = {"split": cfg.split, "task": train_cfg.task.name, **origin, "metrics": result}
    title = f"{train_cfg.task.name} on {cfg.split}: " + (
        f"{origin['checkpoint']}" if "checkpoint" in origin else origin["pretrained"])
    print(evaluation.format_table(result, title))
    if jax.process_index() == 0:
        path = os.path.join(output_dir, f"eval_{cfg.split}.json")
        run_logging.write_json(path, report)
        print(f"wrote {path}")
        if isinstance(predictions, list):  # generated text: one hypothesis per line, in record order
            path = os.path.join(output_dir, f"predictions_{cfg.split}.txt")
            write_text(predictions, path)
            print(f"wrote {path}")
        elif predictions is not None:
            path = os.path.join(output_dir, f"predictions_{cfg.split}.json")
            run_logging.write_json(path, predictions)
            print(f"wrote {path}")
    return report
