"""flaxen.evaluate for tagging: sub-token predictions back to words (first sub-token per word,
truncated words predicted O), entity scores and the per-type report against seqeval on an
independently decoded copy."""
import jax
import numpy as np
import pytest
from flax import nnx
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

import models
from flaxen import evaluate, modeling, steps

TINY = models.ModelConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0,
                          attention_dropout=0.0)
NAMES = ["O", "B-EVEN", "I-EVEN"]


def tag_names(types):
    return ["O"] + [f"{prefix}-{entity}" for entity in types for prefix in "BI"]


class SubTokenData:
    """Sentences of words split into 1-2 sub-tokens; labels on first sub-tokens only; the last
    words of long sentences cut off by a max length of 10 tokens (still counted in word_count).
    Entities of the given `types` (IOB2 tags)."""

    def __init__(self, seed=0, n=13, max_len=10, types=("EVEN",)):
        rng = np.random.default_rng(seed)
        names = tag_names(types)
        self.label_names, self.tag_scheme = names, "IOB2"
        self.tokenizer = None
        rows, self.gold = [], []
        for _ in range(n):
            words = int(rng.integers(2, 9))
            tags = ["O"] * words
            for i in range(words):
                if rng.random() < 0.4:
                    entity = types[int(rng.integers(len(types)))] if len(types) > 1 else types[0]
                    inside = i and tags[i - 1][2:] == entity and rng.random() < 0.5
                    tags[i] = f"I-{entity}" if inside else f"B-{entity}"
            ids, labels = [], []
            for word, tag in enumerate(tags):
                pieces = int(rng.integers(1, 3))
                for piece in range(pieces):
                    ids.append(int(rng.integers(2, 50)))
                    labels.append(names.index(tag) if piece == 0 else -100)
            ids, labels = ids[:max_len], labels[:max_len]
            rows.append((ids, labels, words))
            self.gold.append(tags)
        self.rows = rows

    def records(self, split):
        """Stored sentences as the token_cls task reads them: one tag id per word."""
        return [{"tags": [self.label_names.index(t) for t in tags]} for tags in self.gold]

    def loader(self, split, batch_size, *, seed=0, train=False, **kwargs):
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            ids = np.zeros((batch_size, 10), np.int32)
            labels = np.full((batch_size, 10), -100, np.int32)
            mask = np.zeros((batch_size, 10), np.int32)
            words = np.zeros(batch_size, np.int32)
            valid = np.zeros(batch_size, np.int32)
            for row, (i, l, w) in enumerate(chunk):
                ids[row, :len(i)], labels[row, :len(l)], mask[row, :len(i)] = i, l, 1
                words[row], valid[row] = w, 1
            yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "labels": labels,
                   "word_count": words, "valid": valid}


def evaluate_and_decode(data, seed=3):
    """flaxen.evaluate's result on `data` with a fresh tagger, and the tagger's word tags decoded
    independently (the whole split in one forward pass; the first sub-token's argmax per word, O for
    words cut off)."""
    names = data.label_names
    model = modeling.ModelSpec(TINY, "token_cls", len(names)).build(seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    result = evaluate.evaluate(steps.make_eval_step(graphdef, "token_cls"), params, rest, data, "token_cls",
                               "validation", batch_size=4)

    ids_all = np.zeros((len(data.rows), 10), np.int32)
    mask_all = np.zeros_like(ids_all)
    for row, (ids, _, _) in enumerate(data.rows):
        ids_all[row, :len(ids)], mask_all[row, :len(ids)] = ids, 1
    all_logits = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m).logits)(ids_all, mask_all))
    predicted = []
    for (ids, labels, words), logits in zip(data.rows, all_logits):
        first_pieces = [i for i, label in enumerate(labels) if label != -100]
        tags = [names[int(np.argmax(logits[i]))] for i in first_pieces]
        predicted.append(tags + ["O"] * (words - len(tags)))
    return result, predicted


def test_entity_scores_on_words_match_seqeval():
    data = SubTokenData()
    assert data.label_names == NAMES
    result, predicted = evaluate_and_decode(data)
    assert any(len(p) > sum(1 for l in labels if l != -100) for p, (_, labels, _) in zip(predicted, data.rows))
    assert result["num_examples"] == len(data.rows)
    assert result["f1"] == pytest.approx(f1_score(data.gold, predicted), abs=1e-12)
    assert result["precision"] == pytest.approx(precision_score(data.gold, predicted), abs=1e-12)
    assert result["recall"] == pytest.approx(recall_score(data.gold, predicted), abs=1e-12)
    assert set(result["report"]) == {"EVEN"}
    table = evaluate.format_table(result, "token_cls")
    assert "precision" in table and "f1" in table


def test_the_report_has_one_row_per_entity_type_as_seqeval_counts_it():
    """Two entity types: the report's rows are exactly the types (gold or predicted), each with
    seqeval's precision, recall, F1 and support (gold entities of that type)."""
    data = SubTokenData(seed=1, n=40, types=("LOC", "PER"))
    result, predicted = evaluate_and_decode(data, seed=5)
    expected = classification_report(data.gold, predicted, output_dict=True, zero_division=0)
    types = {key for key in expected if not key.endswith(" avg")}
    assert types == {"LOC", "PER"}
    assert set(result["report"]) == types
    for name in types:
        row, reference = result["report"][name], expected[name]
        assert row["support"] == reference["support"] > 0, name
        for metric, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert row[metric] == pytest.approx(reference[theirs], abs=1e-12), (name, metric)
    predicted_types = {tag[2:] for sentence in predicted for tag in sentence if tag != "O"}
    assert predicted_types == types  # the tagger predicts both types, so both rows count predictions
    assert sum(row["support"] for row in result["report"].values()) == expected["micro avg"]["support"]
