"""The seq2seq and span_corruption tasks: decoder inputs are the labels shifted right (as
models.t5.shift_right), the loss is a hand-computed cross-entropy over target tokens only (with
label smoothing: optax.smooth_labels' targets written out in numpy), a decoder-only row scores its
completion and nothing of its prompt, span-corruption batches have one static shape and their
targets give the hidden text back, and a tiny T5 run trained by the loop and evaluated by eval.py
writes predictions_<split>.txt (one hypothesis per record) whose BLEU and ROUGE equal sacreBLEU's
corpus_bleu and rouge_score's on the same strings."""
import json
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from flaxen import config, metrics, tasks
from flaxen.data import encoding
from flaxen.tasks.base import IGNORE_INDEX
import seq2seq_runs
from seq2seq_runs import entry, overrides

t5_run = seq2seq_runs.t5_run  # the shared tiny T5 run (a module-scoped fixture)

def _log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _reference_loss(logits, labels, eps):
    """Sum over labels != -100 of -sum_k q_k log p_k, q = (1 - eps) one_hot(label) + eps / K."""
    logp = _log_softmax(logits)
    classes = logits.shape[-1]
    total = 0.0
    for index in zip(*np.nonzero(labels != IGNORE_INDEX)):
        q = np.full(classes, eps / classes)
        q[labels[index]] += 1.0 - eps
        total += -(q * logp[index]).sum()
    return total, int((labels != IGNORE_INDEX).sum())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_decoder_inputs_are_shifted_labels_and_the_loss_scores_target_tokens_only(eps):
    import jax.numpy as jnp

    from models.t5 import shift_right

    rows = [{"input_ids": np.array([5, 6, 7, 1], np.int32), "labels": np.array([8, 9, 1], np.int32)},
            {"input_ids": np.array([5, 1], np.int32), "labels": np.array([4, 3, 2, 9, 1], np.int32)},
            encoding.PADDING]
    task = tasks.get("seq2seq")
    batch = task.collate(rows, 3, [4, 8], 0)
    assert batch["labels"].shape == (3, 8) and batch["input_ids"].shape == (3, 4)
    assert np.array_equal(batch["decoder_input_ids"], np.asarray(shift_right(batch["labels"], 0, 0)))
    assert batch["decoder_input_ids"][0, :4].tolist() == [0, 8, 9, 1]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 5 and batch["valid"].tolist() == [1, 1, 0]

    bound = task.bind(OmegaConf.create({"task": {"label_smoothing": eps}, "model": {"family": "t5"}}))
    logits = np.random.default_rng(0).normal(size=(3, 8, 11)).astype(np.float32)
    output = type("Output", (), {"logits": jnp.asarray(logits)})()
    loss_sum, weight = bound.loss_terms(output, {k: jnp.asarray(v) for k, v in batch.items()})
    expected, count = _reference_loss(logits, batch["labels"], eps)
    assert float(weight) == count == 8
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
    assert bound.model_inputs(batch)["decoder_input_ids"] is batch["decoder_input_ids"]


def _word_tokenizer():
    """A word-level flaxen Tokenizer: [PAD]=0, </s>=1 (eos), then w2 .. w19."""
    import tokenizers

    from flaxen.data.tokenizers import Tokenizer

    vocab = {"[PAD]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 20)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["[PAD]", "</s>"])
    return Tokenizer(backend, {"pad": "[PAD]", "eos": "</s>"}, kind="word")


def test_decoder_only_rows_score_the_completion_and_not_the_prompt():
    tokenizer = _word_tokenizer()
    cfg = OmegaConf.create({"task": {"label_smoothing": 0.0, "separator": "w3"}, "model": {"family": "gpt2"}})
    task = tasks.get("seq2seq").bind(cfg)
    assert task.head == "causal_lm" and task.decoder_only
    data_cfg = OmegaConf.create({"max_length": 16, "max_target_length": 8})
    row = task.row(tokenizer, data_cfg, {"source": "w5 w6 w7", "target": "w8 w9"})
    assert row["input_ids"].tolist() == [5, 6, 7, 3, 8, 9, 1]
    assert int(row["prompt_length"]) == 4
    # the last prompt token predicts the first completion token; no prompt token is a target
    assert row["labels"].tolist() == [IGNORE_INDEX] * 3 + [8, 9, 1, IGNORE_INDEX]
    encoder_decoder = tasks.get("seq2seq").bind(OmegaConf.create({"task": {}, "model": {"family": "t5"}}))
    assert encoder_decoder.head == "seq2seq_lm" and not encoder_decoder.decoder_only


def test_bleu_and_rouge_are_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    hypotheses = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee", "the cats are running"]
    references = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "a cat runs"]
    scores = metrics.bleu(hypotheses, references)
    assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert scores["bleu_signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = metrics.rouge(hypotheses, references)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * np.mean([scorer.score(r, h)[key].fmeasure for h, r in zip(hypotheses, references)])
        assert rouge[key] == pytest.approx(expected, abs=1e-12)


def test_span_corruption_batches_are_static_and_targets_give_the_text_back(t5_run):
    from flaxen.data import load_task_data

    cfg = config.compose(overrides(t5_run["base"], os.path.join(t5_run["base"], "span"), "task=span_corruption"))
    task = tasks.for_run(cfg)
    data = load_task_data(cfg.data, task, cfg.data_dir, presets=config.data_preset)
    tokens_length, target_length = task.lengths(cfg.data)
    sentinels = set(data.tokenizer.sentinel_ids)
    loader = data.loader("validation", 4, seed=0, train=False)
    chunks = task.chunks(data, "validation")
    index = 0
    for batch in loader:
        assert batch["input_ids"].shape == (4, 32) and batch["labels"].shape == (4, target_length)
        for row in range(4):
            if not batch["valid"][row]:
                continue
            inputs = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()[:-1]
            targets = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()[:-1]
            spans, current = {}, None
            for token in targets:
                if token in sentinels:
                    current = spans.setdefault(token, [])
                else:
                    current.append(token)
            text = [t for token in inputs for t in (spans[token] if token in sentinels else [token])]
            assert text == chunks[index].tolist() and len(chunks[index]) <= tokens_length
            index += 1
    assert index == len(chunks)


def test_tiny_run_eval_writes_predictions_and_scores_them_as_sacrebleu(t5_run):
    import sacrebleu
    from rouge_score import rouge_scorer

    run_dir = t5_run["run_dir"]
    cfg = config.compose([f"run_dir={run_dir}", "split=validation", "eval_batch_size=8", "progress_bar=false"],
                         config_name="eval")
    report = entry("eval").run(cfg, [f"run_dir={run_dir}", "split=validation", "eval_batch_size=8"])
    with open(os.path.join(run_dir, "predictions_validation.txt"), encoding="utf-8") as f:
        hypotheses = f.read().split("\n")[:-1]
    with open(os.path.join(t5_run["base"], "data", "m30k", "val.de"), encoding="utf-8") as f:
        references = f.read().splitlines()
    assert len(hypotheses) == len(references) == 20
    scores = report["metrics"]
    assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert scores["rougeL"] == pytest.approx(
        100 * np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]), abs=1e-9)
    with open(os.path.join(run_dir, "eval_validation.json")) as f:
        assert json.load(f)["metrics"]["bleu_signature"] == scores["bleu_signature"]
    assert {"loss", "perplexity", "accuracy", "num_examples"} <= set(scores) and scores["num_examples"] == 20
