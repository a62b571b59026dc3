"""Evaluation metrics computed on the host from gathered predictions (numpy / Python lists).

Why here and not in the jitted step: classification reports and entity matching need label
names and variable-length word sequences; the device only returns per-example predictions.

- Classification (seq_cls): `accuracy`, `macro_f1` and `classification_report`
  (per-class precision / recall / F1 / support) from integer labels `[num_examples]`.
- Tagging (token_cls): entity-level precision / recall / F1 over word tag sequences
  (`list[list[str]]`), following seqeval's default (conlleval) chunking rules, which read both
  IOB1 (an entity may start with `I-`; `B-` only separates two adjacent entities of one type)
  and IOB2 (every entity starts with `B-`). `entity_report` adds the per-type breakdown.
- Language modelling (mlm, clm): `perplexity` from a mean token cross-entropy in nats.
- Extractive QA (qa): SQuAD v1.1's exact match and token F1 after the official script's answer
  normalisation (`squad_normalize`), each the maximum over a question's gold answers;
  `squad_scores` averages them over questions in percent, as evaluate-v1.1.py reports them.
- Generation (seq2seq): `bleu` is sacreBLEU's corpus BLEU (its defaults: 13a tokenisation, mixed
  case, exponential smoothing) on detokenised text, with sacreBLEU's signature string, so a
  number can be compared with published ones; `rouge` is the mean ROUGE-1 / ROUGE-2 / ROUGE-L
  F-measure of the rouge_score package (Google's reimplementation of the ROUGE-1.5.5 script) with
  its Porter stemmer on (use_stemmer=True, as Hugging Face's run_summarization.py reports it);
  ROUGE-L is the sentence-level LCS (`rougeL`, not the newline-split `rougeLsum`). rouge_score's
  tokenizer keeps only [a-z0-9] runs of the lower-cased text, so on German letters outside ASCII
  (ä, ö, ü, ß) words are split. Both in percent (0-100).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Mapping, Sequence

import numpy as np

TAG_SCHEMES = ("IOB1", "IOB2")


def _safe_div(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_div(2 * precision * recall, precision + recall)


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Fraction of examples whose prediction equals the label; labels/predictions `[num_examples]`."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    return float(np.mean(labels == predictions)) if labels.size else 0.0


def classification_report(
    labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support, keyed by label name.

    Classes are `range(len(label_names))` when names are given, else those seen in labels or
    predictions. A class never predicted has precision 0; never present, recall 0 (as sklearn
    with `zero_division=0`).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if label_names is None:
        classes = sorted(set(labels.tolist()) | set(predictions.tolist()))
        names = [str(c) for c in classes]
    else:
        classes, names = list(range(len(label_names))), list(label_names)
    report = {}
    for cls, name in zip(classes, names):
        true_positive = int(np.sum((predictions == cls) & (labels == cls)))
        predicted = int(np.sum(predictions == cls))
        support = int(np.sum(labels == cls))
        precision, recall = _safe_div(true_positive, predicted), _safe_div(true_positive, support)
        report[name] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": support}
    return report


def macro_f1(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str] | None = None) -> float:
    """Unweighted mean of the per-class F1 of `classification_report`."""
    report = classification_report(labels, predictions, label_names)
    return float(np.mean([row["f1"] for row in report.values()])) if report else 0.0


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    return prefix, entity_type or "_"


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    if prev_prefix in ("B", "I") and prefix in ("B", "O"):
        return True
    return prev_prefix not in ("O", ".") and prev_type != entity_type


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    if prefix == "B" or (prev_prefix == "O" and prefix == "I"):
        return True
    return prefix not in ("O", ".") and prev_type != entity_type


def validate_tags(tags: Sequence[str], scheme: str) -> None:
    """Raises ValueError naming the first tag that is not `O`, `B-TYPE` or `I-TYPE`."""
    if scheme not in TAG_SCHEMES:
        raise ValueError(f"tag scheme {scheme!r}: expected one of {', '.join(TAG_SCHEMES)}")
    for position, tag in enumerate(tags):
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ValueError(f"tag {tag!r} at position {position} is not O, B-TYPE or I-TYPE ({scheme})")


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one sentence as `(type, first_word, last_word)` (inclusive), conlleval rules."""
    entities = []
    prev_prefix, prev_type, begin = "O", "", 0
    for position, tag in enumerate(list(tags) + ["O"]):
        prefix, entity_type = _split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            entities.append((prev_type, begin, position - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            begin = position
        prev_prefix, prev_type = prefix, entity_type
    return entities


def _entity_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], scheme: str):
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted ones")
    counts: dict[str, list[int]] = {}
    for index, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"sentence {index}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted tags"
            )
        validate_tags(gold_tags, scheme)
        validate_tags(predicted_tags, scheme)
        gold_set, predicted_set = set(get_entities(gold_tags)), set(get_entities(predicted_tags))
        for entity in gold_set | predicted_set:
            row = counts.setdefault(entity[0], [0, 0, 0])
            row[0] += entity in gold_set and entity in predicted_set
            row[1] += entity in predicted_set
            row[2] += entity in gold_set
    return counts


def entity_scores(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], scheme: str = "IOB2"
) -> dict[str, float]:
    """Micro-averaged entity precision, recall, F1 over all sentences (seqeval's default mode)."""
    counts = _entity_counts(gold, predicted, scheme)
    correct = sum(row[0] for row in counts.values())
    precision = _safe_div(correct, sum(row[1] for row in counts.values()))
    recall = _safe_div(correct, sum(row[2] for row in counts.values()))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def entity_report(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], scheme: str = "IOB2"
) -> dict[str, dict[str, float]]:
    """Per-entity-type precision, recall, F1 and support (gold entities), sorted by type."""
    report = {}
    for entity_type, (correct, n_predicted, n_gold) in sorted(_entity_counts(gold, predicted, scheme).items()):
        precision, recall = _safe_div(correct, n_predicted), _safe_div(correct, n_gold)
        report[entity_type] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": n_gold}
    return report


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


# ---------------------------------------------------------------- SQuAD v1.1 (extractive QA)

_SQUAD_PUNCTUATION = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 answer normalisation: lower case, drop ASCII punctuation
    (string.punctuation), replace the articles a/an/the by spaces, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _SQUAD_PUNCTUATION)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (bags of whitespace tokens). As the official v1.1
    script: 0 when no token is shared, including when both normalise to nothing (the v2.0 script
    and torchmetrics give 1 there)."""
    prediction_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    shared = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(prediction_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_max_over_gold(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any of a question's gold answers."""
    if not len(golds):
        raise ValueError("a question needs at least one gold answer (SQuAD v1.1)")
    return max(metric(prediction, gold) for gold in golds)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent (0-100) over the questions of `references` ({id: gold
    answers}); `predictions` is {id: answer text}. A question without a prediction scores 0 (the
    official script warns and counts it); predictions for ids not in `references` are ignored."""
    exact, f1 = 0.0, 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            continue
        exact += squad_max_over_gold(squad_exact_match, predictions[qid], golds)
        f1 += squad_max_over_gold(squad_f1, predictions[qid], golds)
    total = len(references)
    return {"exact_match": 100.0 * _safe_div(exact, total), "f1": 100.0 * _safe_div(f1, total)}


# ---------------------------------------------------------------- generation (seq2seq)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """{"bleu": corpus BLEU in percent, "bleu_signature": sacreBLEU's signature} of one hypothesis
    per reference (one reference each), with sacreBLEU's default settings (tokenize 13a)."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = BLEU()
    score = scorer.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(score.score), "bleu_signature": str(scorer.get_signature())}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """{"rouge1", "rouge2", "rougeL"}: the mean F-measure over pairs in percent (rouge_score with
    its stemmer; see the module docstring)."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    count = len(hypotheses)
    return {key: 100.0 * _safe_div(total, count) for key, total in totals.items()}
