"""Evaluation of one split: run the jitted eval step over the loader, then compute metrics on the host.

Why separate from the loop: train.py evaluates periodically and eval.py evaluates a restored
checkpoint; both call `evaluate` with the same eval step and shardings.

Metrics by task:
    mlm / clm   loss (mean token cross-entropy), perplexity, accuracy (argmax on scored tokens)
    seq_cls     loss, accuracy, macro_f1, report (per-class precision/recall/F1/support);
                regression (one output): loss (mean squared error)
    token_cls   loss; with an IOB tag scheme: entity precision/recall/F1 on words (seqeval
                conventions) and report (per entity type); otherwise word accuracy and macro_f1.
                Words come back from sub-tokens through the labels (the first sub-token of each
                word carries its label); words cut off by truncation count as predicted `O`.
Only rows with `valid` = 1 count; `max_batches` caps the number of batches read.
`scalar_metrics` keeps the numbers for metrics.jsonl / TensorBoard; `format_table` prints them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from flaxen import metrics, sharding, tasks
from flaxen.errors import DataError


def _rows(batch: dict) -> np.ndarray:
    if "valid" in batch:
        return np.asarray(batch["valid"]).astype(bool)
    return np.ones(np.asarray(batch["input_ids"]).shape[0], bool)


def _word_predictions(predictions: np.ndarray, labels: np.ndarray, word_count: int, names: Sequence[str],
                      outside: str) -> list[str]:
    ids = predictions[labels != tasks.IGNORE_INDEX]
    tags = [names[i] for i in ids[:word_count]]
    return tags + [outside] * (word_count - len(tags))


def evaluate(eval_step: Callable, params, rest, task_data: Any, task: str, split: str, *, batch_size: int,
             batch_sharding=None, max_batches: int | None = None) -> dict:
    """Metrics of `split` (see the module docstring); nested `report` where the task has one."""
    loader = task_data.loader(split, batch_size, seed=0, train=False)
    outputs, host = [], []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        device_batch = sharding.put_batch(batch, batch_sharding) if batch_sharding is not None else batch
        outputs.append(eval_step(params, rest, device_batch))
        keep = {"valid": _rows(batch), "labels": np.asarray(batch["labels"])}
        if "word_count" in batch:
            keep["word_count"] = np.asarray(batch["word_count"])
        host.append(keep)
    outputs = jax.device_get(outputs)
    loss_sum = float(sum(np.sum(o["loss_sum"]) for o in outputs))
    weight = float(sum(np.sum(o["weight"]) for o in outputs))
    result = {"loss": loss_sum / weight if weight else float("nan"),
              "num_examples": int(sum(h["valid"].sum() for h in host))}
    if task in ("mlm", "clm"):
        result["perplexity"] = metrics.perplexity(result["loss"])
        result["accuracy"] = float(sum(np.sum(o["correct"]) for o in outputs)) / weight if weight else 0.0
    elif task == "seq_cls":
        predictions = np.concatenate([o["predictions"][h["valid"]] for o, h in zip(outputs, host)])
        labels = np.concatenate([h["labels"][h["valid"]] for h in host])
        if predictions.dtype.kind == "f":
            return result
        names = task_data.label_names
        result["accuracy"] = metrics.accuracy(labels, predictions)
        result["macro_f1"] = metrics.macro_f1(labels, predictions, names)
        result["report"] = metrics.classification_report(labels, predictions, names)
    elif task == "token_cls":
        result.update(_token_metrics(task_data, split, outputs, host))
    return result


def _token_metrics(task_data, split: str, outputs, host) -> dict:
    names = list(task_data.label_names)
    scheme = task_data.tag_scheme
    outside = "O" if "O" in names else names[0]
    gold_all = task_data.word_labels(split)
    predicted, gold = [], []
    for output, rows in zip(outputs, host):
        for row in np.flatnonzero(rows["valid"]):
            count = int(rows["word_count"][row])
            predicted.append(_word_predictions(output["predictions"][row], rows["labels"][row], count, names, outside))
            gold_words = list(gold_all[len(gold)])
            if len(gold_words) != count:
                raise DataError(f"{split} example {len(gold)}: the batch says {count} words but the split's "
                                f"gold tags have {len(gold_words)}")
            gold.append(gold_words)
    if scheme is not None:
        scores = metrics.entity_scores(gold, predicted, scheme)
        return {**scores, "report": metrics.entity_report(gold, predicted, scheme)}
    flat_gold = [names.index(t) for sentence in gold for t in sentence]
    flat_pred = [names.index(t) for sentence in predicted for t in sentence]
    return {"accuracy": metrics.accuracy(flat_gold, flat_pred), "macro_f1": metrics.macro_f1(flat_gold, flat_pred, names),
            "report": metrics.classification_report(flat_gold, flat_pred, names)}


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
