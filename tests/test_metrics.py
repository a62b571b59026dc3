"""flaxen.metrics against independent references: seqeval, scikit-learn and hand counts."""
import math

import numpy as np
import pytest
from seqeval.metrics import classification_report as seqeval_report
from seqeval.metrics import f1_score, precision_score, recall_score
from sklearn.metrics import accuracy_score, f1_score as sk_f1, precision_recall_fscore_support

from flaxen import metrics

TYPES = ["PER", "LOC", "ORG"]


def _random_tags(rng, length, scheme):
    tags, prev = [], "O"
    for _ in range(length):
        r = rng.random()
        if r < 0.45:
            tag = "O"
        else:
            entity_type = TYPES[rng.integers(len(TYPES))]
            prefix = "B" if (scheme == "IOB2" and (prev == "O" or prev[2:] != entity_type)) else "I"
            if rng.random() < 0.2:
                prefix = "B"
            tag = f"{prefix}-{entity_type}"
        tags.append(tag)
        prev = tag
    return tags


def _corpus(seed, scheme, n=60):
    rng = np.random.default_rng(seed)
    gold = [_random_tags(rng, int(rng.integers(1, 15)), scheme) for _ in range(n)]
    predicted = [[t if rng.random() < 0.7 else _random_tags(rng, 1, scheme)[0] for t in s] for s in gold]
    return gold, predicted


def test_entities_by_hand():
    # IOB1: an entity may open with I-; B- separates two adjacent entities of the same type.
    assert metrics.get_entities(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)]
    assert metrics.get_entities(["B-PER", "I-LOC", "I-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"]]
    scores = metrics.entity_scores(gold, predicted)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2"])
def test_entity_scores_match_seqeval(scheme):
    for seed in range(5):
        gold, predicted = _corpus(seed, scheme)
        ours = metrics.entity_scores(gold, predicted, scheme=scheme)
        assert ours["precision"] == pytest.approx(precision_score(gold, predicted), abs=1e-12)
        assert ours["recall"] == pytest.approx(recall_score(gold, predicted), abs=1e-12)
        assert ours["f1"] == pytest.approx(f1_score(gold, predicted), abs=1e-12)
        reference = seqeval_report(gold, predicted, output_dict=True, zero_division=0)
        for entity_type, row in metrics.entity_report(gold, predicted, scheme=scheme).items():
            for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
                assert row[key] == pytest.approx(reference[entity_type][ref_key], abs=1e-12)
            assert row["support"] == reference[entity_type]["support"]


def test_iob1_and_iob2_encodings_give_the_same_entities():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    assert metrics.get_entities(iob1) == metrics.get_entities(iob2)


def test_bad_tag_is_named():
    with pytest.raises(ValueError, match="PERSON"):
        metrics.entity_scores([["PERSON"]], [["O"]])


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, 200))
    names = ["a", "b", "c", "d"]
    assert metrics.accuracy(labels, predictions) == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert metrics.macro_f1(labels, predictions, names) == pytest.approx(
        sk_f1(labels, predictions, average="macro", labels=[0, 1, 2, 3]), abs=1e-12)
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=[0, 1, 2, 3], zero_division=0)
    report = metrics.classification_report(labels, predictions, names)
    for i, name in enumerate(names):
        assert report[name]["precision"] == pytest.approx(p[i], abs=1e-12)
        assert report[name]["recall"] == pytest.approx(r[i], abs=1e-12)
        assert report[name]["f1"] == pytest.approx(f[i], abs=1e-12)
        assert report[name]["support"] == s[i]


def test_classification_by_hand():
    report = metrics.classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["neg", "pos"])
    assert report["neg"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert report["pos"]["precision"] == pytest.approx(2 / 3)
    assert metrics.accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == 0.75


def test_perplexity():
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == math.inf
