"""Sequence classification (and regression): one label per text or text pair.

Rows: [CLS] text [SEP] (text_pair [SEP]) cut to data.max_length (longest_first), label a scalar
(int32, or float32 for regression data). Logits [batch, num_labels]; num_labels = 1 is regression
(squared error). Metrics: loss, accuracy, macro_f1 and a per-class report (regression: loss, the
mean squared error).

Classes (flaxen.tasks.base.ClassTask): a few-shot subset is K rows of each label
(data.train_examples_per_class, flaxen.data.sampling.examples_per_class), or with a mapping
{label name: count} that many rows of each named label and every row of the others (so
data.train_examples_per_class={"1": 3757} keeps 10 % of SST-2's positive rows and all its negative
ones: an imbalanced train split, labels as data.label_names spells them); balanced resampling draws
every label equally often per epoch; task.class_weights weighs each row's cross-entropy by its
label's weight (`label_weights` [batch] in the batch): loss = sum(w_y * ce) / sum(w_y).

Attribution target: the logit of one class (default: the predicted one), as captum's Hugging Face
tutorials attribute a model's raw output with `target=class`. The logit rather than the
log-probability: a class's log-probability also moves with every other class's logit, so its
attributions mix in evidence about the other classes. Regression: the predicted value.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import ConfigError
from flaxen.tasks.base import (IGNORE_INDEX, AttributionTarget, ClassTask, check_unused, label_index, label_strings,
                               register, softmax, token_cross_entropy, valid_rows)


@register
class SequenceClassification(ClassTask):
    name = "seq_cls"
    head = "seq_cls"
    data_kinds = ("classification",)
    best_metric = ("accuracy", "max")
    subset_counts_per_label = True

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        if "label" not in data.prepared.fields:
            raise ConfigError(f"task seq_cls needs labels: set data.label_column ({data.cfg.name} has none)")

    def row(self, data: Any, record: dict) -> dict:
        row = encoding.classification_row(data.tokenizer, record, data.cfg.max_length, data.prepared.regression)
        return self.weighted_row(data, row)

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        real = [row for row in rows if row is not encoding.PADDING]
        regression = bool(real) and np.asarray(real[0]["labels"]).dtype.kind == "f"
        row_fields = {"labels": (np.float32 if regression else np.int32, IGNORE_INDEX)}
        if self.class_weights is not None:
            row_fields["label_weights"] = (np.float32, 0.0)
        return encoding.collate(rows, batch_size, buckets, pad_id,
                                token_fields={"token_type_ids": (np.int32, 0)}, row_fields=row_fields)

    def example_batch(self, cfg: Any, rows: int) -> dict:
        shapes = super().example_batch(cfg, rows)
        shapes["labels"] = ((rows,), np.int32)
        if self.class_weights is not None:
            shapes["label_weights"] = ((rows,), np.float32)
        return shapes

    # ------------------------------------------------------------------ classes (ClassTask)

    @staticmethod
    def _labels(records) -> np.ndarray:
        return np.asarray([int(record["label"]) for record in records], np.int64)

    def label_counts(self, data: Any) -> np.ndarray:
        return np.bincount(self._labels(data.records("train")), minlength=len(data.label_names))

    def subset_indices(self, data: Any, records: list, k: Any, seed: int) -> np.ndarray:
        from flaxen.data import sampling

        return sampling.examples_per_class(self._labels(records), k, seed, list(data.label_names))

    def resample_classes(self, data: Any, records: list) -> np.ndarray:
        return self._labels(records)

    def subset_summary(self, data: Any, records: list) -> dict:
        counts = np.bincount(self._labels(records), minlength=len(data.label_names))
        return {str(name): int(count) for name, count in zip(data.label_names, counts)}

    def model_inputs(self, batch: dict) -> dict:
        # the label comes from the pooled first position only: BERT's last block computes that
        # position alone (models.Model's head_positions_only; the logits are the same)
        return {**super().model_inputs(batch), "head_positions_only": True}

    def loss_weight(self, batch: dict):
        return jnp.sum(self.scored_weights(valid_rows(batch), batch))

    def loss_terms(self, output: Any, batch: dict):
        logits, labels = output.logits, batch["labels"]
        rows = valid_rows(batch)
        if logits.shape[-1] == 1:
            errors = jnp.square(logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32))
            return jnp.sum(errors * rows), jnp.sum(rows)
        losses, _ = token_cross_entropy(logits, jnp.where(rows > 0, labels, IGNORE_INDEX).astype(jnp.int32))
        return self.weighted_terms(losses, rows, batch)

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

    # ------------------------------------------------------------------ prediction (predict.py)

    hf_pipeline = "text-classification"

    def predict_records(self, path, cfg, options):
        """One text per line, or a TSV/CSV/JSONL file with the run's data.text_columns (a pair
        when the run had two)."""
        from flaxen import predict

        columns = [str(c) for c in cfg.data.text_columns]
        form = predict.input_format(path, options, self.name, ("lines", "tsv", "csv", "jsonl"))
        if form == "lines":
            if len(columns) > 1:
                raise ConfigError(f"{path}: the run classifies text pairs (data.text_columns={columns}); give a TSV, "
                                  "CSV or JSONL file with those columns")
            return [{"where": r["where"], "text": r["text"], "text_pair": ""}
                    for r in predict.read_lines(path, "one text per line")]
        return [{"where": r["where"], "text": r[columns[0]], "text_pair": r[columns[1]] if len(columns) > 1 else ""}
                for r in predict.read_table(path, form, cfg.data.header, columns)]

    def predict_rows(self, records, run, options):
        from flaxen import predict

        limit = run.cfg.data.max_length
        rows = []
        for record in records:
            row, length = encoding.classification_inputs(run.tokenizer, record["text"], record["text_pair"], limit)
            if length > limit and not options.truncate:
                raise predict.too_long(record["where"], length, limit, "data.max_length")
            rows.append(row)
        return rows

    def prediction_outputs(self, output, batch, options):
        import jax

        logits = output.logits.astype(jnp.float32)
        if logits.shape[-1] == 1:
            return {"value": logits[:, 0]}
        return {"probabilities": jax.nn.softmax(logits, axis=-1)}

    def format_predictions(self, records, rows, outputs, run, options):
        """{"label", "probabilities": {label: p}} per input (regression: {"value"})."""
        if "value" in outputs[0]:
            return [{"value": float(o["value"])} for o in outputs]
        count = len(outputs[0]["probabilities"])
        names = label_strings(run.label_names, count)
        out = []
        for o in outputs:
            p = np.asarray(o["probabilities"], np.float64)
            out.append({"label": names[int(np.argmax(p))], "probabilities": dict(zip(names, p.tolist()))})
        return out

    # ------------------------------------------------------------------ explanation

    def explain_row(self, tokenizer, data_cfg, text, text_pair=None, context=None) -> dict:
        check_unused(self, context=context)
        record = {"text": text, "text_pair": text_pair or "", "label": 0}
        return encoding.classification_row(tokenizer, record, data_cfg.max_length, regression=False)

    def attribution_targets(self, output, row, *, target=None, position=None, span=None, label_names=None):
        check_unused(self, position=position, span=span)
        logits = np.asarray(output.logits)[0]
        if logits.shape[-1] == 1:
            check_unused(self, target=target)
            return [AttributionTarget("predicted value", "logits", (0,))]
        index = int(np.argmax(logits)) if target is None else label_index(target, label_names, logits.shape[-1])
        name = label_strings(label_names, logits.shape[-1])[index]
        return [AttributionTarget(f"logit of {name!r}", "logits", (index,))]

    def describe_prediction(self, output, row, targets, label_names=None):
        logits = np.asarray(output.logits)[0]
        if logits.shape[-1] == 1:
            return f"{float(logits[0]):.4g}", {}
        names = label_strings(label_names, logits.shape[-1])
        probabilities = softmax(logits)
        return names[int(np.argmax(logits))], {name: float(p) for name, p in zip(names, probabilities)}
