"""Evaluation of one split: run the jitted eval step over the loader, then the task's host-side
metrics.

Why separate from the loop: train.py evaluates periodically and eval.py evaluates a restored
checkpoint; both call `evaluate` with the same eval step and shardings. What is computed is the
task's (flaxen/tasks/<name>.py: `host_fields`, `evaluate`): e.g. loss, perplexity and accuracy
for language models; accuracy, macro-F1 and a per-class report for classification; entity
precision / recall / F1 for tagging; exact match and F1 for question answering.
Only rows with `valid` = 1 count; `max_batches` caps the number of batches read.
`scalar_metrics` keeps the numbers for metrics.jsonl / TensorBoard; `format_table` prints them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from flaxen import sharding, tasks


def evaluate(eval_step: Callable, params, rest, task_data: Any, task: Any, split: str, *, batch_size: int,
             batch_sharding=None, max_batches: int | None = None, task_cfg: Any = None,
             with_predictions: bool = False, graphdef: Any = None, training: bool = False):
    """Metrics of `split` (nested `report` where the task has one). `task`: a Task or its name;
    `task_cfg`: the run's `task` config node. With `with_predictions`, returns (metrics,
    predictions or None), the predictions being what the task writes (predictions_<split>.json,
    or .txt for generated text). `graphdef`: the model's nnx graph definition (params and rest
    hold its weights): given, a task that generates at evaluation (`eval_generator`) does so;
    `training`: this is one of train.py's evaluations (a task may then skip decoding)."""
    task = tasks.get(task)
    loader = task_data.loader(split, batch_size, seed=0, train=False)
    generate = None
    if graphdef is not None:
        from flax import nnx

        generate = task.eval_generator(nnx.merge(graphdef, params, rest), task_data, task_cfg, training)
    outputs, host = [], []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        device_batch = sharding.put_batch(batch, batch_sharding) if batch_sharding is not None else batch
        outputs.append(eval_step(params, rest, device_batch))
        host.append(task.host_fields(batch))
        if generate is not None:
            host[-1].update(generate(batch))
    result, predictions = task.evaluate(jax.device_get(outputs), host, task_data, split, task_cfg)
    return (result, predictions) if with_predictions else result


def scalar_metrics(result: dict, prefix: str) -> dict:
    """{'<prefix>/<name>': value} for the scalar entries of an evaluate() result."""
    return {f"{prefix}/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_table(result: dict, title: str = "") -> str:
    """A plain-text table: scalar metrics, then the per-class / per-type report if present."""
    lines = [title] if title else []
    width = max([len(k) for k in result if k != "report"] + [8])
    for key, value in result.items():
        if key == "report":
            continue
        lines.append(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    report = result.get("report")
    if report:
        name_width = max(len(str(n)) for n in report) + 2
        lines.append("")
        lines.append(f"  {'':<{name_width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for name, row in report.items():
            lines.append(f"  {name:<{name_width}}{row['precision']:>10.4f}{row['recall']:>10.4f}"
                         f"{row['f1']:>10.4f}{row['support']:>10d}")
    return "\n".join(lines)
