"""SQuAD v1.1 exact match and F1 against torchmetrics' SQuAD metric, on the real dev answers with
perturbed predictions and on edge cases (empty, punctuation-only, articles-only, unicode, several
gold answers). One documented difference: when prediction and gold both normalise to nothing, the
official v1.1 script (and flaxen) gives F1 0; torchmetrics follows the v2.0 script and gives 1."""
import json
import os

import numpy as np
import pytest

from flaxen import metrics

torchmetrics_text = pytest.importorskip("torchmetrics.text", reason="torchmetrics is in the dev extra")

DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
DEV_FILE = os.path.join(DATA_DIR or "", "squad_v1.1", "dev-v1.1.json")


def torchmetrics_scores(predictions, references):
    """torchmetrics.text.SQuAD over {id: text} predictions and {id: [gold, ...]} references, in percent."""
    metric = torchmetrics_text.SQuAD()
    result = metric([{"id": k, "prediction_text": v} for k, v in predictions.items()],
                    [{"id": k, "answers": {"text": list(v), "answer_start": [0] * len(v)}} for k, v in references.items()])
    return {key: float(value) for key, value in result.items()}


def perturb(gold: str, rng: np.random.Generator, other: str) -> str:
    """A prediction near (or far from) a gold answer: the kinds of errors a QA model makes."""
    words = gold.split()
    kind = rng.integers(0, 10)
    if kind == 0:
        return gold
    if kind == 1:
        return gold.upper() + "."
    if kind == 2:
        return "the " + gold + " ,"
    if kind == 3:
        return " ".join(words[:max(1, len(words) // 2)])
    if kind == 4:
        return gold + " " + " ".join(other.split()[:2])
    if kind == 5:
        return other
    if kind == 6:
        return ""
    if kind == 7:
        return " ".join(reversed(words)) + " " + words[0]
    if kind == 8:
        return gold.replace(" ", "  \t")
    return "An " + gold.lower().replace("e", "é")


def test_scores_equal_torchmetrics_on_perturbed_dev_answers():
    if not DATA_DIR or not os.path.isfile(DEV_FILE):
        pytest.skip("FLAXEN_DATA_DIR/squad_v1.1/dev-v1.1.json is not available")
    with open(DEV_FILE) as f:
        articles = json.load(f)["data"]
    references = {qa["id"]: [a["text"] for a in qa["answers"]]
                  for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    assert len(references) == 10570
    rng = np.random.default_rng(0)
    ids = list(references)
    predictions = {}
    for qid in ids:
        golds = references[qid]
        gold = golds[rng.integers(0, len(golds))]
        other = references[ids[rng.integers(0, len(ids))]][0]
        predictions[qid] = perturb(gold, rng, other)
    # both sides empty after normalisation is where v1.1 and torchmetrics part (see the module docstring)
    both_empty = [qid for qid, text in predictions.items() if not metrics.squad_normalize(text)
                  and any(not metrics.squad_normalize(g) for g in references[qid])]
    assert both_empty == []
    ours = metrics.squad_scores(predictions, references)
    theirs = torchmetrics_scores(predictions, references)
    assert 20 < ours["exact_match"] < 80 and ours["f1"] > ours["exact_match"]
    # torchmetrics sums 10,570 scores in a float32 tensor: about 1e-3 points of rounding
    assert ours["exact_match"] == pytest.approx(theirs["exact_match"], abs=1e-2)
    assert ours["f1"] == pytest.approx(theirs["f1"], abs=1e-2)
    for qid in ids[::10]:  # per question, exactly
        one = {qid: references[qid]}
        reference = torchmetrics_scores({qid: predictions[qid]}, one)
        assert metrics.squad_scores({qid: predictions[qid]}, one) == pytest.approx(reference, abs=1e-4)


EDGE_CASES = [
    ("", ["Denver Broncos"]),
    ("?!...", ["Denver Broncos"]),
    ("the a an", ["Denver Broncos"]),
    ("The", ["the Broncos"]),
    ("Denver Broncos", ["Carolina Panthers", "the Denver Broncos", "Broncos"]),
    ("Broncos of Denver", ["Denver", "Denver Broncos", "Broncos"]),
    ("Zürich, Switzerland", ["zürich"]),
    ("São Paulo – Brazil", ["Sao Paulo", "São Paulo"]),
    ("Théâtre «the» national", ["theatre national", "Théâtre national"]),
    ("50 50 50", ["50"]),
    ("the  anthem\n(of) Denver", ["anthem of denver"]),
    ("an apple a day", ["Apple day"]),
    ("theater", ["the ater"]),
]


@pytest.mark.parametrize("prediction, golds", EDGE_CASES)
def test_edge_cases_equal_torchmetrics(prediction, golds):
    ours = metrics.squad_scores({"q": prediction}, {"q": golds})
    assert ours == pytest.approx(torchmetrics_scores({"q": prediction}, {"q": golds}), abs=1e-4)
    assert ours["exact_match"] == 100 * max(metrics.squad_exact_match(prediction, g) for g in golds)


def test_normalisation_equals_torchmetrics():
    from torchmetrics.functional.text.squad import _normalize_text

    for prediction, golds in EDGE_CASES:
        for text in [prediction, *golds]:
            assert metrics.squad_normalize(text) == _normalize_text(text)
    assert metrics.squad_normalize("The Broncos' (a) 'Super Bowl'!") == "broncos super bowl"


def test_both_empty_after_normalisation_follows_the_v1_1_script():
    """evaluate-v1.1.py: f1 is 0 when no token is shared, even between two empty answers; exact match 1."""
    assert metrics.squad_exact_match("the", "A") == 1.0
    assert metrics.squad_f1("the", "A") == 0.0
    theirs = torchmetrics_scores({"q": "the"}, {"q": ["A"]})
    assert theirs == {"exact_match": 100.0, "f1": 100.0}
    assert metrics.squad_scores({"q": "the"}, {"q": ["A"]}) == {"exact_match": 100.0, "f1": 0.0}


def test_missing_predictions_score_zero_and_extra_ones_are_ignored():
    references = {"a": ["Denver Broncos"], "b": ["Carolina Panthers"]}
    predictions = {"a": "Denver Broncos", "z": "anything"}
    assert metrics.squad_scores(predictions, references) == {"exact_match": 50.0, "f1": 50.0}
    assert metrics.squad_f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one gold answer"):
        metrics.squad_scores({"a": "x"}, {"a": []})
