"""predict.py and export.py on tiny trained runs: predict.py's labels, probabilities and tags equal
transformers' pipelines on export.py's Hugging Face directory (an independent tokenizer and PyTorch
model), a LoRA run exports merged with the same outputs, qa / mlm / clm predictions are checked
against the input and against an unbatched model call, and bad input files are refused naming the
file and line.

Runs: seq_cls on a slice of SST-2, token_cls on a slice of CoNLL-2003, LoRA seq_cls and 2-step qa
on a slice of SQuAD (WordPiece tokenizers trained on the slices), mlm and clm on the generated
quickstart language; 1-layer, 32-wide models.
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flaxen import config, inference
from flaxen import export as exporting
from flaxen import predict as predicting
from flaxen.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
SMALL = ["model=bert_tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
         "model.intermediate_size=64", "model.max_position_embeddings=64", "schedule.warmup_steps=1",
         "batch_size=16", "eval_batch_size=32", "eval_batches=1", "log_every=2", "progress_bar=false", "loggers=[]"]
SENTENCES = ["a gorgeous , witty , seductive movie .",
             "the plot is nothing but boilerplate clichés from start to finish ,",
             "it 's a charming and often affecting journey ."]


def _entry(name):
    spec = importlib.util.spec_from_file_location(f"flaxen_entry_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(**kwargs):
    return predicting.PredictConfig(progress_bar=False, **kwargs)


def _same(a, b, tolerance=1e-6):
    """Two lists of predictions agree: equal but for floats (within `tolerance`)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tolerance) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tolerance
    return a == b


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A data dir with slices of SST-2, CoNLL-2003 and SQuAD."""
    if not DATA_DIR or not os.path.isdir(os.path.join(DATA_DIR, "sst2")):
        pytest.skip("FLAXEN_DATA_DIR with sst2/, conll2003/ and squad_v1.1/ is not available")
    base = tmp_path_factory.mktemp("predict")
    data = base / "data"
    for name in ("sst2", "conll2003", "squad_v1.1"):
        (data / name).mkdir(parents=True)
    for name, lines in (("train.tsv", 301), ("dev.tsv", 41)):
        with open(os.path.join(DATA_DIR, "sst2", name)) as f:
            _write(data / "sst2" / name, "".join(f.readlines()[:lines]))
    for name, count in (("train.txt", 150), ("valid.txt", 30), ("test.txt", 10)):
        with open(os.path.join(DATA_DIR, "conll2003", name)) as f:
            _write(data / "conll2003" / name, "\n\n".join(f.read().split("\n\n")[:count]) + "\n")
    with open(os.path.join(DATA_DIR, "squad_v1.1", "dev-v1.1.json")) as f:
        document = json.load(f)
    document["data"] = [dict(a, paragraphs=a["paragraphs"][:2]) for a in document["data"][:3]]
    _write(data / "squad_v1.1" / "dev-v1.1.json", json.dumps(document))
    return {"base": base, "data": str(data), "squad": document}


def _train(base, name, *overrides):
    run_dir = str(base["base"] / name)
    cfg = config.compose(SMALL + [f"data_dir={base['data']}", f"data.prepared_dir={base['base'] / 'prepared'}",
                                  f"run_dir={run_dir}", *overrides])
    results = _entry("train").run(cfg)
    assert results["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def cls_run(base):
    return _train(base, "cls", "task=seq_cls", "data=sst2", "data.max_length=32", "data.bucket_lengths=[16,32]",
                  "data.length_grouping=0", "data.tokenizer.vocab_size=600", "steps=4", "eval_every=4",
                  "checkpoint_every=4")


@pytest.fixture(scope="module")
def tok_run(base):
    # 2 steps at a tiny learning rate: the tags stay varied (a trained tiny tagger says O everywhere)
    return _train(base, "tok", "task=token_cls", "data=conll2003", "model.max_position_embeddings=128",
                  "data.max_length=128", "data.bucket_lengths=[32,64,128]",
                  "data.length_grouping=0", "data.tokenizer.vocab_size=800", "steps=2", "eval_every=2",
                  "checkpoint_every=2", "optimizer.lr=1e-6")


@pytest.fixture(scope="module")
def exported_cls(cls_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "cls")
    exporting.export(cls_run, out)
    return out


# ---------------------------------------------------------------------- seq_cls

def test_seq_cls_predictions_equal_the_exported_models_pipeline(cls_run, exported_cls, tmp_path):
    from transformers import pipeline

    lines = _write(tmp_path / "reviews.txt", "\n".join(SENTENCES) + "\n")
    predictions = predicting.predict(inference.load_run(cls_run), lines, _options(batch_size=2))
    assert len(predictions) == len(SENTENCES)
    classify = pipeline("text-classification", model=exported_cls, tokenizer=exported_cls, top_k=None)
    for scores, prediction in zip(classify(SENTENCES), predictions):
        reference = {item["label"]: item["score"] for item in scores}
        assert set(prediction["probabilities"]) == set(reference) == {"0", "1"}
        assert prediction["label"] == max(reference, key=reference.get)
        for label, p in reference.items():
            assert prediction["probabilities"][label] == pytest.approx(p, abs=1e-4)
    # the same rows from a TSV with the run's text column (and an extra column), and from JSONL
    tsv = _write(tmp_path / "reviews.tsv", "id\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(SENTENCES)))
    jsonl = _write(tmp_path / "reviews.jsonl", "".join(json.dumps({"sentence": s}) + "\n" for s in SENTENCES))
    run = inference.load_run(cls_run)
    for path in (tsv, jsonl):
        assert _same(predicting.predict(run, path, _options()), predictions)
    with open(os.path.join(exported_cls, "config.json")) as f:
        hf_config = json.load(f)
    assert hf_config["id2label"] == {"0": "0", "1": "1"} and hf_config["label2id"] == {"0": 0, "1": 1}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported_cls)
    assert tokenizer.model_max_length == 32 and tokenizer.cls_token == "[CLS]" and tokenizer.mask_token == "[MASK]"
    assert tokenizer("a b", "c")["token_type_ids"][-2:] == [1, 1]


def test_bad_inputs_name_the_file_and_line(cls_run, tmp_path):
    run = inference.load_run(cls_run)
    empty = _write(tmp_path / "empty.txt", "\n")
    with pytest.raises(DataError, match=rf"{empty}: empty file"):
        predicting.predict(run, empty, _options())
    wrong = _write(tmp_path / "wrong.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=rf"{wrong}:1: no column 'sentence' in the header .*expected the run's text "
                                        r"column 'sentence'"):
        predicting.predict(run, wrong, _options())
    missing = _write(tmp_path / "missing.jsonl", '{"sentence": "fine"}\n{"text": "oops"}\n')
    with pytest.raises(DataError, match=rf"{missing}:2: no key 'sentence'; expected the run's text column 'sentence'"):
        predicting.predict(run, missing, _options())
    blank = _write(tmp_path / "blank.txt", "good\n\nbad\n")
    with pytest.raises(DataError, match=rf"{blank}:2: empty line"):
        predicting.predict(run, blank, _options())
    long_text = " ".join(["movie"] * 40)
    long = _write(tmp_path / "long.txt", f"fine\n{long_text}\n")
    with pytest.raises(DataError, match=rf"{long}:2: 42 tokens, more than the run's data.max_length=32; .*"
                                        "truncate=true"):
        predicting.predict(run, long, _options())
    truncated = predicting.predict(run, long, _options(truncate=True))
    cut = predicting.predict(run, _write(tmp_path / "cut.txt", " ".join(["movie"] * 30) + "\n"), _options())
    assert _same(truncated[1], cut[0])  # cut as training cuts: the first 30 words
    with pytest.raises(DataError, match="file not found"):
        predicting.predict(run, str(tmp_path / "absent.txt"), _options())
    with pytest.raises(ConfigError, match="format='conll': task seq_cls reads lines, tsv, csv, jsonl"):
        predicting.predict(run, long, _options(format="conll"))


# ---------------------------------------------------------------------- token_cls

def test_token_cls_tags_equal_the_exported_models_pipeline(tok_run, base, tmp_path):
    from transformers import AutoTokenizer, pipeline

    with open(os.path.join(base["data"], "conll2003", "valid.txt")) as f:
        conll = _write(tmp_path / "sentences.conll", "\n\n".join(f.read().split("\n\n")[:6]) + "\n")
    run = inference.load_run(tok_run)
    predictions = predicting.predict(run, conll, _options(batch_size=4))
    assert len(predictions) == 5 and all(len(p["tags"]) == len(p["tokens"]) for p in predictions)  # -DOCSTART- skipped
    lines = _write(tmp_path / "sentences.txt", "".join(" ".join(p["tokens"]) + "\n" for p in predictions))
    assert _same(predicting.predict(run, lines, _options()), predictions)
    out = str(tmp_path / "exported")
    exporting.export(tok_run, out)
    tag = pipeline("token-classification", model=out, tokenizer=out, ignore_labels=[])
    tokenizer = AutoTokenizer.from_pretrained(out)
    tags_seen = set()
    for prediction in predictions:
        words = prediction["tokens"]
        text = " ".join(words)
        pieces = [run.tokenizer.word_pieces(w) for w in words]
        assert tokenizer(text)["input_ids"][1:-1] == [i for p in pieces for i in p]
        by_position = {entity["index"]: entity["entity"] for entity in tag(text)}
        firsts = np.cumsum([1] + [len(p) for p in pieces[:-1]])  # after [CLS]
        assert prediction["tags"] == [by_position[int(i)] for i in firsts]
        tags_seen.update(prediction["tags"])
    assert len(tags_seen) > 2  # a varied tagger, so the alignment is really tested


def test_token_cls_truncation_tags_cut_words_o(tok_run, tmp_path):
    run = inference.load_run(tok_run)
    assert len(run.tokenizer.word_pieces(".")) == 1
    path = _write(tmp_path / "long.txt", "Peter " + " ".join(["."] * 150) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: \d+ tokens, more than the run's data.max_length=128"):
        predicting.predict(run, path, _options())
    (prediction,) = predicting.predict(run, path, _options(truncate=True))
    kept = 1 + 128 - 2 - len(run.tokenizer.word_pieces("Peter"))  # [CLS] and [SEP] take two positions
    assert len(prediction["tags"]) == 151 and prediction["tags"][kept:] == ["O"] * (151 - kept)
    assert set(prediction["tags"][:kept]) != {"O"}


# ---------------------------------------------------------------------- LoRA: merged on export

def test_lora_run_exports_merged_with_the_same_outputs(base, tmp_path):
    from transformers import pipeline

    from models.peft.lora import lora_layers

    run_dir = _train(base, "lora", "task=seq_cls", "data=sst2", "data.max_length=32", "data.bucket_lengths=[16,32]",
                     "data.length_grouping=0", "data.tokenizer.vocab_size=600", "peft=lora", "peft.rank=2",
                     "optimizer.lr=1e-2", "steps=2", "eval_every=2", "checkpoint_every=2")
    run = inference.load_run(run_dir)
    lora_b = [np.abs(np.asarray(layer.lora_b[...])).max() for _, layer in lora_layers(run.model)]
    assert lora_b and min(lora_b) > 0  # the update is not zero, so merging changes the weights
    out = str(tmp_path / "merged")
    summary = exporting.export(run_dir, out)
    assert summary["merged"] and summary["peft"] == "lora" and summary["adapter"] is None
    assert "merged into the weights" in open(os.path.join(out, "README.md")).read()
    lines = _write(tmp_path / "reviews.txt", "\n".join(SENTENCES) + "\n")
    predictions = predicting.predict(run, lines, _options())
    classify = pipeline("text-classification", model=out, tokenizer=out, top_k=None)
    for scores, prediction in zip(classify(SENTENCES), predictions):
        for item in scores:
            assert prediction["probabilities"][item["label"]] == pytest.approx(item["score"], abs=1e-4)


# ---------------------------------------------------------------------- export's directory handling

def test_export_refuses_a_non_empty_directory_and_leaves_nothing_on_failure(cls_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"out={out} exists and is not empty; pass overwrite=true"):
        exporting.export(cls_run, str(out))
    assert os.listdir(out) == ["keep.txt"]
    from flaxen.data import tokenizers

    def broken(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizers.Tokenizer, "save", broken)
    with pytest.raises(Exception, match="No space left on device|ENOSPC"):
        exporting.export(cls_run, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written directory, no temporary one
    monkeypatch.undo()
    exporting.export(cls_run, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(out))


# ---------------------------------------------------------------------- qa, mlm, clm

def test_qa_answers_are_spans_of_their_context(base, tmp_path):
    run_dir = _train(base, "qa", "task=qa", "data=squad", "model.max_position_embeddings=128", "data.max_length=96",
                     "data.doc_stride=32", "data.bucket_lengths=[64,96]", "data.holdout_groups=1",
                     "data.length_grouping=0", "data.tokenizer.kind=wordpiece", "data.tokenizer.vocab_size=800",
                     "steps=2", "eval_every=2", "checkpoint_every=2")
    document = json.loads(json.dumps(base["squad"]))
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [{"id": qa["id"], "question": qa["question"]} for qa in paragraph["qas"][:2]]
    squad = _write(tmp_path / "questions.json", json.dumps(document))
    questions = [(qa["id"], qa["question"], p["context"]) for a in document["data"] for p in a["paragraphs"]
                 for qa in p["qas"]]
    run = inference.load_run(run_dir)
    predictions = predicting.predict(run, squad, _options(batch_size=8))
    assert [p["id"] for p in predictions] == [q[0] for q in questions]
    assert any(len(context) > 400 for _, _, context in questions)  # some contexts need several windows
    for (_, _, context), prediction in zip(questions, predictions):
        assert prediction["answer"] and prediction["answer"] in context
        assert 0 < prediction["score"] <= 1
    jsonl = _write(tmp_path / "questions.jsonl", "".join(json.dumps({"question": q, "context": c}) + "\n"
                                                         for _, q, c in questions))
    from_jsonl = predicting.predict(run, jsonl, _options())
    assert [p["id"] for p in from_jsonl] == [str(i) for i in range(1, len(questions) + 1)]
    assert _same([[p["answer"], p["score"]] for p in from_jsonl], [[p["answer"], p["score"]] for p in predictions])


def test_mlm_predicts_each_mask_as_an_unbatched_forward_pass(base, tmp_path):
    run_dir = _train(base, "mlm", "task=mlm", "data=quickstart", "data.synthetic.num_train=400",
                     "data.synthetic.num_validation=40", "data.window_length=32", "steps=2", "eval_every=2",
                     "checkpoint_every=2")
    run = inference.load_run(run_dir)
    with open(os.path.join(run_dir, "tokenizer", "tokenizer.json")) as f:
        vocabulary = list(json.load(f)["model"]["vocab"])
    words = [w for w in vocabulary if w.isalpha()][:6]
    texts = [f"{words[0]} [MASK] {words[1]}", f"[MASK] {words[2]} [MASK] {words[3]} {words[4]}", "[MASK]"]
    path = _write(tmp_path / "masked.txt", "\n".join(texts) + "\n")
    predictions = predicting.predict(run, path, _options(top_k=3))
    assert [p["text"] for p in predictions] == texts
    assert [len(p["predictions"]) for p in predictions] == [1, 2, 1]
    # the reference: one forward pass of all texts padded to a common length, softmax in float64
    tokenizer = run.tokenizer
    rows = [[tokenizer.cls_token_id] + [tokenizer.mask_token_id if w == "[MASK]" else vocabulary.index(w)
                                        for w in text.split()] + [tokenizer.sep_token_id] for text in texts]
    width = max(map(len, rows))
    ids = np.asarray([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], np.int32)
    mask = np.asarray([[1] * len(row) + [0] * (width - len(row)) for row in rows], np.int32)
    graphdef, state = nnx.split(run.model)
    logits = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits)(state, ids, mask),
                        np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for row, prediction, p in zip(rows, predictions, probabilities):
        for position, top in zip([i for i, t in enumerate(row) if t == tokenizer.mask_token_id],
                                 prediction["predictions"]):
            order = np.argsort(-p[position])[:3]
            assert [token for token, _ in top] == [vocabulary[i] for i in order]
            assert [q for _, q in top] == pytest.approx(p[position][order].tolist(), abs=1e-5)
    plain = _write(tmp_path / "plain.txt", f"{words[0]} {words[1]}\n")
    with pytest.raises(DataError, match=rf"{plain}:1: no \[MASK\] in the text"):
        predicting.predict(run, plain, _options())


def test_clm_completions_equal_unbatched_greedy_generation(base, tmp_path):
    import models

    run_dir = _train(base, "clm", "task=clm", "data=quickstart", "model=gpt_nano", "data.synthetic.num_train=400",
                     "data.synthetic.num_validation=40", "data.window_length=32", "steps=2", "eval_every=2",
                     "checkpoint_every=2")
    run = inference.load_run(run_dir)
    with open(os.path.join(run_dir, "tokenizer", "tokenizer.json")) as f:
        vocabulary = list(json.load(f)["model"]["vocab"])
    words = [w for w in vocabulary if w.isalpha()]
    prompts = [" ".join(words[:3]), words[3], " ".join(words[4:9])]
    path = _write(tmp_path / "prompts.txt", "\n".join(prompts) + "\n")
    predictions = predicting.predict(run, path, _options(max_new_tokens=6, batch_size=2))
    assert [p["prompt"] for p in predictions] == prompts
    # the reference: one greedy generation of all prompts, left-padded to the longest (predict.py pads
    # them to its bucket of 8 tokens, in batches of 2)
    tokenizer = run.tokenizer
    sep = tokenizer.sep_token_id
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    width = max(map(len, encoded))
    ids = np.asarray([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded], np.int32)
    mask = np.asarray([[0] * (width - len(e)) + [1] * len(e) for e in encoded], np.int32)
    generated = np.asarray(models.generate(run.model, ids, mask, max_new_tokens=6, eos_token_id=sep))[:, width:]
    for new, prediction in zip(generated.tolist(), predictions):
        new = new[:new.index(sep)] if sep in new else new
        assert prediction["completion"] == tokenizer.decode(new)
        assert isinstance(prediction["completion"], str) and all(w in vocabulary for w in prediction["completion"].split())
    limit = run.model.config.max_position_embeddings
    long = _write(tmp_path / "long.txt", " ".join([words[0]] * limit) + "\n")
    with pytest.raises(DataError, match=rf"{long}:1: {limit} tokens and max_new_tokens=6 are more than the model's "
                                        rf"max_position_embeddings={limit}"):
        predicting.predict(run, long, _options(max_new_tokens=6))


# ---------------------------------------------------------------------- the command lines

def test_predict_and_export_command_lines(cls_run, exported_cls, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    lines = _write(tmp_path / "reviews.txt", "\n".join(SENTENCES) + "\n")
    output = str(tmp_path / "predictions.jsonl")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), f"run_dir={cls_run}", f"input={lines}",
                             f"output={output}", "batch_size=2"], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predict" in result.stderr  # the progress bar
    with open(output) as f:
        rows = [json.loads(line) for line in f]
    expected = predicting.predict(inference.load_run(cls_run), lines, _options())
    assert _same(rows, expected)
    out = str(tmp_path / "hf")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"run_dir={cls_run}", f"out={out}"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}: BertForSequenceClassification from {cls_run} step 4 + tokenizer" in result.stdout
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(exported_cls, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
