"""Bad raw data stops with the file and line; prepared data is reused, rebuilt on change, and never
damaged by a rejected rebuild; catalog names fail offline with a way out."""
import os

import numpy as np
import pytest

from flaxen import config, tasks
from flaxen.tasks.token_cls import word_labels

from flaxen.data import DataConfig, TokenizerConfig, load_task_data
from flaxen.errors import ConfigError, DataError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def write(directory, name, content):
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return path


def conll_config(tmp_path, **kw):
    kw.setdefault("splits", {"train": "train.txt"})
    kw.setdefault("separator", " ")
    return DataConfig(name="tiny", source="conll", tag_scheme="IOB2",
                      tokenizer=TokenizerConfig(kind="word"), prepared_dir=str(tmp_path / "prepared"), **kw)


def tsv_config(tmp_path, **kw):
    for key, value in {"splits": {"train": "train.tsv"}, "format": "tsv", "text_columns": ["sentence"],
                       "label_column": "label"}.items():
        kw.setdefault(key, value)
    return DataConfig(name="tiny", source="delimited", tokenizer=TokenizerConfig(kind="word"),
                      prepared_dir=str(tmp_path / "prepared"), **kw)


def load(cfg, tmp_path, task):
    return load_task_data(cfg, tasks.get(task), str(tmp_path), presets=config.data_preset)


def test_conll_line_with_wrong_column_count_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.txt", CONLL.replace("call NN I-NP O", "call NN O"))
    with pytest.raises(DataError, match=rf"{path}:6: expected 4 space-separated columns .*found 3"):
        load(conll_config(tmp_path), tmp_path, "token_cls")
    assert not os.path.exists(tmp_path / "prepared" / "flaxen_conll")


def test_tab_separated_conll_with_configured_columns(tmp_path):
    write(tmp_path, "train.txt", "EU\tB-ORG\nrejects\tO\n \nPeter\tB-PER\n\t\nx\tO\n")
    data = load(conll_config(tmp_path, separator="\t", token_column=0, tag_column=1), tmp_path, "token_cls")
    assert [r["tokens"] for r in data.records("train")] == [["EU", "rejects"], ["Peter"], ["x"]]
    assert word_labels(data, "train") == [["B-ORG", "O"], ["B-PER"], ["O"]]
    assert data.label_names == ["B-ORG", "B-PER", "O"]


def test_tag_outside_declared_label_set_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.txt", CONLL)
    cfg = conll_config(tmp_path, label_names=["O", "B-PER", "I-PER", "B-ORG", "I-ORG"])
    with pytest.raises(DataError, match=rf"{path}:5: tag 'B-MISC' is not in data.label_names"):
        load(cfg, tmp_path, "token_cls")


def test_tag_unseen_in_train_names_the_validation_file_and_line(tmp_path):
    write(tmp_path, "train.txt", CONLL)
    path = write(tmp_path, "valid.txt", "Paris NNP B-NP B-LOC\n")
    cfg = conll_config(tmp_path, splits={"train": "train.txt", "validation": "valid.txt"})
    with pytest.raises(DataError, match=rf"{path}:1: tag 'B-LOC' is not in the tags of the train split"):
        load(cfg, tmp_path, "token_cls")


def test_label_outside_declared_set_in_tsv_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t2\n")
    with pytest.raises(DataError, match=rf"{path}:3: label '2' is not in data.label_names"):
        load(tsv_config(tmp_path, label_names=["0", "1"]), tmp_path, "seq_cls")


def test_tsv_row_with_wrong_field_count_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\ngood film \t1\nbad\tfilm\t0\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 2 TSV fields .*found 3"):
        load(tsv_config(tmp_path), tmp_path, "seq_cls")


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"s": "fine", "y": "a"}\n{"s": "broken", \n')
    cfg = tsv_config(tmp_path, splits={"train": "train.jsonl"}, format="jsonl", text_columns=["s"], label_column="y")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        load(cfg, tmp_path, "seq_cls")


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n"])
def test_empty_split_is_an_error(tmp_path, content):
    path = write(tmp_path, "train.tsv", content)
    with pytest.raises(DataError, match=rf"{path}: (no rows found \(an empty split\)|empty file)"):
        load(tsv_config(tmp_path), tmp_path, "seq_cls")


def test_empty_conll_split_is_an_error(tmp_path):
    path = write(tmp_path, "train.txt", "-DOCSTART- -X- -X- O\n\n  \n")
    with pytest.raises(DataError, match=rf"{path}: no sentences found \(an empty split\)"):
        load(conll_config(tmp_path), tmp_path, "token_cls")


def test_missing_file_names_the_split_key_and_path(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\na \t1\n")
    cfg = tsv_config(tmp_path, splits={"train": "train.tsv", "validation": "nope/dev.tsv"})
    with pytest.raises(DataError, match=r"data.splits.validation: file not found: .*nope/dev.tsv"):
        load(cfg, tmp_path, "seq_cls")


def test_bytes_that_do_not_decode_name_file_and_line(tmp_path):
    path = write(tmp_path, "train.tsv", b"sentence\tlabel\ngood \t1\nna\xefve \xff\t0\n")
    with pytest.raises(DataError, match=rf"{path}:3: bytes that are not UTF-8 at column 3"):
        load(tsv_config(tmp_path), tmp_path, "seq_cls")


def test_csv_quoting_pairs_and_regression(tmp_path):
    write(tmp_path, "train.csv", 'a,b,score\n"one, two",three,0.5\nfour,"five ""six""",1.25\n')
    cfg = tsv_config(tmp_path, splits={"train": "train.csv"}, format="csv", text_columns=["a", "b"],
                     label_column="score", regression=True)
    data = load(cfg, tmp_path, "seq_cls")
    assert data.records("train") == [{"text": "one, two", "text_pair": "three", "label": 0.5},
                                     {"text": "four", "text_pair": 'five "six"', "label": 1.25}]
    batch = next(data.loader("train", 2, seed=0, train=False))
    assert batch["labels"].dtype == np.float32 and sorted(batch["labels"]) == [0.5, 1.25]
    assert batch["token_type_ids"][0].max() == 1 and data.num_labels == 1


def test_regression_label_that_is_not_a_number(tmp_path):
    path = write(tmp_path, "train.tsv", "sentence\tlabel\na \t0.5\nb \thigh\n")
    with pytest.raises(DataError, match=rf"{path}:3: label 'high' is not a number"):
        load(tsv_config(tmp_path, regression=True), tmp_path, "seq_cls")


def _prepared_dirs(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, _ in os.walk(root) for n in dirs)


def test_prepared_data_is_reused_rebuilt_on_change_and_kept_on_rejection(tmp_path):
    write(tmp_path, "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\n")
    cfg = tsv_config(tmp_path)
    first = load(cfg, tmp_path, "seq_cls")
    info = os.path.join(first.prepared.path, "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    again = load(cfg, tmp_path, "seq_cls")
    assert again.prepared.path == first.prepared.path and os.stat(info).st_mtime_ns == stamp

    write(tmp_path, "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\nfine film \t1\n")
    changed = load(cfg, tmp_path, "seq_cls")
    assert changed.prepared.path != first.prepared.path and changed.num_examples("train") == 3

    before = _prepared_dirs(tmp_path / "prepared")
    write(tmp_path, "train.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\nbroken\n")
    with pytest.raises(DataError, match=r"train.tsv:4: expected 2 TSV fields"):
        load(cfg, tmp_path, "seq_cls")
    assert _prepared_dirs(tmp_path / "prepared") == before
    import tensorflow_datasets as tfds
    kept = tfds.builder_from_directory(changed.prepared.path)
    assert kept.info.splits["train"].num_examples == 3
    assert [r["text"] for r in changed.records("train")] == ["good film ", "bad film ", "fine film "]


def test_fast_record_reader_agrees_with_tfds_decoding(tmp_path):
    import tensorflow_datasets as tfds
    from flaxen.data import builders
    write(tmp_path, "train.txt", CONLL)
    write(tmp_path, "pairs.tsv", "a\tb\tlabel\nx y \tz \tyes\nw \tv u \tno\n")
    tagging = load(conll_config(tmp_path), tmp_path, "token_cls").prepared
    classification = load(tsv_config(tmp_path, splits={"train": "pairs.tsv"}, text_columns=["a", "b"]),
                          tmp_path, "seq_cls").prepared
    for prepared in (tagging, classification):
        builder = tfds.builder_from_directory(prepared.path)
        reference = list(builder.as_data_source("train"))
        ours = builders.read_split(builder, "train", prepared.fields)
        assert len(ours) == len(reference)
        for mine, theirs in zip(ours, reference):
            for key, value in mine.items():
                other = theirs[key]
                if isinstance(other, np.ndarray):
                    other = [v.decode() if isinstance(v, bytes) else int(v) for v in other]
                elif isinstance(other, bytes):
                    other = other.decode()
                assert value == other


def test_catalog_name_offline_says_how_to_use_local_files(tmp_path, monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    cfg = DataConfig(name="sst2", source="tfds", tfds_name="glue/sst2", tfds_features={"text": "sentence", "label": "label"},
                     prepared_dir=str(tmp_path / "prepared"))
    with pytest.raises(DataError, match=r"could not download and prepare tfds catalog dataset 'glue/sst2'.*Offline, "
                                        r"use the local files.*data_dir"):
        load(cfg, tmp_path, "seq_cls")


def test_catalog_conll2003_is_read_and_converted(tmp_path, monkeypatch):
    """The real tfds `conll2003` builder, with its download replaced by local IOB2 files."""
    pytest.importorskip("importlib_resources", reason="tfds 4.9.10 needs importlib_resources to prepare catalog data")
    import tensorflow_datasets as tfds
    from etils import epath
    os.makedirs(tmp_path / "raw")
    for name in ("train.txt", "valid.txt", "test.txt"):
        write(tmp_path / "raw", name, CONLL.replace("B-", "I-").replace("B-NP", "I-NP"))
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        lambda self, url: epath.Path(tmp_path / "raw"))
    cfg = DataConfig(name="conll2003", source="tfds", tfds_name="conll2003", tfds_features={"tokens": "tokens", "tags": "ner"},
                     tfds_splits={"train": "train", "validation": "dev"}, tag_scheme="IOB1", convert_tag_scheme="IOB2",
                     tokenizer=TokenizerConfig(kind="word"), prepared_dir=str(tmp_path / "prepared"))
    data = load(cfg, tmp_path, "token_cls")
    sentences = sorted(zip(map(tuple, (r["tokens"] for r in data.records("validation"))),
                           map(tuple, word_labels(data, "validation"))))
    assert sentences == [(("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O")),
                         (("Peter", "Blackburn"), ("B-PER", "I-PER"))]


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.source='csv'"):
        load(DataConfig(source="csv"), tmp_path, "seq_cls")
    with pytest.raises(ConfigError, match=r"data.max_length=256: .*largest bucket length 128"):
        load(tsv_config(tmp_path, max_length=256), tmp_path, "seq_cls")
    with pytest.raises(ConfigError, match=r"data.splits has no 'train' entry"):
        load(tsv_config(tmp_path, splits={"validation": "x.tsv"}), tmp_path, "seq_cls")
    write(tmp_path, "train.tsv", "sentence\tlabel\na \t1\n")
    with pytest.raises(ConfigError, match=r"task token_cls needs tagging data"):
        load(tsv_config(tmp_path), tmp_path, "token_cls")
    with pytest.raises(ConfigError, match=r"data.length_grouping=-1"):
        load(tsv_config(tmp_path, length_grouping=-1), tmp_path, "seq_cls")
    mixture = dict(name="mix", source="mixture", prepared_dir=str(tmp_path / "prepared"))
    with pytest.raises(ConfigError, match=r"data.source=mixture needs data.mixture"):
        load(DataConfig(**mixture), tmp_path, "mlm")
    with pytest.raises(ConfigError, match=r"task=seq_cls needs labelled data"):
        load(DataConfig(mixture=["sst2"], **mixture), tmp_path, "seq_cls")
    with pytest.raises(ConfigError, match=r"'sst3' is not a data preset \(configs/data/ has .*sst2"):
        load(DataConfig(mixture=["sst2", "sst3"], **mixture), tmp_path, "mlm")


def test_read_only_data_dir_prepares_into_the_user_cache(tmp_path, monkeypatch):
    from flaxen.data import builders
    monkeypatch.delenv("FLAXEN_PREPARED_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shared = tmp_path / "shared"
    shared.mkdir()
    write(shared, "train.tsv", "sentence\tlabel\ngood \t1\n")
    shared.chmod(0o555)
    try:
        cfg = DataConfig(name="tiny", source="delimited", splits={"train": "train.tsv"},
                         tokenizer=TokenizerConfig(kind="word"))
        data = load_task_data(cfg, tasks.get("seq_cls"), str(shared))
        assert data.prepared.path.startswith(str(tmp_path / "home" / ".cache" / "flaxen" / "tfds"))
        assert sorted(os.listdir(shared)) == ["train.tsv"]
        writable = tmp_path / "mine"
        assert builders.prepared_root(cfg, str(writable)) == str(writable / "tfds")
    finally:
        shared.chmod(0o755)
