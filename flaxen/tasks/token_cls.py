"""Token classification (tagging): one tag per word, scored on each word's first sub-token.

Rows: [CLS] sub-tokens [SEP] cut to data.max_length; labels [T'] carry each word's tag id on its
first sub-token and IGNORE_INDEX elsewhere; `word_count` keeps the untruncated number of words.
Metrics: loss; with an IOB tag scheme, entity precision / recall / F1 on words (seqeval's
conventions) and a per-type report; otherwise word accuracy, macro_f1 and a per-tag report.
Words come back from sub-tokens through the labels; words cut off by truncation count as
predicted `O`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import DataError
from flaxen.tasks.base import IGNORE_INDEX, RecordTask, TokenTask, register


def word_labels(data: Any, split: str, process_index: int = 0, process_count: int = 1) -> list[list[str]]:
    """Gold tags of every word of every sentence of `split` (untruncated), in eval-loader order."""
    names = data.label_names
    return [[names[t] for t in record["tags"]] for record in data.records(split)[process_index::process_count]]


def _word_predictions(predictions: np.ndarray, labels: np.ndarray, word_count: int, names: Sequence[str],
                      outside: str) -> list[str]:
    ids = predictions[labels != IGNORE_INDEX]
    tags = [names[i] for i in ids[:word_count]]
    return tags + [outside] * (word_count - len(tags))


@register
class TokenClassification(RecordTask, TokenTask):
    name = "token_cls"
    head = "token_cls"
    data_kinds = ("tagging",)
    best_metric = ("f1", "max")

    def row(self, data: Any, record: dict) -> dict:
        return encoding.tagging_row(data.tokenizer, record, data.cfg.max_length)

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        return encoding.collate(rows, batch_size, buckets, pad_id,
                                token_fields={"token_type_ids": (np.int32, 0), "labels": (np.int32, IGNORE_INDEX)},
                                row_fields={"word_count": (np.int32, 0)})

    def example_batch(self, cfg: Any, rows: int) -> dict:
        return {**super().example_batch(cfg, rows), "word_count": ((rows,), np.int32)}

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        out = super().eval_outputs(output, batch)
        out["predictions"] = jnp.argmax(output.logits, -1).astype(jnp.int32)
        return out

    def host_fields(self, batch: dict) -> dict:
        return {**super().host_fields(batch), "word_count": np.asarray(batch["word_count"])}

    def evaluate(self, outputs, host, data, split, task_cfg=None):
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        names = list(data.label_names)
        outside = "O" if "O" in names else names[0]
        gold_all = word_labels(data, split)
        predicted, gold = [], []
        for output, rows in zip(outputs, host):
            for row in np.flatnonzero(rows["valid"]):
                count = int(rows["word_count"][row])
                predicted.append(_word_predictions(output["predictions"][row], rows["labels"][row], count, names,
                                                   outside))
                gold_words = list(gold_all[len(gold)])
                if len(gold_words) != count:
                    raise DataError(f"{split} example {len(gold)}: the batch says {count} words but the split's "
                                    f"gold tags have {len(gold_words)}")
                gold.append(gold_words)
        scheme = data.tag_scheme
        if scheme is not None:
            scores = metrics.entity_scores(gold, predicted, scheme)
            result.update(scores, report=metrics.entity_report(gold, predicted, scheme))
            return result, None
        flat_gold = [names.index(t) for sentence in gold for t in sentence]
        flat_pred = [names.index(t) for sentence in predicted for t in sentence]
        result.update(accuracy=metrics.accuracy(flat_gold, flat_pred),
                      macro_f1=metrics.macro_f1(flat_gold, flat_pred, names),
                      report=metrics.classification_report(flat_gold, flat_pred, names))
        return result, None

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        if data.tag_scheme is not None:
            return super().metric_names(cfg, data) + ("precision", "recall", "f1")
        return super().metric_names(cfg, data) + ("accuracy", "macro_f1")
