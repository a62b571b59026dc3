"""SQuAD data: the JSON reader's errors name the file and the question, prepared qa records round-trip
through tfds, the held-out split by group is deterministic and keeps groups whole, the squad preset
gives 38 / 10 articles of the dev file, and tfds's own squad builder maps onto the same records."""
import dataclasses
import json
import os

import pytest

from flaxen import tasks
from flaxen.data import DataConfig, TokenizerConfig, builders, raw
from flaxen.data.config import check_config
from flaxen.errors import ConfigError, DataError

DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
DEV_FILE = os.path.join(DATA_DIR or "", "squad_v1.1", "dev-v1.1.json")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data")

CONTEXT_A = "The Normans gave their name to Normandy, a region in France."
CONTEXT_B = "Denver Broncos defeated the Carolina Panthers 24-10 to earn their third Super Bowl title."
CONTEXT_C = "Oxygen is a chemical element with symbol O and atomic number 8."


def squad_document():
    """Three articles, four questions; every answer_start points at its text."""
    def qa(qid, question, context, *answers):
        return {"id": qid, "question": question,
                "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}

    return {"version": "1.1", "data": [
        {"title": "Normans", "paragraphs": [{"context": CONTEXT_A, "qas": [
            qa("q1", "Who gave their name to Normandy?", CONTEXT_A, "The Normans", "Normans"),
            qa("q2", " In what country is Normandy?", CONTEXT_A, "France")]}]},
        {"title": "Super_Bowl_50", "paragraphs": [{"context": CONTEXT_B, "qas": [
            qa("q3", "Who won?", CONTEXT_B, "Denver Broncos")]}]},
        {"title": "Oxygen", "paragraphs": [{"context": CONTEXT_C, "qas": [
            qa("q4", "What is the atomic number of oxygen?", CONTEXT_C, "8")]}]},
    ]}


def write_json(directory, name, document):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(document if isinstance(document, str) else json.dumps(document))
    return path


def squad_config(tmp_path, **kw):
    kw.setdefault("splits", {"train": "train.json"})
    kw.setdefault("prepared_dir", str(tmp_path / "prepared"))
    kw.setdefault("doc_stride", 16)
    return DataConfig(name="tiny_squad", source="squad", tokenizer=TokenizerConfig(kind="word"), max_length=64,
                      bucket_lengths=[32, 64], **kw)


def prepare(cfg, tmp_path):
    check_config(cfg)
    return builders.prepare(cfg, str(tmp_path))


# ---------------------------------------------------------------- the JSON reader

def test_records_keep_questions_answers_and_order(tmp_path):
    records = raw.parse_squad(write_json(tmp_path, "train.json", squad_document()))
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
    assert records[0] == {"id": "q1", "title": "Normans", "context": CONTEXT_A,
                          "question": "Who gave their name to Normandy?",
                          "answer_texts": ["The Normans", "Normans"], "answer_starts": [0, 4]}
    assert records[1]["question"] == " In what country is Normandy?"  # stripped by the task, as run_qa


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = write_json(tmp_path, "train.json", '{"version": "1.1",\n "data": [{"title": "x",, }]}')
    with pytest.raises(DataError, match=rf"{path}:2:25: not valid JSON \(Expecting property name"):
        raw.parse_squad(path)


@pytest.mark.parametrize("where, key, message", [
    ("article", "title", r"article 1: no key 'title' \(the article title\)"),
    ("paragraph", "context", r"article 0 \('Normans'\) paragraph 0: no key 'context'"),
    ("question", "question", r"article 2 \('Oxygen'\) question id 'q4': no key 'question'"),
    ("answer", "answer_start", r"article 1 \('Super_Bowl_50'\) question id 'q3' answer 0: no key 'answer_start'"),
])
def test_missing_key_names_file_key_and_place(tmp_path, where, key, message):
    document = squad_document()
    node = {"article": document["data"][1], "paragraph": document["data"][0]["paragraphs"][0],
            "question": document["data"][2]["paragraphs"][0]["qas"][0],
            "answer": document["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]}[where]
    del node[key]
    path = write_json(tmp_path, "train.json", document)
    with pytest.raises(DataError, match=rf"{path}: {message}"):
        raw.parse_squad(path)


def test_v2_unanswerable_question_is_refused(tmp_path):
    document = squad_document()
    question = document["data"][1]["paragraphs"][0]["qas"][0]
    question.update(is_impossible=True, answers=[], plausible_answers=[{"text": "Denver", "answer_start": 0}])
    path = write_json(tmp_path, "train.json", document)
    with pytest.raises(DataError, match=rf"{path}: .*question id 'q3' is a SQuAD v2.0 unanswerable question "
                                        r"\(is_impossible: true\); only SQuAD v1.1 is supported"):
        raw.parse_squad(path)
    question["is_impossible"] = False  # a v2.0 file's answerable questions read as v1.1 ones
    question["answers"] = [{"text": "Denver", "answer_start": 0}]
    assert raw.parse_squad(write_json(tmp_path, "train.json", document))[2]["answer_texts"] == ["Denver"]


def test_answer_start_that_misses_its_text_names_question_expected_and_found(tmp_path):
    document = squad_document()
    document["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 2
    path = write_json(tmp_path, "train.json", document)
    with pytest.raises(DataError, match=rf"{path}: .*question id 'q3' answer 0: answer_start=2 does not point at "
                                        r"the answer: expected 'Denver Broncos' .* found 'nver Broncos d'"):
        raw.parse_squad(path)


def test_duplicate_ids_and_empty_answers_are_refused(tmp_path):
    document = squad_document()
    document["data"][2]["paragraphs"][0]["qas"][0]["id"] = "q1"
    path = write_json(tmp_path, "train.json", document)
    with pytest.raises(DataError, match=rf"{path}: question id 'q1' appears twice"):
        raw.parse_squad(path)
    document = squad_document()
    document["data"][2]["paragraphs"][0]["qas"][0]["answers"] = []
    with pytest.raises(DataError, match=r"question id 'q4' has no answers"):
        raw.parse_squad(write_json(tmp_path, "train.json", document))


# ---------------------------------------------------------------- prepared records and the held-out split

def test_prepared_qa_records_round_trip_and_a_changed_file_rebuilds(tmp_path):
    write_json(tmp_path, "train.json", squad_document())
    prepared = prepare(squad_config(tmp_path), tmp_path)
    assert prepared.schema == "qa" and prepared.splits == ["train"]
    assert prepared.records("train") == raw.parse_squad(str(tmp_path / "train.json"))
    document = squad_document()
    document["data"] = document["data"][:2]
    write_json(tmp_path, "train.json", document)
    changed = prepare(squad_config(tmp_path), tmp_path)
    assert changed.path != prepared.path and changed.num_records("train") == 3
    assert os.path.isdir(prepared.path)


def test_holdout_moves_whole_groups_deterministically(tmp_path):
    write_json(tmp_path, "train.json", squad_document())
    cfg = squad_config(tmp_path, holdout_key="title", holdout_groups=1, holdout_seed=3)
    first = prepare(cfg, tmp_path)
    train, validation = first.records("train"), first.records("validation")
    assert sorted(r["id"] for r in train + validation) == ["q1", "q2", "q3", "q4"]
    assert not {r["title"] for r in train} & {r["title"] for r in validation}
    assert len({r["title"] for r in validation}) == 1
    moved = [r["id"] for r in validation]
    assert moved in (["q1", "q2"], ["q3"], ["q4"])
    # the same file and settings choose the same group in a fresh directory; other seeds cover all groups
    again = prepare(squad_config(tmp_path, holdout_key="title", holdout_groups=1, holdout_seed=3,
                                 prepared_dir=str(tmp_path / "again")), tmp_path)
    assert [r["id"] for r in again.records("validation")] == moved
    records = {"train": raw.parse_squad(str(tmp_path / "train.json"))}
    chosen = set()
    for seed in range(12):
        split = builders.hold_out(records, key="title", groups=1, source_split="train", target_split="validation",
                                  seed=seed)
        chosen.add(split["validation"][0]["title"])
        if seed == 3:
            assert [r["id"] for r in split["validation"]] == moved
    assert chosen == {"Normans", "Super_Bowl_50", "Oxygen"}


def test_holdout_is_general_for_local_data(tmp_path):
    with open(tmp_path / "train.tsv", "w") as f:
        f.write("sentence\tlabel\tsource\na\t1\tx\nb\t0\ty\nc\t1\tx\nd\t0\tz\n")
    cfg = DataConfig(name="tiny", source="delimited", splits={"train": "train.tsv"}, text_columns=["sentence"],
                     tokenizer=TokenizerConfig(kind="word"), prepared_dir=str(tmp_path / "prepared"),
                     holdout_key="text", holdout_groups=2, holdout_to="test", holdout_seed=1)
    prepared = prepare(cfg, tmp_path)
    texts = {split: [r["text"] for r in prepared.records(split)] for split in ("train", "test")}
    assert sorted(texts["train"] + texts["test"]) == ["a", "b", "c", "d"] and len(texts["test"]) == 2
    assert texts["train"] == sorted(texts["train"])  # stored order kept


def test_holdout_mistakes_name_the_key(tmp_path):
    path = write_json(tmp_path, "train.json", squad_document())
    write_json(tmp_path, "dev.json", squad_document())
    with pytest.raises(ConfigError, match=r"data.holdout_key='article' is not a field of the records of "
                                          rf"{path} .*their fields are answer_starts, answer_texts, context, id, "
                                          r"question, title"):
        prepare(squad_config(tmp_path, holdout_key="article", holdout_groups=1), tmp_path)
    with pytest.raises(ConfigError, match=r"data.holdout_groups=3: split 'train' .* has only 3 distinct 'title' "
                                          r"values; at least one group must stay"):
        prepare(squad_config(tmp_path, holdout_key="title", holdout_groups=3), tmp_path)
    with pytest.raises(ConfigError, match=r"data.holdout_to='validation' is already a file split"):
        prepare(squad_config(tmp_path, splits={"train": "train.json", "validation": "dev.json"},
                             holdout_key="title", holdout_groups=1), tmp_path)
    with pytest.raises(ConfigError, match=r"data.holdout_groups=1 needs data.holdout_key"):
        check_config(squad_config(tmp_path, holdout_groups=1))
    with pytest.raises(ConfigError, match=r"data.holdout_from='dev' is not a split of data.splits"):
        check_config(squad_config(tmp_path, holdout_key="title", holdout_groups=1, holdout_from="dev"))
    with pytest.raises(ConfigError, match=r"data.holdout_groups=-1"):
        check_config(squad_config(tmp_path, holdout_groups=-1))
    with pytest.raises(ConfigError, match=r"data.doc_stride=64: .*fewer than data.max_length=64"):
        tasks.get("qa").check_data_config(squad_config(tmp_path, doc_stride=64))
    with pytest.raises(ConfigError, match=r"data.doc_stride=-1"):
        check_config(squad_config(tmp_path, doc_stride=-1))
    assert not os.path.exists(tmp_path / "prepared" / "flaxen_squad" / "tiny_squad")


# ---------------------------------------------------------------- the squad preset on the real dev file

@pytest.fixture(scope="module")
def squad_preset(tmp_path_factory):
    if not DATA_DIR or not os.path.isfile(DEV_FILE):
        pytest.skip("FLAXEN_DATA_DIR/squad_v1.1/dev-v1.1.json is not available (FLAXEN_DATA_DIR should point at "
                    "the shared data root)")
    from omegaconf import OmegaConf

    from flaxen.data.pipeline import as_data_config

    def load(prepared_dir):
        cfg = as_data_config(OmegaConf.load(os.path.join(CONFIGS, "squad.yaml")))
        cfg.prepared_dir = str(prepared_dir)
        check_config(cfg)
        return builders.prepare(cfg, DATA_DIR)

    return load(tmp_path_factory.mktemp("squad_a")), load(tmp_path_factory.mktemp("squad_b"))


def test_squad_preset_holds_out_ten_whole_articles(squad_preset):
    prepared, again = squad_preset
    titles = {split: {r["title"] for r in prepared.records(split)} for split in ("train", "validation")}
    assert len(titles["train"]) == 38 and len(titles["validation"]) == 10
    assert not titles["train"] & titles["validation"]
    assert prepared.num_records("train") + prepared.num_records("validation") == 10570
    ids = [r["id"] for split in ("train", "validation") for r in prepared.records(split)]
    assert len(set(ids)) == 10570
    with open(DEV_FILE) as f:
        official = {a["title"] for a in json.load(f)["data"]}
    assert titles["train"] | titles["validation"] == official
    assert {r["title"] for r in again.records("validation")} == titles["validation"]
    assert [r["id"] for r in again.records("validation")] == [r["id"] for r in prepared.records("validation")]


# ---------------------------------------------------------------- tfds's own squad builder

def test_catalog_squad_features_map_onto_qa_records(tmp_path, monkeypatch):
    """The real tfds `squad/v1.1` builder, its download replaced by local files, read through the
    squad preset's tfds_features: the same records as the local reader (in tfds's order)."""
    pytest.importorskip("importlib_resources", reason="tfds 4.9.10 needs importlib_resources to prepare catalog data")
    import tensorflow_datasets as tfds
    from etils import epath
    from omegaconf import OmegaConf

    from flaxen.data.pipeline import as_data_config

    document = squad_document()
    train = write_json(tmp_path, "train-v1.1.json", {**document, "data": document["data"][:2]})
    dev = write_json(tmp_path, "dev-v1.1.json", {**document, "data": document["data"][2:]})
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        lambda self, urls: {"train": epath.Path(train), "dev": epath.Path(dev)})
    monkeypatch.setattr(builders, "_unreachable", lambda builder: [])  # its URLs are never fetched
    cfg = as_data_config(OmegaConf.load(os.path.join(CONFIGS, "squad.yaml")))
    cfg.source, cfg.holdout_groups, cfg.prepared_dir = "tfds", 0, str(tmp_path / "prepared")
    prepared = prepare(cfg, tmp_path)
    assert prepared.schema == "qa"
    for split, path in (("train", train), ("validation", dev)):
        expected = sorted(raw.parse_squad(path), key=lambda r: r["id"])
        assert sorted(prepared.records(split), key=lambda r: r["id"]) == expected
    with pytest.raises(ConfigError, match=r"data.holdout_groups=10: .*data.source=tfds cannot take one"):
        check_config(dataclasses.replace(cfg, holdout_groups=10))
