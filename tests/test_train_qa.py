"""Extractive QA end to end through train.py and eval.py: a tiny BERT from scratch with the
all-MiniLM-L6-v2 tokenizer on a slice of real SQuAD articles split by the held-out-articles
mechanism; eval.py writes predictions_<split>.json in the official script's format, and its
scores equal the official v1.1 metric recomputed here from those predictions."""
import collections
import importlib.util
import json
import os
import re
import string

import pytest

from flaxen import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
DEV_FILE = os.path.join(DATA_DIR or "", "squad_v1.1", "dev-v1.1.json")


def _entry(name):
    spec = importlib.util.spec_from_file_location(f"flaxen_entry_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _official_normalize(text):
    """SQuAD v1.1's evaluation script, written out again here as the reference."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _official_f1(prediction, truth):
    prediction, truth = _official_normalize(prediction).split(), _official_normalize(truth).split()
    common = sum((collections.Counter(prediction) & collections.Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(truth)
    return 2 * precision * recall / (precision + recall)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    if not os.path.isfile(DEV_FILE):
        pytest.skip("FLAXEN_DATA_DIR/squad_v1.1/dev-v1.1.json is not available")
    import models

    base = tmp_path_factory.mktemp("qa")
    with open(DEV_FILE) as f:
        document = json.load(f)
    # 4 articles, 3 paragraphs each: one article is held out whole as validation
    document["data"] = [dict(article, paragraphs=article["paragraphs"][:3]) for article in document["data"][:4]]
    data_dir = base / "data"
    (data_dir / "squad_v1.1").mkdir(parents=True)
    with open(data_dir / "squad_v1.1" / "dev-v1.1.json", "w") as f:
        json.dump(document, f)
    run_dir = str(base / "run")
    cfg = config.compose([
        "task=qa", "data=squad", "model=bert_tiny", "model.num_layers=1", "model.hidden_size=32",
        "model.intermediate_size=64", "model.max_position_embeddings=128", "data.max_length=96",
        "data.doc_stride=32", "data.bucket_lengths=[64,96]", "data.holdout_groups=1", "data.length_grouping=0",
        "data.tokenizer.kind=pretrained", f"data.tokenizer.path={models.minilm_path()}",
        "steps=4", "batch_size=8", "eval_batch_size=16", "eval_every=4", "log_every=2", "checkpoint_every=4",
        "schedule.warmup_steps=1", "progress_bar=false", "loggers=[]",
        f"data_dir={data_dir}", f"data.prepared_dir={base / 'prepared'}", f"run_dir={run_dir}"])
    results = _entry("train").run(cfg)
    evaluator = _entry("eval")
    eval_cfg = config.compose([f"run_dir={run_dir}", "split=validation", f"data_dir={data_dir}"],
                              config_name="eval")
    report = evaluator.run(eval_cfg, [f"run_dir={run_dir}", "split=validation", f"data_dir={data_dir}"])
    return {"results": results, "report": report, "run_dir": run_dir, "document": document}


def test_qa_trains_and_eval_writes_official_predictions(qa_run):
    results, report, run_dir = qa_run["results"], qa_run["report"], qa_run["run_dir"]
    assert results["status"] == "completed" and results["best_metric"] == {"name": "f1", "mode": "max"}
    assert set(results["final_eval"]) >= {"loss", "num_examples", "exact_match", "f1"}
    with open(os.path.join(run_dir, "predictions_validation.json")) as f:
        predictions = json.load(f)
    answers = {qa["id"]: [a["text"] for a in qa["answers"]]
               for article in qa_run["document"]["data"] for paragraph in article["paragraphs"]
               for qa in paragraph["qas"]}
    contexts = {qa["id"]: paragraph["context"] for article in qa_run["document"]["data"]
                for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    metrics = report["metrics"]
    assert metrics["num_examples"] == len(predictions) > 0
    assert set(predictions) <= set(answers)
    assert all(isinstance(text, str) and text in contexts[qid] for qid, text in predictions.items())
    exact = 100 * sum(max(_official_normalize(p) == _official_normalize(t) for t in answers[q])
                      for q, p in predictions.items()) / len(predictions)
    f1 = 100 * sum(max(_official_f1(p, t) for t in answers[q]) for q, p in predictions.items()) / len(predictions)
    assert metrics["exact_match"] == pytest.approx(exact, abs=1e-9)
    assert metrics["f1"] == pytest.approx(f1, abs=1e-9)
