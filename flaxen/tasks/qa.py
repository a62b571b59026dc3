"""Extractive question answering (SQuAD v1.1) as Hugging Face's run_qa.py does it.

Why this shape: a context can be longer than the model's window, so each question becomes one or
more *features* (run_qa's word): `[CLS] question [SEP] context-window [SEP]`, the question whole
(left whitespace stripped) and only the context cut into windows of at most `data.max_length`
tokens, consecutive windows sharing `data.doc_stride` tokens (Hugging Face's `stride`). The model
scores every position as the answer's start and end; evaluation maps the best-scoring span of any
window back to characters of the context through the tokenizer's offsets, so predictions are
substrings of the original text, scored with the official v1.1 metric (flaxen.metrics.squad_scores).

Features (`features`, `split_features`), numpy, one per window, T' tokens:
    input_ids, token_type_ids   int32 [T']   (token types from the tokenizer's pair template)
    offsets                     int32 [T', 2] the context characters [start, end) of each token;
                                              -1 -1 on special and question tokens (run_qa's None)
    start_positions, end_positions  int     the answer's first and last token (the record's first
                                              answer), or the [CLS] index (0) when the answer is not
                                              wholly inside this window
    example_index               int          the record's index in its split
    feature_index               int          the feature's index in its split (split_features)
Batches (`collate`), padded to the smallest bucket >= the longest row and to batch_size rows:
    input_ids, attention_mask, token_type_ids [batch, T]; start_positions, end_positions,
    feature_index (-1 for padding rows), valid [batch]; all int32.
Model output: start_logits, end_logits float32 [batch, T].

One deliberate difference from run_qa's labels: run_qa walks the start index past the window's
last context token when the answer starts in that token (its comment calls it an edge case), which
labels the final [SEP]; here the walk stops at the last context token, so such an answer is
labelled with its own token. Everything else (ids, types, offsets, windows, labels) is identical;
tests/test_qa_task.py checks it against transformers' tokenizer and run_qa's labelling code.

Attribution targets: two, the start logit at the answer's first token and the end logit at its
last (default: the span `best_answer` picks), as captum's BERT SQuAD tutorial attributes them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import AttributionTarget, Task, check_unused, epochs, register, softmax

# salt of the train shuffle's grain seed (flaxen.data.pipeline.seed32)
SHUFFLE_SALT = 7
# the loss of a padded position: effectively -inf, but finite so fully padded rows stay finite
_MASKED_LOGIT = -1e9


# ---------------------------------------------------------------------- features (host, pure)

def _windows(context_length: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
    """[start, stop) of each context window: `room` tokens a window, consecutive windows sharing
    `doc_stride` tokens, the last one ending at the context's end (the `tokenizers` library's
    overflow rule for truncation with a stride)."""
    if context_length <= room:
        return [(0, context_length)]
    step = room - doc_stride
    spans = []
    for start in range(0, context_length, step):
        stop = min(start + room, context_length)
        spans.append((start, stop))
        if stop == context_length:
            break
    return spans


def _answer_positions(offsets: np.ndarray, first: int, last: int, start_char: int, end_char: int,
                      cls_index: int) -> tuple[int, int]:
    """run_qa's train labels for one window whose context tokens are positions first..last:
    the tokens holding the answer's first and last characters, or (cls_index, cls_index) when the
    answer is not wholly inside the window."""
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def _record_features(tokenizer, record: dict, question, context, max_length: int, doc_stride: int,
                     example_index: int) -> list[dict]:
    """The features of one record from its question and context encodings (no special tokens)."""
    template = tokenizer.pair_template
    question_ids = list(question.ids)
    context_ids = np.asarray(context.ids, np.int32)
    context_offsets = np.asarray(context.offsets, np.int32).reshape(-1, 2)
    room = max_length - template.num_special - len(question_ids)
    qid = record.get("id", example_index)
    if room <= 0:
        raise ConfigError(f"question {qid!r}: its {len(question_ids)} tokens and {template.num_special} special "
                          f"tokens leave no room for the context within data.max_length={max_length}; raise "
                          "data.max_length")
    if len(context_ids) > room and doc_stride >= room:
        raise ConfigError(f"question {qid!r}: data.doc_stride={doc_stride} must be smaller than the {room} context "
                          f"tokens a window has beside the question's {len(question_ids)} tokens within "
                          f"data.max_length={max_length}; lower data.doc_stride or raise data.max_length")
    spans = _windows(len(context_ids), room, doc_stride)
    texts, starts = record["answer_texts"], record["answer_starts"]
    if len(texts) == 0:
        raise DataError(f"question {qid!r} has no answers (a SQuAD v2.0 unanswerable question?); only SQuAD v1.1, "
                        "where every question has an answer, is supported")
    start_char = int(starts[0])
    end_char = start_char + len(texts[0])
    # (token id, token type) before and after the context window: [CLS] question [SEP] | [SEP]
    head = list(template.prefix) + [(t, template.type_a) for t in question_ids] + list(template.middle)
    tail = list(template.suffix)
    head_ids, tail_ids = np.asarray([t for t, _ in head], np.int32), np.asarray([t for t, _ in tail], np.int32)
    head_types, tail_types = [k for _, k in head], [k for _, k in tail]
    first = len(head)
    cls = tokenizer.cls_token_id
    out = []
    for start, stop in spans:
        n = stop - start
        ids = np.concatenate([head_ids, context_ids[start:stop], tail_ids])
        types = np.asarray(head_types + [template.type_b] * n + tail_types, np.int32)
        offsets = np.full((len(ids), 2), -1, np.int32)
        offsets[first:first + n] = context_offsets[start:stop]
        # run_qa's "impossible answer" label: the first [CLS] (else position 0)
        cls_index = int(np.argmax(ids == cls)) if cls is not None and (ids == cls).any() else 0
        start_position, end_position = _answer_positions(offsets, first, first + n - 1, start_char, end_char,
                                                         cls_index) if n else (cls_index, cls_index)
        out.append({"input_ids": ids, "token_type_ids": types, "offsets": offsets,
                    "start_positions": int(start_position), "end_positions": int(end_position),
                    "example_index": int(example_index)})
    return out


def features(tokenizer, record: dict, max_length: int, doc_stride: int, example_index: int = 0) -> list[dict]:
    """The features (windows) of one qa record, as run_qa's prepare_train_features and
    prepare_validation_features make them (see the module docstring for the keys).

    tokenizer: a flaxen.data.tokenizers.Tokenizer; record: {"id", "question", "context",
    "answer_texts", "answer_starts", ...}. ConfigError naming data.max_length (and data.doc_stride)
    and the question id when the question leaves no room for the context."""
    backend = tokenizer.backend
    question = backend.encode(record["question"].lstrip(), add_special_tokens=False)
    context = backend.encode(record["context"], add_special_tokens=False)
    return _record_features(tokenizer, record, question, context, max_length, doc_stride, example_index)


def split_features(tokenizer, records: Sequence[dict], max_length: int, doc_stride: int) -> list[dict]:
    """`features` of every record in order, each with its `feature_index`; each distinct context
    and all questions are tokenized in one batch each."""
    backend = tokenizer.backend
    contexts = list(dict.fromkeys(r["context"] for r in records))
    context_encodings = dict(zip(contexts, backend.encode_batch(contexts, add_special_tokens=False)))
    questions = backend.encode_batch([r["question"].lstrip() for r in records], add_special_tokens=False)
    out = []
    for index, (record, question) in enumerate(zip(records, questions)):
        out.extend(_record_features(tokenizer, record, question, context_encodings[record["context"]],
                                    max_length, doc_stride, index))
    for index, feature in enumerate(out):
        feature["feature_index"] = index
    return out


# ---------------------------------------------------------------------- answers (host, pure)

def best_answer(context: str, windows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_best_size: int = 20,
                max_answer_length: int = 30) -> str:
    """The answer text of one question: run_qa's postprocess_qa_predictions for SQuAD v1.1.

    windows: one (start_logits [T'], end_logits [T'], offsets [T', 2]) per feature of the question,
    over the feature's own T' tokens (run_qa ranks the padded row, so its candidates can depend on
    the padding), offsets -1 outside the context. In each window the n_best_size highest start and end logits
    are paired; pairs outside the context, of negative length or longer than max_answer_length
    tokens are skipped; the best pair over all windows by start_logit + end_logit (the first on a
    tie) gives context[offsets[start][0]:offsets[end][1]]. "" when no pair qualifies (run_qa
    writes "empty")."""
    best_score, best_span = None, None
    for start_logits, end_logits, offsets in windows:
        found = best_span_tokens(start_logits, end_logits, offsets, n_best_size, max_answer_length)
        if found is not None and (best_score is None or found[2] > best_score):
            offsets = np.asarray(offsets)
            best_score, best_span = found[2], (int(offsets[found[0]][0]), int(offsets[found[1]][1]))
    if best_span is None:
        return ""
    return context[best_span[0]:best_span[1]]


def best_span_tokens(start_logits, end_logits, offsets, n_best_size: int = 20,
                     max_answer_length: int = 30) -> tuple[int, int, float] | None:
    """(start token, end token, score) of one window's best answer by `best_answer`'s rule, or None."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    offsets = np.asarray(offsets)
    starts = np.argsort(start_logits)[-1:-n_best_size - 1:-1].tolist()
    ends = np.argsort(end_logits)[-1:-n_best_size - 1:-1].tolist()
    best = None
    for s in starts:
        if offsets[s][0] < 0:
            continue
        for e in ends:
            if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            score = start_logits[s] + end_logits[e]
            if best is None or score > best[2]:
                best = (s, e, score)
    return best


# ---------------------------------------------------------------------- the task

@register
class QuestionAnswering(Task):
    """Extractive QA: a start and an end logit per token; metrics exact_match and f1 in percent."""

    name = "qa"
    head = "qa"
    data_kinds = ("qa",)
    best_metric = ("f1", "max")

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        return super().metric_names(cfg, data) + ("exact_match", "f1")

    # ------------------------------------------------------------------ data (host)

    def check_data_config(self, cfg: Any) -> None:
        if not 0 <= cfg.doc_stride < cfg.max_length:
            raise ConfigError(f"data.doc_stride={cfg.doc_stride}: expected 0 or more tokens shared by consecutive "
                              f"windows, fewer than data.max_length={cfg.max_length}")

    def split_features(self, data: Any, split: str) -> list[dict]:
        """The features of `split` (cached per TaskData)."""
        cfg = data.cfg
        return data.cached(("qa_features", split, cfg.max_length, cfg.doc_stride),
                           lambda: split_features(data.tokenizer, data.records(split), cfg.max_length, cfg.doc_stride))

    def rows(self, data: Any, split: str, train: bool, seed: int):
        """grain MapDataset of the split's features (train: shuffled per epoch, endless)."""
        return epochs(self.split_features(data, split), train, seed, salt=SHUFFLE_SALT)

    def num_examples(self, data: Any, split: str) -> int:
        """Features (windows) of one ordered pass; a question has one or more."""
        return len(self.split_features(data, split))

    def length_grouping(self, cfg: Any) -> int:
        return int(cfg.length_grouping)

    def collate(self, rows: Sequence, batch_size: int, buckets: Sequence[int], pad_id: int) -> dict:
        """Rows (features, or encoding.PADDING) -> the batch (see the module docstring)."""
        return encoding.collate(rows, batch_size, buckets, pad_id, token_fields={"token_type_ids": (np.int32, 0)},
                                row_fields={"start_positions": (np.int32, 0), "end_positions": (np.int32, 0),
                                            "feature_index": (np.int32, -1)})

    def example_batch(self, cfg: Any, rows: int) -> dict:
        length = self.row_length(cfg.data)
        token, row = ((rows, length), np.int32), ((rows,), np.int32)
        return {"input_ids": token, "attention_mask": token, "token_type_ids": token, "start_positions": row,
                "end_positions": row, "feature_index": row, "valid": row}

    # ------------------------------------------------------------------ device (traced)

    def loss_weight(self, batch: dict):
        return jnp.sum(batch["valid"].astype(jnp.float32))

    def loss_terms(self, output: Any, batch: dict):
        """Hugging Face's QA loss, (CE(start) + CE(end)) / 2 per valid row, summed, and the number of
        valid rows. The softmax runs over the row's own tokens (attention_mask 1), so the loss does
        not depend on the bucket a row is padded to."""
        import optax

        valid = batch["valid"].astype(jnp.float32)
        mask = batch["attention_mask"] > 0

        def cross_entropy(logits, positions):
            logits = jnp.where(mask, logits.astype(jnp.float32), _MASKED_LOGIT)
            return optax.softmax_cross_entropy_with_integer_labels(logits, positions.astype(jnp.int32))

        per_row = (cross_entropy(output.start_logits, batch["start_positions"])
                   + cross_entropy(output.end_logits, batch["end_positions"])) / 2.0
        return jnp.sum(per_row * valid), jnp.sum(valid)

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        out = super().eval_outputs(output, batch)
        out["start_logits"] = output.start_logits.astype(jnp.float32)
        out["end_logits"] = output.end_logits.astype(jnp.float32)
        return out

    # ------------------------------------------------------------------ host (evaluation)

    def host_fields(self, batch: dict) -> dict:
        return {"valid": np.asarray(batch["valid"]).astype(bool),
                "feature_index": np.asarray(batch["feature_index"]).astype(np.int64)}

    def evaluate(self, outputs: list[dict], host: list[dict], data: Any, split: str,
                 task_cfg: Any = None) -> tuple[dict, Any]:
        """(metrics, predictions) of one pass over `split`.

        metrics: loss (mean per feature), num_examples (questions scored), exact_match and f1 in
        percent (0-100, as the official SQuAD v1.1 evaluation script prints them). predictions:
        {question id: answer text}, the official script's input format. A question is scored when
        all of its windows were evaluated (eval_batches may cut a pass short)."""
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        n_best_size = int(getattr(task_cfg, "n_best_size", 20) if task_cfg is not None else 20)
        max_answer_length = int(getattr(task_cfg, "max_answer_length", 30) if task_cfg is not None else 30)
        feats = self.split_features(data, split)
        logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for out, fields in zip(outputs, host):
            starts, ends = np.asarray(out["start_logits"]), np.asarray(out["end_logits"])
            for row in np.flatnonzero(fields["valid"]):
                index = int(fields["feature_index"][row])
                n = len(feats[index]["input_ids"])
                logits[index] = (starts[row, :n], ends[row, :n])
        by_example: dict[int, list[int]] = defaultdict(list)
        for feature in feats:
            by_example[feature["example_index"]].append(feature["feature_index"])
        records = data.records(split)
        predictions, references = {}, {}
        for example, indices in by_example.items():
            if not all(i in logits for i in indices):
                continue
            record = records[example]
            windows = [(*logits[i], feats[i]["offsets"]) for i in indices]
            predictions[record["id"]] = best_answer(record["context"], windows, n_best_size, max_answer_length)
            references[record["id"]] = list(record["answer_texts"])
        scores = metrics.squad_scores(predictions, references) if references else \
            {"exact_match": float("nan"), "f1": float("nan")}
        result["num_examples"] = len(references)
        result.update(scores)
        return result, predictions

    # ------------------------------------------------------------------ prediction (predict.py)

    hf_pipeline = "question-answering"

    def predict_records(self, path, cfg, options):
        """SQuAD-format JSON (answers, if any, ignored) or JSONL of {"question", "context"[, "id"]}."""
        from flaxen import predict

        return predict.read_questions(path, predict.input_format(path, options, self.name, ("squad", "jsonl")))

    def predict_rows(self, records, run, options):
        """Each question's windows (`features`, as evaluation makes them; a long context is cut into
        windows, never truncated)."""
        cfg = run.cfg.data
        rows = []
        for index, record in enumerate(records):
            # no gold answer: the features' start/end labels are not used
            unlabelled = {**record, "answer_texts": [""], "answer_starts": [0]}
            try:
                rows += features(run.tokenizer, unlabelled, cfg.max_length, cfg.doc_stride, index)
            except ConfigError as error:
                raise DataError(f"{record['where']}: {error}") from None
        return rows

    def prediction_outputs(self, output, batch, options):
        return {"start_logits": output.start_logits.astype(jnp.float32),
                "end_logits": output.end_logits.astype(jnp.float32)}

    def format_predictions(self, records, rows, outputs, run, options):
        """{"id", "answer", "score"}: the span evaluation picks (`best_span_tokens` over the
        question's windows, by start + end logit); score = p(start) · p(end) under the softmax over
        that window's tokens, as the loss scores them ("" and 0.0 when no span qualifies)."""
        task_cfg = run.cfg.task
        n_best_size, max_answer_length = int(task_cfg.n_best_size), int(task_cfg.max_answer_length)
        best: dict[int, tuple] = {}
        for row, output in zip(rows, outputs):
            n = len(row["input_ids"])
            starts, ends = np.asarray(output["start_logits"])[:n], np.asarray(output["end_logits"])[:n]
            found = best_span_tokens(starts, ends, row["offsets"], n_best_size, max_answer_length)
            example = row["example_index"]
            if found is not None and (example not in best or found[2] > best[example][0]):
                s, e, logit_sum = found
                probability = float(softmax(starts)[s] * softmax(ends)[e])
                best[example] = (logit_sum, int(row["offsets"][s][0]), int(row["offsets"][e][1]), probability)
        out = []
        for index, record in enumerate(records):
            if index in best:
                _, start, end, probability = best[index]
                out.append({"id": record["id"], "answer": record["context"][start:end], "score": probability})
            else:
                out.append({"id": record["id"], "answer": "", "score": 0.0})
        return out

    # ------------------------------------------------------------------ explanation

    def explain_row(self, tokenizer, data_cfg, text, text_pair=None, context=None) -> dict:
        """The question `text` over `context`: its first window (the row keeps `context`)."""
        check_unused(self, text_pair=text_pair)
        if not context:
            raise ConfigError("task qa explains an answer: give the question as text=... and the passage as "
                              "context=...")
        record = {"id": "explain", "question": text, "context": context, "answer_texts": [""], "answer_starts": [0]}
        row = features(tokenizer, record, data_cfg.max_length, data_cfg.doc_stride)[0]
        return {**row, "context": context}

    def attribution_targets(self, output, row, *, target=None, position=None, span=None, label_names=None):
        check_unused(self, target=target, position=position)
        length = len(row["input_ids"])
        if span is None:
            found = best_span_tokens(np.asarray(output.start_logits)[0, :length],
                                     np.asarray(output.end_logits)[0, :length], row["offsets"])
            start, end = (found[0], found[1]) if found is not None else (0, 0)
        else:
            parts = span.split(":") if isinstance(span, str) else list(span)
            try:
                start, end = (int(p) for p in parts)
            except (TypeError, ValueError):
                start = end = -1
            if not 0 <= start <= end < length:
                raise ConfigError(f"span={span!r}: expected START:END, token indices with 0 <= START <= END < "
                                  f"{length}")
        return [AttributionTarget(f"start logit at token {start}", "start_logits", (int(start),)),
                AttributionTarget(f"end logit at token {end}", "end_logits", (int(end),))]

    def describe_prediction(self, output, row, targets, label_names=None):
        start, end = targets[0].index[0], targets[1].index[0]
        offsets = np.asarray(row["offsets"])
        if offsets[start][0] >= 0 and offsets[end][0] >= 0:
            answer = repr(row["context"][offsets[start][0]:offsets[end][1]])
        else:
            answer = "(no answer inside the context)"
        length = len(row["input_ids"])
        p_start = softmax(np.asarray(output.start_logits)[0, :length])[start]
        p_end = softmax(np.asarray(output.end_logits)[0, :length])[end]
        return f"tokens {start}-{end}: {answer}", {f"start at token {start}": float(p_start),
                                                   f"end at token {end}": float(p_end)}
