"""Sequence classification (and regression): one label per text or text pair.

Rows: [CLS] text [SEP] (text_pair [SEP]) cut to data.max_length (longest_first), label a scalar
(int32, or float32 for regression data). Logits [batch, num_labels]; num_labels = 1 is regression
(squared error). Metrics: loss, accuracy, macro_f1 and a per-class report (regression: loss, the
mean squared error).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import ConfigError
from flaxen.tasks.base import IGNORE_INDEX, RecordTask, register, token_cross_entropy, valid_rows


@register
class SequenceClassification(RecordTask):
    name = "seq_cls"
    head = "seq_cls"
    data_kinds = ("classification",)
    best_metric = ("accuracy", "max")

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        if "label" not in data.prepared.fields:
            raise ConfigError(f"task seq_cls needs labels: set data.label_column ({data.cfg.name} has none)")

    def row(self, data: Any, record: dict) -> dict:
        return encoding.classification_row(data.tokenizer, record, data.cfg.max_length, data.prepared.regression)

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        real = [row for row in rows if row is not encoding.PADDING]
        regression = bool(real) and np.asarray(real[0]["labels"]).dtype.kind == "f"
        return encoding.collate(rows, batch_size, buckets, pad_id,
                                token_fields={"token_type_ids": (np.int32, 0)},
                                row_fields={"labels": (np.float32 if regression else np.int32, IGNORE_INDEX)})

    def example_batch(self, cfg: Any, rows: int) -> dict:
        shapes = super().example_batch(cfg, rows)
        shapes["labels"] = ((rows,), np.int32)
        return shapes

    def loss_weight(self, batch: dict):
        return jnp.sum(valid_rows(batch))

    def loss_terms(self, output: Any, batch: dict):
        logits, labels = output.logits, batch["labels"]
        rows = valid_rows(batch)
        if logits.shape[-1] == 1:
            errors = jnp.square(logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32))
            return jnp.sum(errors * rows), jnp.sum(rows)
        losses, _ = token_cross_entropy(logits, jnp.where(rows > 0, labels, IGNORE_INDEX).astype(jnp.int32))
        return jnp.sum(losses), jnp.sum(rows)

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        out = super().eval_outputs(output, batch)
        logits = output.logits
        out["predictions"] = logits[:, 0] if logits.shape[-1] == 1 else jnp.argmax(logits, -1).astype(jnp.int32)
        return out

    def evaluate(self, outputs, host, data, split, task_cfg=None):
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        predictions = np.concatenate([o["predictions"][h["valid"]] for o, h in zip(outputs, host)])
        labels = np.concatenate([h["labels"][h["valid"]] for h in host])
        if predictions.dtype.kind == "f":
            return result, None
        names = data.label_names
        result["accuracy"] = metrics.accuracy(labels, predictions)
        result["macro_f1"] = metrics.macro_f1(labels, predictions, names)
        result["report"] = metrics.classification_report(labels, predictions, names)
        return result, None

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        if self.num_labels(cfg, data) == 1:  # regression: the loss is the mean squared error
            return super().metric_names(cfg, data)
        return super().metric_names(cfg, data) + ("accuracy", "macro_f1")
