"""Token classification (tagging): one tag per word, scored on each word's first sub-token.

Rows: [CLS] sub-tokens [SEP] cut to data.max_length; labels [T'] carry each word's tag id on its
first sub-token and IGNORE_INDEX elsewhere; `word_count` keeps the untruncated number of words.
Metrics: loss; with an IOB tag scheme, entity precision / recall / F1 on words (seqeval's
conventions) and a per-type report; otherwise word accuracy, macro_f1 and a per-tag report.
Words come back from sub-tokens through the labels; words cut off by truncation count as
predicted `O`.

Classes (flaxen.tasks.base.ClassTask) are entity types: with an IOB tag scheme a mention is an
entity (seqeval's chunking: flaxen.metrics.get_entities), B-X / I-X tags giving type X; without one
every tag but `O` is a type and each word tagged with it a mention. A few-shot subset
(data.train_examples_per_class=K) is chosen greedily (flaxen.data.sampling.greedy_cover): every type
has at least K mentions and no sentence can be dropped without some type falling below K. Balanced
resampling counts a sentence for its rarest entity type (the type with the fewest mentions in the
train split among those it holds, ties to the type listed first), and sentences without mentions
form one more class, `none`, so they keep their share. task.class_weights weighs each scored
token's cross-entropy by its tag's weight (`label_weights` [batch, seq]); balanced weights count the
tag ids of scored tokens (each kept word's first sub-token) in the train rows.

Attribution target: the logit of one tag (default: the predicted one) at one token position
(default: the first word's first sub-token, the first position training scores).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import (IGNORE_INDEX, AttributionTarget, ClassTask, TokenTask, check_unused, label_index,
                               label_strings, register, softmax, token_cross_entropy)


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
class TokenClassification(ClassTask, TokenTask):
    name = "token_cls"
    head = "token_cls"
    data_kinds = ("tagging",)
    best_metric = ("f1", "max")

    def row(self, data: Any, record: dict) -> dict:
        return self.weighted_row(data, encoding.tagging_row(data.tokenizer, record, data.cfg.max_length))

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        token_fields = {"token_type_ids": (np.int32, 0), "labels": (np.int32, IGNORE_INDEX)}
        if self.class_weights is not None:
            token_fields["label_weights"] = (np.float32, 0.0)
        return encoding.collate(rows, batch_size, buckets, pad_id, token_fields=token_fields,
                                row_fields={"word_count": (np.int32, 0)})

    def example_batch(self, cfg: Any, rows: int) -> dict:
        shapes = {**super().example_batch(cfg, rows), "word_count": ((rows,), np.int32)}
        if self.class_weights is not None:
            shapes["label_weights"] = (shapes["labels"][0], np.float32)
        return shapes

    def loss_weight(self, batch: dict):
        return jnp.sum(self.scored_weights(batch["labels"] != IGNORE_INDEX, batch))

    def loss_terms(self, output: Any, batch: dict):
        losses, mask = token_cross_entropy(output.logits, batch["labels"])
        return self.weighted_terms(losses, mask.astype(jnp.float32), batch)

    # ------------------------------------------------------------------ classes (ClassTask)

    @staticmethod
    def entity_types(data: Any) -> list[str]:
        """The entity types of the data's tags, in the order the label names first give them."""
        names = list(data.label_names)
        if data.tag_scheme is None:
            return [name for name in names if name != "O"]
        return list(dict.fromkeys(name[2:] for name in names if name != "O"))

    def mentions(self, data: Any, records: list) -> np.ndarray:
        """[records, types] mentions of each entity type (`entity_types`) in each sentence."""
        names, types = list(data.label_names), self.entity_types(data)
        column = {name: index for index, name in enumerate(types)}
        counts = np.zeros((len(records), len(types)), np.int64)
        for row, record in enumerate(records):
            tags = [names[t] for t in record["tags"]]
            found = [entity[0] for entity in metrics.get_entities(tags)] if data.tag_scheme is not None else \
                [tag for tag in tags if tag != "O"]
            for entity_type in found:
                counts[row, column[entity_type]] += 1
        return counts

    def label_counts(self, data: Any) -> np.ndarray:
        counts = np.zeros(len(data.label_names), np.int64)
        for record in data.records("train"):
            labels = encoding.tagging_row(data.tokenizer, record, data.cfg.max_length)["labels"]
            counts += np.bincount(labels[labels != IGNORE_INDEX], minlength=len(counts))
        return counts

    def subset_indices(self, data: Any, records: list, k: int, seed: int) -> np.ndarray:
        from flaxen.data import sampling

        return sampling.greedy_cover(self.mentions(data, records), k, seed, self.entity_types(data))

    def resample_classes(self, data: Any, records: list) -> np.ndarray:
        counts = self.mentions(data, records)
        if counts.shape[1] == 0:
            return np.zeros(len(records), np.int64)
        rank = np.argsort(np.argsort(counts.sum(0), kind="stable"), kind="stable")  # 0: the rarest type
        ranked = np.where(counts > 0, rank[None, :], counts.shape[1])
        rarest = np.argmin(ranked, axis=1)
        return np.where(counts.any(1), rarest, counts.shape[1])

    def subset_summary(self, data: Any, records: list) -> dict:
        return dict(zip(self.entity_types(data), map(int, self.mentions(data, records).sum(0))))

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

    # ------------------------------------------------------------------ prediction (predict.py)

    hf_pipeline = "token-classification"

    def predict_records(self, path, cfg, options):
        """CoNLL (a token per line, first column; a blank line between sentences) or one sentence
        per line, split on white space."""
        from flaxen import predict

        form = predict.input_format(path, options, self.name, ("conll", "lines"))
        if form == "lines" and options.format == "auto" and predict.looks_like_conll(path):
            form = "conll"
        if form == "conll":
            return predict.read_conll(path)
        return [{"where": r["where"], "tokens": r["text"].split()}
                for r in predict.read_lines(path, "one sentence per line")]

    def predict_rows(self, records, run, options):
        """Training's rows (`encoding.tagging_inputs`) with `first_positions`, each kept word's
        first sub-token: the position its tag is read from."""
        from flaxen import predict

        limit = run.cfg.data.max_length
        rows = []
        for record in records:
            row, firsts, length = encoding.tagging_inputs(run.tokenizer, record["tokens"], limit)
            if length > limit and not options.truncate:
                raise predict.too_long(record["where"], length, limit, "data.max_length")
            rows.append({**row, "first_positions": firsts})
        return rows

    def prediction_outputs(self, output, batch, options):
        return {"predictions": jnp.argmax(output.logits, -1).astype(jnp.int32)}

    def format_predictions(self, records, rows, outputs, run, options):
        """{"tokens", "tags"}: a tag per word, read at its first sub-token; words cut off by
        truncation are tagged O (as evaluation counts them)."""
        count = int(run.spec.num_labels)
        names = label_strings(run.label_names, count)
        outside = "O" if "O" in names else names[0]
        out = []
        for record, row, output in zip(records, rows, outputs):
            tags = [names[int(i)] for i in np.asarray(output["predictions"])[row["first_positions"]]]
            out.append({"tokens": list(record["tokens"]),
                        "tags": tags + [outside] * (len(record["tokens"]) - len(tags))})
        return out

    # ------------------------------------------------------------------ explanation

    def explain_row(self, tokenizer, data_cfg, text, text_pair=None, context=None) -> dict:
        """The text's whitespace-separated words, tagged as training tags them (tags unknown: 0)."""
        check_unused(self, text_pair=text_pair, context=context)
        words = text.split()
        return encoding.tagging_row(tokenizer, {"tokens": words, "tags": [0] * len(words)}, data_cfg.max_length)

    @staticmethod
    def _position(row: dict, position) -> int:
        length = len(row["input_ids"])
        if position is None:
            scored = np.flatnonzero(np.asarray(row["labels"]) != IGNORE_INDEX) if "labels" in row else []
            return int(scored[0]) if len(scored) else 0
        try:
            index = int(position)
        except (TypeError, ValueError):
            index = None
        if index is None or not 0 <= index < length:
            raise ConfigError(f"position={position!r}: expected a token index 0-{length - 1}")
        return index

    def attribution_targets(self, output, row, *, target=None, position=None, span=None, label_names=None):
        check_unused(self, span=span)
        index = self._position(row, position)
        logits = np.asarray(output.logits)[0, index]
        tag = int(np.argmax(logits)) if target is None else label_index(target, label_names, logits.shape[-1])
        name = label_strings(label_names, logits.shape[-1])[tag]
        return [AttributionTarget(f"logit of {name!r} at token {index}", "logits", (index, tag))]

    def describe_prediction(self, output, row, targets, label_names=None):
        index = targets[0].index[0]
        logits = np.asarray(output.logits)[0, index]
        names = label_strings(label_names, logits.shape[-1])
        return f"token {index}: {names[int(np.argmax(logits))]}", dict(zip(names, softmax(logits).tolist()))
