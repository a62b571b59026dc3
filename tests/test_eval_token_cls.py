"""flaxen.evaluate for tagging: sub-token predictions back to words (first sub-token per word,
truncated words predicted O), entity scores against seqeval on an independently decoded copy."""
import jax
import numpy as np
import pytest
from flax import nnx
from seqeval.metrics import f1_score, precision_score, recall_score

import models
from flaxen import evaluate, modeling, steps

TINY = models.ModelConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0,
                          attention_dropout=0.0)
NAMES = ["O", "B-EVEN", "I-EVEN"]


class SubTokenData:
    """Sentences of words split into 1-2 sub-tokens; labels on first sub-tokens only; the last
    words of long sentences cut off by a max length of 10 tokens (still counted in word_count)."""

    def __init__(self, seed=0, n=13, max_len=10):
        rng = np.random.default_rng(seed)
        self.label_names, self.tag_scheme = NAMES, "IOB2"
        self.tokenizer = None
        rows, self.gold = [], []
        for _ in range(n):
            words = int(rng.integers(2, 9))
            tags = ["O"] * words
            for i in range(words):
                if rng.random() < 0.4:
                    tags[i] = "I-EVEN" if i and tags[i - 1] != "O" and rng.random() < 0.5 else "B-EVEN"
            ids, labels = [], []
            for word, tag in enumerate(tags):
                pieces = int(rng.integers(1, 3))
                for piece in range(pieces):
                    ids.append(int(rng.integers(2, 50)))
                    labels.append(NAMES.index(tag) if piece == 0 else -100)
            ids, labels = ids[:max_len], labels[:max_len]
            rows.append((ids, labels, words))
            self.gold.append(tags)
        self.rows = rows

    def records(self, split):
        """Stored sentences as the token_cls task reads them: one tag id per word."""
        return [{"tags": [NAMES.index(t) for t in tags]} for tags in self.gold]

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


def test_entity_scores_on_words_match_seqeval():
    data = SubTokenData()
    model = modeling.ModelSpec(TINY, "token_cls", 3).build(3)
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
        tags = [NAMES[int(np.argmax(logits[i]))] for i in first_pieces]
        predicted.append(tags + ["O"] * (words - len(tags)))
    assert any(len(p) > sum(1 for l in labels if l != -100) for p, (_, labels, _) in zip(predicted, data.rows))
    assert result["num_examples"] == len(data.rows)
    assert result["f1"] == pytest.approx(f1_score(data.gold, predicted), abs=1e-12)
    assert result["precision"] == pytest.approx(precision_score(data.gold, predicted), abs=1e-12)
    assert result["recall"] == pytest.approx(recall_score(data.gold, predicted), abs=1e-12)
    assert set(result["report"]) <= {"EVEN"}
    table = evaluate.format_table(result, "token_cls")
    assert "precision" in table and "f1" in table
