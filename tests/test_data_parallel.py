"""Parallel (source, target) data and the T5-style vocabulary: aligned line files and delimited
columns load as records, every file mistake names the file (and line, column or counts), changed
raw files rebuild, the trained vocabulary is deterministic across processes with T5's special and
sentinel ids (checked through transformers too), and text round-trips exactly through it, on the
real Multi30k files as well."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from flaxen.data import DataConfig, TokenizerConfig, encoding, load_task_data
from flaxen.data import span_corruption as sc
from flaxen.data import tokenizers as tokenization
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import Task

DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "data")

EN = ["A man rides a bike .", "Two dogs play in the snow.", "A girl in a red coat", "People  walk  by ."]
DE = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee.", "Ein Mädchen in einem roten Mantel",
      "Leute gehen vorbei ."]


class Pairs(Task):
    """The smallest task that reads parallel records (the data layer's view of a seq2seq task)."""
    name = "pairs"
    data_kinds = ("parallel",)


def write(directory, name, content):
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def lines(items):
    return "".join(f"{item}\n" for item in items)


def parallel_config(tmp_path, **kw):
    kw.setdefault("splits", {"train": "train", "validation": "val"})
    kw.setdefault("tokenizer", TokenizerConfig(kind="word"))
    return DataConfig(name="pairs", source="parallel", prepared_dir=str(tmp_path / "prepared"), **kw)


def load(cfg, tmp_path, **kw):
    return load_task_data(cfg, Pairs(), str(tmp_path), **kw)


def write_pairs(tmp_path, split="train", en=EN, de=DE):
    return write(tmp_path, f"{split}.en", lines(en)), write(tmp_path, f"{split}.de", lines(de))


# ---------------------------------------------------------------- aligned line files

def test_aligned_files_load_as_records_in_order(tmp_path):
    write_pairs(tmp_path)
    write_pairs(tmp_path, "val", EN[:2], DE[:2])
    data = load(parallel_config(tmp_path, source_language="en", target_language="de"), tmp_path)
    assert data.prepared.schema == "parallel" and sorted(data.splits) == ["train", "validation"]
    assert data.records("train") == [{"source": e, "target": d} for e, d in zip(EN, DE)]
    assert data.num_records("validation") == 2
    assert data.texts("validation") == [EN[0], DE[0], EN[1], DE[1]]
    assert data.sentences("validation") == data.texts("validation")


def test_explicit_target_files_and_windows_line_ends(tmp_path):
    write(tmp_path, "src.txt", "".join(f"{e}\r\n" for e in EN))
    write(tmp_path, "tgt.txt", "\ufeff" + lines(DE)[:-1])  # BOM, no final newline
    cfg = parallel_config(tmp_path, splits={"train": "src.txt"}, target_splits={"train": "tgt.txt"})
    assert [r["target"] for r in load(cfg, tmp_path).records("train")] == DE


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    source, target = write_pairs(tmp_path, en=EN, de=DE[:3])
    cfg = parallel_config(tmp_path, splits={"train": "train"}, source_language="en", target_language="de")
    with pytest.raises(DataError) as error:
        load(cfg, tmp_path)
    message = str(error.value)
    assert f"{source} has 4 lines" in message and f"{target} has 3" in message
    assert not os.path.exists(tmp_path / "prepared" / "flaxen_parallel")


@pytest.mark.parametrize("side", ["en", "de"])
def test_empty_line_names_file_and_line(tmp_path, side):
    en, de = list(EN), list(DE)
    (en if side == "en" else de)[2] = "   "
    write_pairs(tmp_path, en=en, de=de)
    cfg = parallel_config(tmp_path, splits={"train": "train"}, source_language="en", target_language="de")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/train.{side}:3: empty line")):
        load(cfg, tmp_path)


def test_missing_language_file_names_the_split_and_path(tmp_path):
    write(tmp_path, "train.en", lines(EN))
    cfg = parallel_config(tmp_path, splits={"train": "train"}, source_language="en", target_language="fr")
    with pytest.raises(DataError, match=r"data.splits.train: file not found: .*train\.fr .*target_language=fr"):
        load(cfg, tmp_path)


def test_changed_raw_file_is_prepared_again(tmp_path):
    write_pairs(tmp_path)
    cfg = parallel_config(tmp_path, splits={"train": "train"}, source_language="en", target_language="de",
                          tokenizer=TokenizerConfig(kind="sentencepiece_bpe", vocab_size=164, sentinels=100,
                                                    min_frequency=1, lowercase=False))
    first = load(cfg, tmp_path)
    assert load(cfg, tmp_path).prepared.path == first.prepared.path
    write_pairs(tmp_path, en=EN, de=DE[:3] + ["Menschen gehen vorbei ."])
    changed = load(cfg, tmp_path)
    assert changed.prepared.path != first.prepared.path
    assert changed.records("train")[3]["target"] == "Menschen gehen vorbei ."
    trained = sorted(os.listdir(tmp_path / "prepared" / "tokenizers"))
    assert len(trained) == 2 and all(name.startswith("pairs_") for name in trained)  # one vocabulary per version


# ---------------------------------------------------------------- delimited columns

@pytest.mark.parametrize("format", ["tsv", "csv", "jsonl"])
def test_delimited_columns(tmp_path, format):
    if format == "jsonl":
        content = lines(json.dumps({"id": i, "en": e, "de": d}, ensure_ascii=False)
                        for i, (e, d) in enumerate(zip(EN, DE)))
    else:
        sep = "\t" if format == "tsv" else ","
        quote = (lambda t: t) if format == "tsv" else (lambda t: '"' + t.replace('"', '""') + '"')
        content = lines([sep.join(["id", "de", "en"])] + [sep.join([str(i), quote(d), quote(e)])
                                                        for i, (e, d) in enumerate(zip(EN, DE))])
    write(tmp_path, f"train.{format}", content)
    cfg = parallel_config(tmp_path, splits={"train": f"train.{format}"}, format=format, source_column="en",
                          target_column="de")
    assert load(cfg, tmp_path).records("train") == [{"source": e, "target": d} for e, d in zip(EN, DE)]


def test_columns_by_index_without_header(tmp_path):
    write(tmp_path, "train.tsv", lines(f"{d}\t{e}" for e, d in zip(EN, DE)))
    cfg = parallel_config(tmp_path, splits={"train": "train.tsv"}, format="tsv", header=False, source_column="1",
                          target_column="0")
    assert load(cfg, tmp_path).records("train")[1] == {"source": EN[1], "target": DE[1]}


def test_missing_column_names_the_column_and_file(tmp_path):
    path = write(tmp_path, "train.tsv", lines(["en\tdeutsch"] + [f"{e}\t{d}" for e, d in zip(EN, DE)]))
    cfg = parallel_config(tmp_path, splits={"train": "train.tsv"}, format="tsv", source_column="en", target_column="de")
    expected = f"{path}:1: data.target_column names column 'de', not in the header"
    with pytest.raises(DataError, match=re.escape(expected)):
        load(cfg, tmp_path)
    path = write(tmp_path, "train.jsonl", lines([json.dumps({"en": EN[0], "de": DE[0]}), json.dumps({"en": EN[1]})]))
    cfg = parallel_config(tmp_path, splits={"train": "train.jsonl"}, format="jsonl", source_column="en",
                          target_column="de")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: no key 'de' (data.target_column)")):
        load(cfg, tmp_path)


def test_empty_field_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "train.csv", lines(["en,de", f"{EN[0]},{DE[0]}", f'"{EN[1]}",""']))
    cfg = parallel_config(tmp_path, splits={"train": "train.csv"}, format="csv", source_column="en", target_column="de")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: empty target text in column 'de'")):
        load(cfg, tmp_path)


@pytest.mark.parametrize("settings, key", [
    ({}, "data.source_language is not set"),
    ({"source_language": "en", "target_language": "en"}, "both 'en'"),
    ({"source_column": "en"}, "data.target_column is not set"),
    ({"target_splits": {"validation": "x"}}, "data.target_splits names splits"),
    ({"source_language": "en", "target_language": "de", "tokenizer": TokenizerConfig(kind="sentencepiece_bpe",
                                                                                      vocab_size=120)},
     "data.tokenizer.vocab_size=120"),
])
def test_config_mistakes_name_the_key(tmp_path, settings, key):
    with pytest.raises(ConfigError, match=key):
        load(parallel_config(tmp_path, splits={"train": "train"}, **settings), tmp_path)


# ---------------------------------------------------------------- the T5-style vocabulary

TRAIN_SCRIPT = """
import sys
from flaxen.data import tokenizers
texts = open(sys.argv[1], encoding="utf-8").read().split("\\n")
tokenizers.train_tokenizer("sentencepiece_bpe", texts, 600, 2, False, 100).backend.save(sys.argv[2])
"""


@pytest.fixture(scope="module")
def corpus():
    """Multi30k's validation sentences when the data root is there (German umlauts, ß, quotes), else
    the small sentences above."""
    if DATA_DIR and os.path.isfile(os.path.join(DATA_DIR, "multi30k", "val.de")):
        texts = []
        for language in ("en", "de"):
            with open(os.path.join(DATA_DIR, "multi30k", f"val.{language}"), encoding="utf-8") as f:
                texts += f.read().splitlines()
        return texts
    return (EN + DE + ["Männer über Brücken an der Straße, zzz qqq xy ."]) * 20


def test_vocabulary_is_the_same_in_another_process(tmp_path, corpus):
    corpus_file = write(tmp_path, "corpus.txt", "\n".join(corpus))
    here = tokenization.train_tokenizer("sentencepiece_bpe", corpus, 600, 2, False, 100)
    here.backend.save(str(tmp_path / "here.json"))
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, corpus_file, str(tmp_path / "there.json")], check=True,
                   cwd=REPO)
    assert (tmp_path / "here.json").read_bytes() == (tmp_path / "there.json").read_bytes()


def test_special_and_sentinel_ids_follow_t5_also_through_transformers(tmp_path, corpus):
    from transformers import AutoTokenizer

    tokenizer = tokenization.train_tokenizer("sentencepiece_bpe", corpus, 600, 2, False, 100)
    size = tokenizer.vocab_size
    assert size <= 600
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert [tokenizer.id_to_token(i) for i in (0, 1, 2)] == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.sentinel_ids == list(range(size - 1, size - 101, -1))
    assert tokenizer.id_to_token(size - 1) == "<extra_id_0>" and tokenizer.id_to_token(size - 100) == "<extra_id_99>"
    assert tokenizer.single_template.prefix == [] and tokenizer.single_template.suffix == [(1, 0)]
    ids = tokenizer.encode("Ein Mann <extra_id_0> Straße")
    assert size - 1 in ids and 1 not in ids  # a sentinel written in text is the sentinel; no EOS added
    tokenizer.save(str(tmp_path / "tok"))
    reloaded = tokenization.load_tokenizer(str(tmp_path / "tok"))
    assert reloaded.sentinel_ids == tokenizer.sentinel_ids and reloaded.eos_token_id == 1

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "Zwei Männer über der Straße."
    assert hf(text)["input_ids"] == tokenizer.encode(text) + [1]
    assert hf.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(3)]) == [size - 1, size - 2, size - 3]
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert {f"<extra_id_{i}>" for i in range(100)} <= set(hf.all_special_tokens)
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


def test_text_round_trips_exactly(corpus):
    tokenizer = tokenization.train_tokenizer("sentencepiece_bpe", corpus, 600, 2, False, 100)
    seen = set("".join(corpus))
    # runs of spaces, a trailing space, words never seen whole: all come back as written
    extra = ["Straße  mit   Leerzeichen am Ende ", "Männer über Brücken", "zzz  qqq xy"]
    assert all(set(text) <= seen for text in extra)
    for text in list(corpus) + extra:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # a character the train text never had is <unk> (as in T5's vocabularies; nothing else is lost)
    unseen = next(c for c in "\u2013\u00c4\u00d6\u0394\u4e2d" if c not in seen)
    ids = tokenizer.encode(f"a {unseen} b")
    assert tokenizer.unk_token_id in ids and tokenizer.decode(ids) == "a  b"


def test_tokenizer_from_a_pretrained_directory(tmp_path):
    write_pairs(tmp_path)
    trained = tokenization.train_tokenizer("sentencepiece_bpe", EN + DE, 164, 1, False, 100)
    trained.save(str(tmp_path / "pretrained"))
    cfg = parallel_config(tmp_path, splits={"train": "train"}, source_language="en", target_language="de",
                          tokenizer=TokenizerConfig(kind="pretrained", path=str(tmp_path / "pretrained")))
    data = load(cfg, tmp_path)
    assert data.tokenizer.sentinel_ids == trained.sentinel_ids
    assert data.tokenizer.encode(DE[2]) == trained.encode(DE[2])
    cfg.tokenizer = TokenizerConfig(kind="word")
    assert load(cfg, tmp_path, tokenizer_path=str(tmp_path / "pretrained")).tokenizer.vocab_size == 164


def test_seq2seq_rows_and_batches(corpus):
    tokenizer = tokenization.train_tokenizer("sentencepiece_bpe", corpus, 600, 2, False, 100)
    record = {"source": EN[1], "target": DE[1]}
    row = encoding.seq2seq_row(tokenizer, record, 64, 5)
    assert row["input_ids"].tolist() == tokenizer.encode(EN[1]) + [1]
    assert row["labels"].tolist() == tokenizer.encode(DE[1])[:4] + [1]
    short = encoding.seq2seq_row(tokenizer, {"source": "Ein", "target": "A"}, 64, 64)
    batch = encoding.collate_seq2seq([row, short, encoding.PADDING], 3, [8, 16], [4, 8], tokenizer.pad_token_id)
    n = len(row["input_ids"])
    assert batch["input_ids"].shape == (3, 8 if n <= 8 else 16) and batch["labels"].shape == (3, 8)
    assert batch["labels"][0, :5].tolist() == row["labels"].tolist() and set(batch["labels"][0, 5:]) == {-100}
    assert batch["decoder_input_ids"][0, :6].tolist() == [0] + row["labels"].tolist()
    assert batch["attention_mask"][0].sum() == n and batch["decoder_attention_mask"][1].sum() == len(short["labels"])
    assert batch["valid"].tolist() == [1, 1, 0] and set(batch["input_ids"][2]) == {0}


# ---------------------------------------------------------------- the real Multi30k files

@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    if not DATA_DIR or not os.path.isdir(os.path.join(DATA_DIR, "multi30k")):
        pytest.skip("FLAXEN_DATA_DIR has no multi30k/ folder")
    cfg = OmegaConf.load(os.path.join(CONFIGS, "multi30k.yaml"))
    cfg.prepared_dir = str(tmp_path_factory.mktemp("prepared"))
    return load_task_data(cfg, Pairs(), DATA_DIR)


def test_multi30k_published_counts_and_lines(multi30k):
    assert {split: multi30k.num_records(split) for split in multi30k.splits} == {
        "train": 29000, "validation": 1014, "test": 1000}
    for split, name in (("validation", "val"), ("test", "test_2016_flickr")):
        with open(os.path.join(DATA_DIR, "multi30k", f"{name}.de"), encoding="utf-8") as f:
            assert [r["target"] for r in multi30k.records(split)] == f.read().split("\n")[:-1]


def test_multi30k_vocabulary_round_trips_validation_and_spans(multi30k):
    tokenizer = multi30k.tokenizer
    assert tokenizer.vocab_size == 8000 and tokenizer.sentinel_ids[0] == 7999 and tokenizer.sentinel_ids[-1] == 7900
    texts = multi30k.texts("validation")
    encoded = tokenizer.encode_batch(texts)
    assert all(tokenizer.decode(ids) == text for ids, text in zip(encoded, texts))
    assert not any(tokenizer.unk_token_id in ids for ids in encoded)
    assert max(len(ids) for ids in tokenizer.encode_batch(multi30k.texts("train"))) < multi30k.cfg.max_length
    # span-corrupted chunks of the validation text decode back to it
    tokens_length, targets_length = sc.random_spans_helper(64)
    rng = np.random.default_rng(0)
    for chunk in sc.chunks(encoded[:200], tokens_length):
        inputs, targets = sc.span_corruption(chunk, rng, sentinel_ids=tokenizer.sentinel_ids,
                                             eos_id=tokenizer.eos_token_id)
        assert len(inputs) <= 64 and len(targets) <= targets_length
        spans, current = {}, None
        for token in targets[:-1].tolist():
            if token in tokenizer.sentinel_ids:
                current = spans[token] = []
            else:
                current.append(token)
        rebuilt = [t for token in inputs[:-1].tolist() for t in (spans[token] if token in spans else [token])]
        assert rebuilt == chunk.tolist()
