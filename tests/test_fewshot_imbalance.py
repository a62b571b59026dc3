"""Few-shot subsets, class weights and balanced resampling (flaxen.data.sampling, flaxen.tasks.base.ClassTask).

References: the K-per-label counts and seqeval's entity chunking for the greedy NER guarantee,
PyTorch's cross_entropy(weight=...) for the weighted loss, scikit-learn's closed form
n / (C * n_c) for balanced weights, and exact class frequencies per resampled epoch; resume and
cross-process determinism against a second loader / a second Python process.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from flaxen import config, tasks
from flaxen.data import DataConfig, TokenizerConfig, load_task_data, sampling
from flaxen.data.config import check_config as check_data_config
from flaxen.data.encoding import IGNORE_INDEX
from flaxen.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_COUNTS = {"a": 30, "b": 10, "c": 5}  # the imbalanced classification data's train labels
# the tagging data: sentence kinds and how often each occurs (PER common, LOC rarer, MISC rare, some O-only)
TYPE_WEIGHTS = {"PER": 0.6, "LOC": 0.3, "MISC": 0.1}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _task(name, class_weights=None):
    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.task.name = name
    cfg.task.class_weights = class_weights
    return tasks.for_run(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An imbalanced TSV (45 train rows: a 30, b 10, c 5) and a CoNLL file of 120 IOB2 sentences."""
    root = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    labels = [name for name, count in CLASS_COUNTS.items() for _ in range(count)]
    rng.shuffle(labels)
    with open(root / "train.tsv", "w") as f:
        f.write("sentence\tlabel\n")
        for label in labels:
            f.write(" ".join(rng.choice(words, rng.integers(2, 9))) + f" {label}word\t{label}\n")
    with open(root / "dev.tsv", "w") as f:
        f.write("sentence\tlabel\n" + "".join(f"w1 w2 {label}word\t{label}\n" for label in "abcabcab"))
    sentences = []
    for _ in range(120):
        tags = ["O"] * int(rng.integers(3, 9))
        if rng.random() > 0.15:  # 15 % without entities
            for _ in range(int(rng.integers(1, 3))):
                kind = rng.choice(list(TYPE_WEIGHTS), p=list(TYPE_WEIGHTS.values()))
                start = int(rng.integers(0, len(tags)))
                span = min(int(rng.integers(1, 3)), len(tags) - start)
                if all(t == "O" for t in tags[start:start + span]) and (start == 0 or tags[start - 1] == "O"):
                    tags[start:start + span] = [f"B-{kind}"] + [f"I-{kind}"] * (span - 1)
        sentences.append("\n".join(f"{rng.choice(words)} {tag}" for tag in tags))
    with open(root / "train.txt", "w") as f:
        f.write("\n\n".join(sentences) + "\n")
    with open(root / "valid.txt", "w") as f:
        f.write("w1 B-PER\nw2 O\nw3 B-LOC\nw4 B-MISC\n")
    return root


def cls_config(files, **kw):
    return DataConfig(name="imbalanced", source="delimited", splits={"train": "train.tsv", "validation": "dev.tsv"},
                      format="tsv", text_columns=["sentence"], label_column="label",
                      tokenizer=TokenizerConfig(kind="word"), prepared_dir=str(files / "prepared"), max_length=16,
                      bucket_lengths=[16], **kw)


def ner_config(files, **kw):
    return DataConfig(name="tagged", source="conll", splits={"train": "train.txt", "validation": "valid.txt"},
                      separator=" ", tag_scheme="IOB2", label_names=NER_LABELS, token_column=0, tag_column=-1,
                      tokenizer=TokenizerConfig(kind="word"), prepared_dir=str(files / "prepared"), max_length=16,
                      bucket_lengths=[16], **kw)


def load(cfg, files, task="seq_cls", class_weights=None):
    return load_task_data(cfg, _task(task, class_weights), str(files))


def mentions(tags):
    """Mentions per entity type of one sentence's tag names, by seqeval's own chunking (the reference)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return Counter(kind for kind, _, _ in get_entities(list(tags)))


def entity_counts(data, records):
    return sum((mentions(data.label_names[t] for t in record["tags"]) for record in records), Counter())


def labels_drawn(loader, batches):
    """The labels of the real rows of the next `batches` batches."""
    drawn = []
    for _ in range(batches):
        batch = next(loader)
        drawn += [int(label) for label, valid in zip(batch["labels"], batch["valid"]) if valid]
    return drawn


# ---------------------------------------------------------------------- few-shot: seq_cls


def test_k_rows_per_label_deterministic_nested_and_seed_dependent(files):
    full = load(cls_config(files), files)
    few = load(cls_config(files, train_examples_per_class=4), files)
    records = few.records("train")
    assert Counter(full.label_names[r["label"]] for r in records) == {"a": 4, "b": 4, "c": 4}
    assert few.num_examples("train") == few.epoch_examples("train") == 12
    stored = full.records("train")
    assert all(stored[i] == r for i, r in zip(few.train_subset(), records))  # a subset, in stored order
    again = load(cls_config(files, train_examples_per_class=4), files)
    assert np.array_equal(again.train_subset(), few.train_subset())
    other_seed = load(cls_config(files, train_examples_per_class=4, train_subset_seed=1), files)
    assert not np.array_equal(other_seed.train_subset(), few.train_subset())
    larger = load(cls_config(files, train_examples_per_class=5), files)
    assert set(few.train_subset()) < set(larger.train_subset())  # the K-shot subset is inside the (K+1)-shot one
    assert few.train_summary()["class_counts"] == {"a": 4, "b": 4, "c": 4}
    loader = few.loader("train", 4, seed=0, train=True)
    assert Counter(labels_drawn(loader, 3)) == {0: 4, 1: 4, 2: 4}  # one epoch of the subset
    assert loader.get_state()["train_subset"] == [4, 0]


def test_subset_is_the_same_in_another_process(files):
    labels = [r["label"] for r in load(cls_config(files), files).records("train")]
    code = ("import json, sys; from flaxen.data import sampling; labels = json.loads(sys.argv[1]); "
            "print(json.dumps(sampling.examples_per_class(labels, 3, 7, ['a', 'b', 'c']).tolist()))")
    runs = [subprocess.run([sys.executable, "-c", code, json.dumps(labels)], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    here = sampling.examples_per_class(labels, 3, 7, ["a", "b", "c"]).tolist()
    assert json.loads(runs[0]) == json.loads(runs[1]) == here


def test_k_above_a_label_count_names_key_label_and_count(files):
    with pytest.raises(ConfigError, match=r"data.train_examples_per_class=6: label 'c' has only 5 examples"):
        load(cls_config(files, train_examples_per_class=6), files)


def test_class_options_on_other_tasks_are_refused_by_name():
    for key, value in (("train_examples_per_class", 4), ("resample", "balanced")):
        with pytest.raises(ConfigError, match=rf"data.{key}={value}: applies to .*seq_cls, token_cls.*task mlm"):
            check_data_config(DataConfig(**{key: value}), tasks.get("mlm"))
    with pytest.raises(ConfigError, match=r"task.class_weights applies to .*seq_cls, token_cls.*task clm"):
        tasks.get("clm").check_class_weights("balanced")
    for bad in ("inverse", [1.0, -2.0], [], [True, 1.0]):
        with pytest.raises(ConfigError, match=r"task.class_weights=.*expected balanced, a list"):
            tasks.get("seq_cls").check_class_weights(bad)
    with pytest.raises(ConfigError, match=r"data.train_examples_per_class=0: expected a positive"):
        check_data_config(DataConfig(train_examples_per_class=0), tasks.get("seq_cls"))
    with pytest.raises(ConfigError, match=r"data.resample='oversample': expected one of balanced"):
        check_data_config(DataConfig(resample="oversample"), tasks.get("seq_cls"))
    with pytest.raises(ConfigError, match=r"data.resample=balanced with privacy=dp_sgd"):
        config.compose(["experiment=quickstart_finetune", "privacy=dp_sgd", "data.resample=balanced"])


def test_label_count_mapping_subsamples_named_labels_only(files):
    full = load(cls_config(files), files)
    stored, names = full.records("train"), full.label_names
    members = {name: {i for i, r in enumerate(stored) if names[r["label"]] == name} for name in names}
    cut = load(cls_config(files, train_examples_per_class={"a": 6}), files)
    subset = set(cut.train_subset().tolist())
    assert Counter(names[r["label"]] for r in cut.records("train")) == {"a": 6, "b": 10, "c": 5}
    assert members["b"] | members["c"] <= subset  # labels not named keep every row
    assert all(stored[i] == r for i, r in zip(cut.train_subset(), cut.records("train")))
    # second code path: {every label: K} is the K-shot subset, and a label's draw is the K-shot draw of that label
    labels = [r["label"] for r in stored]
    assert np.array_equal(sampling.examples_per_class(labels, {"a": 4, "b": 4, "c": 4}, 0, names),
                          sampling.examples_per_class(labels, 4, 0, names))
    four = set(sampling.examples_per_class(labels, 4, 0, names).tolist())
    assert four & members["a"] == set(sampling.examples_per_class(labels, {"a": 4}, 0, names).tolist()) & members["a"]
    assert set(load(cls_config(files, train_examples_per_class={"a": 3}), files).train_subset()) < subset  # nested
    assert np.array_equal(load(cls_config(files, train_examples_per_class={"a": 6}), files).train_subset(),
                          cut.train_subset())
    other_seed = load(cls_config(files, train_examples_per_class={"a": 6}, train_subset_seed=1), files)
    assert not np.array_equal(other_seed.train_subset(), cut.train_subset())
    summary = cut.train_summary()
    assert summary["examples_per_class"] == {"a": 6} and summary["class_counts"] == {"a": 6, "b": 10, "c": 5}
    weighted = load(cls_config(files, train_examples_per_class={"a": 6}), files, class_weights="balanced")
    assert weighted.train_summary()["class_weights"] == pytest.approx(
        {name: 21 / (3 * count) for name, count in {"a": 6, "b": 10, "c": 5}.items()}, rel=1e-12)
    loader = cut.loader("train", 7, seed=0, train=True)
    assert Counter(labels_drawn(loader, 3)) == {0: 6, 1: 10, 2: 5}  # one epoch of the 21 rows
    state = json.loads(json.dumps(loader.get_state()))
    assert state["train_subset"] == [{"a": 6}, 0]
    want = next(loader)
    resumed = load(cls_config(files, train_examples_per_class={"a": 6}), files).loader("train", 7, seed=0, train=True)
    resumed.set_state(state)
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match=r"train_subset: saved \[\{'a': 6\}, 0\], now \[\{'a': 5\}, 0\]"):
        load(cls_config(files, train_examples_per_class={"a": 5}), files).loader("train", 7, seed=0,
                                                                                 train=True).set_state(state)


def test_label_count_mapping_errors_name_key_label_and_count(files):
    with pytest.raises(ConfigError, match=r"data.train_examples_per_class=\{'c': 6\}: label 'c' has only 5 examples"):
        load(cls_config(files, train_examples_per_class={"c": 6}), files)
    with pytest.raises(ConfigError, match=r"=\{'positive': 3\}: label 'positive' is not a label .*labels: a, b, c"):
        load(cls_config(files, train_examples_per_class={"positive": 3}), files)
    for bad, shown in (({"a": 0}, r"label 'a' has count 0"), ({"a": 1.5}, r"label 'a' has count 1.5"),
                       ({"a": True}, r"label 'a' has count True"), ({}, r"\{\}"), ({1: 2, "1": 3}, "given twice"),
                       ("3", r"3: expected a positive number")):
        with pytest.raises(ConfigError, match=rf"data.train_examples_per_class=.*{shown}"):
            check_data_config(DataConfig(train_examples_per_class=bad), tasks.get("seq_cls"))
    with pytest.raises(ConfigError, match=r"data.train_examples_per_class=\{'PER': 3\}: a mapping from label to "
                                          r"count applies to .*\(seq_cls\); task token_cls's few-shot subset takes one"):
        load(ner_config(files, train_examples_per_class={"PER": 3}), files, "token_cls")


def test_label_count_mapping_on_sst2_when_present():
    """The imbalanced SST-2 of the minilm_sst2_imbalanced* presets, against counts read from the raw TSV."""
    import csv

    path = os.path.join(os.environ.get("FLAXEN_DATA_DIR", ""), "sst2", "train.tsv")
    if not os.path.isfile(path):
        pytest.skip("SST-2 is not under FLAXEN_DATA_DIR")
    with open(path, newline="") as f:
        labels = [int(row["label"]) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert Counter(labels) == {0: 29780, 1: 37569}
    chosen = sampling.examples_per_class(labels, {"1": 3757}, 0, ["0", "1"])
    assert Counter(labels[i] for i in chosen) == {0: 29780, 1: 3757}
    with pytest.raises(ConfigError, match=r"=\{'1': 37570\}: label '1' has only 37569 examples"):
        sampling.examples_per_class(labels, {1: 37570}, 0, ["0", "1"])


def test_imbalance_presets_compose_and_rows_record_per_label_recall(tmp_path, monkeypatch):
    import importlib.util

    for name, extra in (("minilm_sst2_imbalanced", {}), ("minilm_sst2_imbalanced_weighted", {"class_weights": "balanced"}),
                        ("minilm_sst2_imbalanced_resampled", {"resample": "balanced"})):
        cfg = config.compose([f"experiment={name}"])
        assert sampling.examples_per_class_setting(cfg.data.train_examples_per_class) == {"1": 3757}
        assert (cfg.experiment_name, cfg.steps, cfg.best_metric, cfg.eval_split, cfg.model.name) == (
            name, 400, "macro_f1", "validation", "minilm_l6_h384")
        assert cfg.task.class_weights == extra.get("class_weights") and cfg.data.resample == extra.get("resample")
    cfg = config.compose(["experiment=minilm_sst2", "data.train_examples_per_class={1:3757}"])  # the command line
    assert sampling.examples_per_class_setting(cfg.data.train_examples_per_class) == {"1": 3757}

    spec = importlib.util.spec_from_file_location("flaxen_reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    monkeypatch.setattr(reproduce, "ROOT", str(tmp_path))
    run_dir = reproduce.run_dir_of("minilm_sst2_imbalanced", 0)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"status": "completed", "steps": 400, "wall_seconds": 270.0, "tokens_per_s": 1.0,
                   "parameters": {"total": 1}}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 400, "loss": 0.3}) + "\n" + json.dumps({"step": 400, "validation/macro_f1": 0.78}) + "\n")
    report = {"0": {"precision": 0.7, "recall": 0.98, "f1": 0.82, "support": 428},
              "1": {"precision": 0.97, "recall": 0.6, "f1": 0.74, "support": 444}}
    with open(os.path.join(run_dir, "eval_validation.json"), "w") as f:
        json.dump({"split": "validation", "step": 400,
                   "metrics": {"macro_f1": 0.78, "accuracy": 0.79, "report": report}}, f)
    record = reproduce.seed_record("minilm_sst2_imbalanced", 0)
    assert record["values"] == {"validation": 0.78}
    assert record["curve"] == {"loss": [[400, 0.3]], "validation/macro_f1": [[400, 0.78]]}
    assert record["also"] == {"accuracy": {"validation": 0.79}, "recall_negative": {"validation": 0.98},
                              "recall_positive": {"validation": 0.6}}
    monkeypatch.setattr(reproduce, "machine", lambda: "test machine")
    row = reproduce.row_record("minilm_sst2_imbalanced", [record], ["python train.py experiment=minilm_sst2_imbalanced"])
    line = next(x for x in reproduce.table({"minilm_sst2_imbalanced": row}).splitlines() if "imbalanced`" in x)
    assert "| macro-F1 (%) | 78.00 (accuracy 79.00) (recall negative 98.00) (recall positive 60.00) |" in line
    del report["1"]["recall"]
    with open(os.path.join(run_dir, "eval_validation.json"), "w") as f:
        json.dump({"split": "validation", "step": 400,
                   "metrics": {"macro_f1": 0.78, "accuracy": 0.79, "report": report}}, f)
    with pytest.raises(SystemExit, match=r"metrics has no report/1/recall \(row minilm_sst2_imbalanced's `also` "
                                         r"recall_positive\)"):
        reproduce.seed_record("minilm_sst2_imbalanced", 0)


# ---------------------------------------------------------------------- few-shot: token_cls (greedy)


def check_greedy_guarantee(data, k):
    """Every type >= K mentions (seqeval's count); removing any chosen sentence leaves a type below K;
    no sentence without a mention."""
    records = data.records("train")
    counts = entity_counts(data, records)
    types = sorted({name[2:] for name in data.label_names if name != "O"})
    assert all(counts[t] >= k for t in types), counts
    for index, record in enumerate(records):
        alone = entity_counts(data, [record])
        assert alone, "a sentence without entities was chosen"
        assert any(counts[t] - alone[t] < k for t in alone), f"sentence {index} is not needed by any type"
    return counts


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_ner_subset_guarantee(files, k):
    data = load(ner_config(files, train_examples_per_class=k), files, "token_cls")
    counts = check_greedy_guarantee(data, k)
    assert data.train_summary()["class_counts"] == {t: counts[t] for t in ("PER", "LOC", "MISC")}
    again = load(ner_config(files, train_examples_per_class=k), files, "token_cls")
    assert np.array_equal(again.train_subset(), data.train_subset())
    if k > 1:
        other = load(ner_config(files, train_examples_per_class=k, train_subset_seed=3), files, "token_cls")
        check_greedy_guarantee(other, k)
        assert not np.array_equal(other.train_subset(), data.train_subset())


def test_greedy_ner_on_conll2003_when_present():
    data_dir = os.environ.get("FLAXEN_DATA_DIR", "")
    if not os.path.isfile(os.path.join(data_dir, "conll2003", "train.txt")):
        pytest.skip("CoNLL-2003 is not under FLAXEN_DATA_DIR")
    cfg = config.data_preset("conll2003")
    cfg.train_examples_per_class = 5
    data = load_task_data(cfg, _task("token_cls"), data_dir)
    counts = check_greedy_guarantee(data, 5)
    assert set(counts) == {"PER", "ORG", "LOC", "MISC"} and len(data.records("train")) <= 20


def test_greedy_cover_error_names_the_type_and_its_count():
    counts = np.array([[2, 1], [1, 0], [3, 0]])
    with pytest.raises(ConfigError, match=r"=2: entity type 'LOC' has only 1 mentions"):
        sampling.greedy_cover(counts, 2, 0, ["PER", "LOC"])


# ---------------------------------------------------------------------- class weights


def test_balanced_weights_are_the_closed_form(files):
    data = load(cls_config(files), files, class_weights="balanced")
    n, c = sum(CLASS_COUNTS.values()), len(CLASS_COUNTS)
    want = {name: n / (c * count) for name, count in CLASS_COUNTS.items()}
    assert data.train_summary()["class_weights"] == pytest.approx(want, rel=1e-12)
    sklearn = pytest.importorskip("sklearn.utils.class_weight")
    labels = np.array([r["label"] for r in data.records("train")])
    assert np.allclose(sklearn.compute_class_weight("balanced", classes=np.arange(3), y=labels),
                       [want[name] for name in data.label_names], rtol=1e-12)
    few = load(cls_config(files, train_examples_per_class=3), files, class_weights="balanced")
    assert few.train_summary()["class_weights"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def test_token_balanced_weights_count_scored_tags(files):
    data = load(ner_config(files), files, "token_cls", class_weights="balanced")
    tags = Counter(t for r in data.records("train") for t in r["tags"])  # every word is scored (short sentences)
    n = sum(tags.values())
    want = {name: n / (len(NER_LABELS) * tags[i]) for i, name in enumerate(NER_LABELS)}
    assert data.train_summary()["class_weights"] == pytest.approx(want, rel=1e-12)


def test_weight_list_of_the_wrong_length_names_key_and_num_labels(files):
    with pytest.raises(ConfigError, match=r"task.class_weights has 2 weights but num_labels is 3 \(labels: a, b, c\)"):
        load(cls_config(files), files, class_weights=[1.0, 2.0])


def torch_loss(logits, labels, weights):
    torch = pytest.importorskip("torch")
    return float(torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits, np.float64)),
                                                   torch.tensor(np.asarray(labels, np.int64)),
                                                   weight=torch.tensor(weights, dtype=torch.float64),
                                                   ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.7], [1.0, 4.0, 9.0], "balanced"])
def test_weighted_seq_loss_is_torch_cross_entropy(files, weights):
    import jax.numpy as jnp

    data = load(cls_config(files), files, class_weights=weights)
    task = data.task
    vector = [float(w) for w in data.train_summary()["class_weights"].values()]
    rng = np.random.default_rng(1)
    for batch in data.loader("validation", 6, seed=0, train=False):  # 8 rows: the last batch has padding rows
        logits = rng.normal(size=(6, 3)).astype(np.float32) * 3
        loss_sum, weight = task.loss_terms(SimpleNamespace(logits=jnp.asarray(logits)), batch)
        assert float(task.loss_weight(batch)) == pytest.approx(float(weight), rel=1e-6)
        assert float(weight) >= 1.0  # scaled weights: the train step's max(weight, 1) never binds
        labels = np.where(batch["valid"] == 1, batch["labels"], IGNORE_INDEX)
        assert float(loss_sum / weight) == pytest.approx(torch_loss(logits, labels, vector), abs=1e-5)


def test_weighted_token_loss_is_torch_cross_entropy(files):
    import jax.numpy as jnp

    weights = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    data = load(ner_config(files), files, "token_cls", class_weights=weights)
    rng = np.random.default_rng(2)
    for index, batch in zip(range(3), data.loader("train", 8, seed=0, train=False)):
        logits = rng.normal(size=batch["labels"].shape + (7,)).astype(np.float32) * 3
        loss_sum, weight = data.task.loss_terms(SimpleNamespace(logits=jnp.asarray(logits)), batch)
        assert float(data.task.loss_weight(batch)) == pytest.approx(float(weight), rel=1e-6)
        want = torch_loss(logits.reshape(-1, 7), batch["labels"].reshape(-1), weights)
        assert float(loss_sum / weight) == pytest.approx(want, abs=1e-5)
    unweighted = load(ner_config(files), files, "token_cls")
    batch = next(iter(unweighted.loader("train", 8, seed=0, train=False)))
    assert "label_weights" not in batch
    loss_sum, weight = unweighted.task.loss_terms(SimpleNamespace(logits=jnp.asarray(logits)), batch)
    assert float(loss_sum / weight) == pytest.approx(torch_loss(logits.reshape(-1, 7), batch["labels"].reshape(-1),
                                                                [1.0] * 7), abs=1e-5)


# ---------------------------------------------------------------------- balanced resampling


def test_resampled_epochs_draw_each_label_equally_and_resume_exactly(files):
    data = load(cls_config(files, resample="balanced"), files)
    assert data.epoch_examples("train") == 90 and data.num_examples("train") == 45  # 3 labels x 30
    stored = data.records("train")
    loader = data.loader("train", 9, seed=3, train=True)
    for _ in range(2):  # two epochs of 10 batches: 30 rows of each label in each
        batches = [next(loader) for _ in range(10)]
        assert Counter(int(label) for b in batches for label in b["labels"]) == {0: 30, 1: 30, 2: 30}
    sampler = sampling.BalancedEpochs([r["label"] for r in stored], 11)
    drawn = Counter(sampler.epoch(0).tolist())
    for index, record in enumerate(stored):  # a (30, 10, 5) split: each row 1, 3 or 6 times
        assert drawn[index] == 30 // CLASS_COUNTS[data.label_names[record["label"]]]
    assert not np.array_equal(sampler.epoch(0), sampler.epoch(1))

    reference = data.loader("train", 9, seed=3, train=True)
    for _ in range(7):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))
    assert state["resample"] == "balanced"
    want = [next(reference) for _ in range(16)]  # crosses into the next epoch
    resumed = load(cls_config(files, resample="balanced", loader_threads=2), files).loader("train", 9, seed=3,
                                                                                            train=True)
    resumed.set_state(state)
    for batch in want:
        got = next(resumed)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    with pytest.raises(CheckpointError, match=r"resample: saved 'balanced', now None"):
        load(cls_config(files), files).loader("train", 9, seed=3, train=True).set_state(state)
    shards = [data.loader("train", 3, seed=3, train=True, process_index=p, process_count=3) for p in range(3)]
    single = data.loader("train", 9, seed=3, train=True)
    for _ in range(12):
        whole, parts = next(single), [next(s) for s in shards]
        assert all(np.array_equal(parts[p]["labels"], whole["labels"][p::3]) for p in range(3))


def test_uneven_classes_repeat_floor_or_ceil_times():
    classes = [0] * 7 + [1] * 3
    sampler = sampling.BalancedEpochs(classes, 0)
    assert sampler.length == 14
    for epoch in range(3):
        drawn = Counter(sampler.epoch(epoch).tolist())
        assert sum(drawn[i] for i in range(7)) == sum(drawn[i] for i in range(7, 10)) == 7
        assert all(drawn[i] == 1 for i in range(7)) and sorted(drawn[i] for i in range(7, 10)) == [2, 2, 3]


def test_token_resampling_balances_each_sentences_rarest_type(files):
    data = load(ner_config(files, resample="balanced"), files, "token_cls")
    records = data.records("train")
    totals = entity_counts(data, records)
    rarest_first = sorted(("PER", "LOC", "MISC"), key=lambda t: totals[t])

    def group(record):
        present = entity_counts(data, [record])
        return next((t for t in rarest_first if present[t]), "none")

    sizes = Counter(group(r) for r in records)
    epoch = data.epoch_examples("train")
    assert epoch == 4 * max(sizes.values())
    loader = data.loader("train", 1, seed=0, train=True)
    drawn = Counter()
    for _ in range(epoch):  # one resampled epoch, read back from the batches' scored tags
        labels = next(loader)["labels"][0]
        present = mentions(data.label_names[t] for t in labels[labels != IGNORE_INDEX])
        drawn[next((t for t in rarest_first if present[t]), "none")] += 1
    assert drawn == {kind: epoch // 4 for kind in ("PER", "LOC", "MISC", "none")}
