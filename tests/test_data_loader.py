"""grain loaders on the generated quickstart data: ordered eval passes with padding rows, epochs
and reshuffling, buckets, clm windows, mlm 80/10/10 statistics, exact resume, process sharding."""
import json
from collections import Counter

import numpy as np
import pytest

from flaxen import tasks
from flaxen.tasks.clm import token_stream
from flaxen.tasks.mlm import packs as mlm_packs

from flaxen.data import DataConfig, SyntheticConfig, TokenizerConfig, encoding, load_task_data
from flaxen.errors import CheckpointError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prepared"))


def quickstart(prepared, kind, task, **kw):
    spec = SyntheticConfig(kind=kind, seed=3, num_train=2000 if kind == "corpus" else 96,
                           num_validation=200 if kind == "corpus" else 103)
    cfg = DataConfig(name=f"q_{kind}", source="synthetic", synthetic=spec, tokenizer=TokenizerConfig(kind="word"),
                     prepared_dir=prepared, window_length=32, max_length=32, bucket_lengths=[8, 16, 32], **kw)
    return load_task_data(cfg, tasks.get(task), prepared)


@pytest.fixture(scope="module")
def cls_data(prepared):
    return quickstart(prepared, "classification", "seq_cls")


@pytest.fixture(scope="module")
def corpus_clm(prepared):
    return quickstart(prepared, "corpus", "clm")


@pytest.fixture(scope="module")
def corpus_mlm(prepared):
    return quickstart(prepared, "corpus", "mlm")


def rows_of(batch):
    return [tuple(batch["input_ids"][i][batch["attention_mask"][i] == 1]) for i in range(len(batch["valid"]))
            if batch["valid"][i]]


def expected_rows(data, split):
    cfg = data.cfg
    return [tuple(encoding.classification_row(data.tokenizer, r, cfg.max_length, False)["input_ids"])
            for r in data.records(split)]


def test_eval_pass_is_ordered_and_padded(cls_data):
    loader = cls_data.loader("validation", 20, seed=0, train=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    assert [int(b["valid"].sum()) for b in batches] == [20] * 5 + [3]
    assert [r for b in batches for r in rows_of(b)] == expected_rows(cls_data, "validation")
    last = batches[-1]
    assert (last["attention_mask"][3:] == 0).all() and (last["labels"][3:] == -100).all()
    labels = [int(label) for b in batches for label, v in zip(b["labels"], b["valid"]) if v]
    assert labels == [r["label"] for r in cls_data.records("validation")]


def test_train_epochs_cover_every_record_and_reshuffle(cls_data):
    loader = cls_data.loader("train", 16, seed=1, train=True)
    epochs = [[r for _ in range(6) for r in rows_of(next(loader))] for _ in range(3)]
    everything = Counter(expected_rows(cls_data, "train"))
    assert all(Counter(epoch) == everything for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    same = cls_data.loader("train", 16, seed=1, train=True)
    other = cls_data.loader("train", 16, seed=2, train=True)
    first = next(cls_data.loader("train", 16, seed=1, train=True))
    assert np.array_equal(next(same)["input_ids"], first["input_ids"])
    assert not np.array_equal(next(other)["input_ids"], first["input_ids"])


def test_batches_use_the_smallest_bucket_that_fits(cls_data):
    shapes = Counter()
    for batch in cls_data.loader("validation", 4, seed=0, train=False):
        length = batch["input_ids"].shape[1]
        longest = int(batch["attention_mask"].sum(1).max())
        assert length == min(b for b in (8, 16, 32) if b >= longest)
        shapes[length] += 1
        assert {k: v.dtype for k, v in batch.items()} == {
            "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32, "labels": np.int32,
            "valid": np.int32}
    assert set(shapes) <= {8, 16, 32} and len(shapes) >= 2


def find(stream, row):
    starts = np.flatnonzero(stream[:len(stream) - len(row) + 1] == row[0])
    return [int(s) for s in starts if np.array_equal(stream[s:s + len(row)], row)]


def test_clm_windows(corpus_clm):
    stream = token_stream(corpus_clm, "train")
    loader = corpus_clm.loader("train", 8, seed=0, train=True)
    for _ in range(4):
        batch = next(loader)
        assert batch["input_ids"].shape == (8, 32) and "token_type_ids" not in batch
        for inputs, labels in zip(batch["input_ids"], batch["labels"]):
            both = np.concatenate([inputs, labels[-1:]])
            assert find(stream, both), "a training row is not a contiguous window of the stream"
    eval_stream = token_stream(corpus_clm, "validation")
    batches = list(corpus_clm.loader("validation", 8, seed=0, train=False))
    inputs = np.concatenate([b["input_ids"][b["attention_mask"] == 1] for b in batches])
    targets = np.concatenate([b["labels"][b["labels"] != -100] for b in batches])
    assert np.array_equal(inputs, eval_stream) and np.array_equal(targets, eval_stream[1:])
    assert sum(int(b["valid"].sum()) for b in batches) == corpus_clm.num_examples("validation")


def test_mlm_masking_statistics(corpus_mlm):
    """BERT's recipe: 15 % of content tokens chosen; of those 80 % [MASK], 10 % random, 10 % kept.
    Bounds are 5 standard deviations of the binomial counts."""
    tokenizer = corpus_mlm.tokenizer
    packs = mlm_packs(corpus_mlm, "train")
    specials = set(tokenizer.special_ids)
    chosen = content = masked = replaced = kept = 0
    position = 0
    for batch in corpus_mlm.loader("train", 64, seed=0, train=False):
        for row in range(64):
            if not batch["valid"][row]:
                continue
            original = np.array([tokenizer.cls_token_id] + packs[position] + [tokenizer.sep_token_id])
            position += 1
            n = len(original)
            inputs, labels = batch["input_ids"][row, :n], batch["labels"][row, :n]
            assert (batch["labels"][row, n:] == -100).all()
            pick = labels != -100
            assert not pick[0] and not pick[-1]
            assert np.array_equal(labels[pick], original[pick])
            assert np.array_equal(inputs[~pick], original[~pick])
            content += n - 2
            chosen += int(pick.sum())
            masked += int((inputs[pick] == tokenizer.mask_token_id).sum())
            kept += int((inputs[pick] == original[pick]).sum())
            other = pick & (inputs != original) & (inputs != tokenizer.mask_token_id)
            replaced += int(other.sum())
            assert not specials & set(inputs[other].tolist())
    assert position == len(packs)

    def within(count, total, p):
        return abs(count - total * p) <= 5 * np.sqrt(total * p * (1 - p))

    random_ids = tokenizer.vocab_size - len(specials)
    assert within(chosen, content, 0.15)
    assert within(masked, chosen, 0.8)
    assert within(replaced, chosen, 0.1 * (1 - 1 / random_ids))
    assert within(kept, chosen, 0.1 + 0.1 / random_ids)
    fixed = [next(iter(corpus_mlm.loader("train", 64, seed=0, train=False)))["input_ids"] for _ in range(2)]
    assert np.array_equal(*fixed)


@pytest.mark.parametrize("task", ["seq_cls", "mlm", "clm"])
def test_resume_and_prefetch_give_identical_batches(task, cls_data, corpus_mlm, corpus_clm, prepared):
    data = {"seq_cls": cls_data, "mlm": corpus_mlm, "clm": corpus_clm}[task]
    plain = data.loader("train", 8, seed=5, train=True)
    reference = [next(plain) for _ in range(20)]
    threaded = quickstart(prepared, "classification" if task == "seq_cls" else "corpus", task, loader_threads=2)
    loader = threaded.loader("train", 8, seed=5, train=True)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    resumed = data.loader("train", 8, seed=5, train=True)
    resumed.set_state(state)
    for want in reference[7:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_state_from_another_loader_is_refused(cls_data):
    state = cls_data.loader("train", 8, seed=5, train=True).get_state()
    with pytest.raises(CheckpointError, match=r"batch_size: saved 8, now 16"):
        cls_data.loader("train", 16, seed=5, train=True).set_state(state)


def test_process_shards_are_the_single_process_batch_interleaved(cls_data, corpus_mlm):
    for data in (cls_data, corpus_mlm):
        single = data.loader("train", 24, seed=9, train=True)
        shards = [data.loader("train", 8, seed=9, train=True, process_index=p, process_count=3) for p in range(3)]
        for _ in range(6):
            whole = next(single)
            parts = [next(s) for s in shards]
            for p in range(3):
                assert np.array_equal(parts[p]["labels"], whole["labels"][p::3])
                assert rows_of(parts[p]) == rows_of({k: v[p::3] for k, v in whole.items()})


def test_eval_shards_are_disjoint_complete_and_equally_long(cls_data):
    shards = [list(cls_data.loader("validation", 10, seed=0, train=False, process_index=p, process_count=4))
              for p in range(4)]
    assert len({len(s) for s in shards}) == 1
    rows = [r for s in shards for b in s for r in rows_of(b)]
    assert Counter(rows) == Counter(expected_rows(cls_data, "validation"))
    assert len(rows) == 103


def test_length_grouping_sorts_each_window_and_keeps_its_rows(cls_data, prepared):
    grouped_data = quickstart(prepared, "classification", "seq_cls", length_grouping=3)
    plain = cls_data.loader("train", 8, seed=4, train=True)
    grouped = grouped_data.loader("train", 8, seed=4, train=True)
    assert grouped.get_state()["length_grouping"] == 3 and "length_grouping" not in plain.get_state()
    for _ in range(4):
        want = [r for _ in range(3) for r in rows_of(next(plain))]
        batches = [next(grouped) for _ in range(3)]
        assert Counter(r for b in batches for r in rows_of(b)) == Counter(want)
        spans = sorted((min(map(len, rows_of(b))), max(map(len, rows_of(b)))) for b in batches)
        assert all(spans[k][1] <= spans[k + 1][0] for k in range(2)), spans
        for b in batches:
            assert b["input_ids"].shape[1] == next(x for x in (8, 16, 32) if x >= max(map(len, rows_of(b))))
    state = json.loads(json.dumps(grouped.get_state()))
    reference = [next(grouped) for _ in range(5)]
    resumed = quickstart(prepared, "classification", "seq_cls", length_grouping=3, loader_threads=2).loader(
        "train", 8, seed=4, train=True)
    resumed.set_state(state)
    for want in reference:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
