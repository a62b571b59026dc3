"""grain loaders over prepared tfds data: the public surface the training loop calls.

    task_data = load_task_data(cfg, task, data_dir, tokenizer_path=None)   # task: a flaxen Task
    loader = task_data.loader(split, batch_size, seed=0, train=True, process_index=0, process_count=1)
    batch = next(loader)                      # dict of numpy arrays, see flaxen/data/encoding.py
    state = loader.get_state(); loader.set_state(state)

Why this shape: every row of a loader is a pure function of (records, seed, position), written as a
grain `MapDataset` (shuffle -> repeat -> map/random_map -> shard -> batch), so the iterator state is
one integer and a resumed loader yields bit-identical batches. Train loaders are endless and
reshuffle each epoch (grain reseeds its index shuffle with the epoch); rows are sharded across
processes after the global shuffle (process p takes positions p, p+P, ...), so P processes with
batch B see together what one process with batch P*B sees, and their shards are disjoint.
Eval loaders make one ordered pass; every process yields the same number of batches, the last
filled up with padding rows (`valid` = 0).

With `data.length_grouping=G` (tasks whose rows are records: seq_cls, token_cls, qa), each run of G consecutive batches
is formed from its G x B shuffled rows sorted by length, in a seeded order: batches hold rows of
similar length and mostly fall in the small buckets (HF Trainer's group_by_length, as a pure
function of the batch index, so resume stays exact). Each process groups its own shard, so P
processes see the same rows per window as one process, in other batches.

Tasks whose examples have classes (seq_cls, token_cls; flaxen.data.sampling) can narrow and rebalance
the train split: with `data.train_examples_per_class=K` the train split is the task's few-shot subset
(`records("train")`, `num_examples`, evaluation on train included; the tokenizer is built as
without it), and with `data.resample=balanced` train loaders draw every class equally
often per epoch (`epoch_examples`: the resampled epoch's rows), still a pure function of (seed,
position), so resume stays exact. Loader states record both, and a state is refused by a loader
built without the option it was saved with.

`poisson_loader` (DP-SGD, flaxen.privacy) instead draws each train batch as a Poisson sample of
the split's records, a pure function of (seed, batch index): see PoissonLoader.

Rows come from the task (flaxen/tasks/<name>.py: `rows`, `collate`, `num_examples`): e.g.
classification and tagging rows are tokenized on the fly from the records, mlm rows are packed
sentences masked afresh each epoch, clm rows are windows of the split's token stream. Records are read from the tfds data source once per split and kept in memory (SST-2 train,
67k rows, takes about a second and 30 MB).
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from typing import Any, Optional

import grain
import numpy as np

from flaxen.data import builders, encoding, sampling, synthetic
from flaxen.data import tokenizers as tokenization
from flaxen.data.config import DataConfig, check_config
from flaxen.errors import CheckpointError, ConfigError

PREFETCH_BATCHES = 8
ENDLESS = 1 << 62
# loader meta keys present only when their option is on: a saved state holding one needs a loader with it
OPTIONAL_META = ("length_grouping", "resample", "train_subset")


def as_data_config(cfg: Any) -> DataConfig:
    """A DataConfig from a DataConfig, an OmegaConf node (structured or not) or a dict."""
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import OmegaConf
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
        return OmegaConf.to_object(merged)
    except Exception as error:
        raise ConfigError(f"data config: {error}") from None


def seed32(seed: int, salt: int) -> int:
    """A 32-bit grain seed from the run's seed and a per-use salt (each stream of randomness its own)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, salt]).generate_state(1)[0])


def _check_state(meta: dict, state: dict) -> None:
    """CheckpointError unless the saved loader `state` was made by a loader built for `meta` and
    holds a `next_index`."""
    mismatched = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in meta.items()
                  if state.get(key) != value]
    mismatched += [f"{key}: saved {state[key]!r}, now None" for key in OPTIONAL_META
                   if key in state and key not in meta]
    if mismatched:
        raise CheckpointError("the data iterator state does not belong to this loader (" + "; ".join(mismatched)
                              + "); resuming would not replay the same batches")
    if "next_index" not in state:
        raise CheckpointError("the data iterator state has no 'next_index'")


class Loader:
    """Batches of one split; `get_state()` / `set_state()` give exact resume.

    Train loaders are endless; eval loaders stop after `len(loader)` batches.
    """

    def __init__(self, dataset: grain.MapDataset, meta: dict, threads: int, num_batches: Optional[int]):
        self._dataset = dataset
        self._meta = meta
        self._num_batches = num_batches
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH_BATCHES if threads else 0)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("a train loader is endless")
        return self._num_batches

    def get_state(self) -> dict:
        """JSON-serialisable: the next batch's index plus what the loader was built for."""
        return {**self._meta, "next_index": int(self._iterator.get_state()["next_index"])}

    def set_state(self, state: dict) -> None:
        _check_state(self._meta, state)
        self._iterator.set_state({"next_index": int(state["next_index"])})


class PoissonLoader:
    """Poisson-sampled train batches (DP-SGD, flaxen.privacy): batch `index` holds each of the n
    examples of the split independently with probability `rate`, drawn from (seed, index) alone, so
    `get_state()` / `set_state()` (the next index and the overflow counters) resume exactly.

    Every batch has `max_rows` rows (static shapes): the drawn examples, in stored order, then
    padding rows (`valid` = 0). A draw of more than max_rows examples keeps a random max_rows of
    them and counts the batch in `truncated_batches` (and the examples left out in `dropped_rows`).
    With P processes process p takes rows p, p + P, ... of the batch (max_rows / P rows), padded to
    the bucket length of the whole batch's longest row, so every process's arrays have one shape.
    Endless, like a train loader."""

    def __init__(self, rows, num_examples: int, rate: float, max_rows: int, seed: int, collate, buckets, meta: dict,
                 process_index: int = 0, process_count: int = 1):
        if max_rows % process_count:
            raise ConfigError(f"a Poisson batch of {max_rows} rows does not split over {process_count} processes")
        self._rows, self._n, self._rate, self._max_rows = rows, int(num_examples), float(rate), int(max_rows)
        self._seed, self._collate, self._buckets, self._meta = seed, collate, list(buckets), meta
        self._process_index, self._process_count = process_index, process_count
        self._next, self.truncated_batches, self.dropped_rows = 0, 0, 0
        self.last_drawn = 0

    def __iter__(self):
        return self

    def sample(self, index: int) -> tuple[np.ndarray, int]:
        """(the indices of batch `index`'s examples, ascending; how many were drawn before truncation)."""
        rng = np.random.default_rng([self._seed, int(index)])
        chosen = np.flatnonzero(rng.random(self._n) < self._rate)
        drawn = len(chosen)
        if drawn > self._max_rows:
            chosen = np.sort(rng.choice(chosen, self._max_rows, replace=False))
        return chosen, drawn

    def __next__(self) -> dict:
        chosen, drawn = self.sample(self._next)
        self._next += 1
        self.last_drawn = drawn
        if drawn > self._max_rows:
            self.truncated_batches += 1
            self.dropped_rows += drawn - self._max_rows
        rows = [self._rows[int(i)] for i in chosen]
        longest = max((len(row["input_ids"]) for row in rows), default=1)
        buckets = [b for b in self._buckets if b >= longest] or self._buckets
        rows += [encoding.PADDING] * (self._max_rows - len(rows))
        local = rows[self._process_index::self._process_count]
        return self._collate(local, self._max_rows // self._process_count, buckets)

    def get_state(self) -> dict:
        return {**self._meta, "next_index": self._next, "truncated_batches": self.truncated_batches,
                "dropped_rows": self.dropped_rows}

    def set_state(self, state: dict) -> None:
        _check_state(self._meta, state)
        self._next = int(state["next_index"])
        self.truncated_batches = int(state.get("truncated_batches", 0))
        self.dropped_rows = int(state.get("dropped_rows", 0))


class _LengthGrouped:
    """Batch `index` of a length-grouped train loader (see the module docstring): the rows of its
    window of `group` batches, sorted by length, cut into batches, in an order seeded by the window."""

    def __init__(self, rows: grain.MapDataset, batch_size: int, group: int, seed: int, batch_fn):
        self.rows, self.batch_size, self.group, self.seed, self.batch_fn = rows, batch_size, group, seed, batch_fn
        self._windows = sampling.WindowCache(self._build)

    def _window(self, window: int) -> list:
        return self._windows[window]

    def _build(self, window: int) -> list:
        size = self.batch_size * self.group
        rows = [self.rows[window * size + j] for j in range(size)]
        order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
        batches = [[rows[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]] for k in range(self.group)]
        permutation = np.random.default_rng([self.seed, window]).permutation(self.group)
        return [batches[k] for k in permutation]

    def __call__(self, index: int) -> dict:
        window, position = divmod(int(index), self.group)
        return self.batch_fn(self._window(window)[position])


class TaskData:
    """A prepared dataset, its tokenizer and its loaders for one task.

    `task` is a flaxen Task (flaxen/tasks/): it says how records become rows, how many rows one
    pass holds, which bucket lengths and which batch fields apply. This class knows the data
    (splits, records, text, labels) and cuts batches; it never tests a task's name.
    """

    def __init__(self, cfg: DataConfig, task: Any, prepared: builders.PreparedDataset,
                 tokenizer: tokenization.Tokenizer):
        self.cfg = cfg
        self.task = task
        self.prepared = prepared
        self.tokenizer = tokenizer
        self._cache: dict = {}
        self._cache_lock = threading.Lock()
        task.check_data(self)
        self.label_names = task.label_names(prepared)
        self.tag_scheme = prepared.tag_scheme
        self.regression = prepared.regression
        task.check_class_options(self)  # few-shot subset, class weights, resampling (flaxen.data.sampling)

    # ------------------------------------------------------------ facts about the data

    @property
    def splits(self) -> list[str]:
        return self.prepared.splits

    @property
    def num_labels(self) -> Optional[int]:
        if self.label_names is not None:
            return len(self.label_names)
        return 1 if self.regression else None

    def cached(self, key, build):
        """`build()` once per key for this TaskData (tasks keep packed rows, streams, features here)."""
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
        value = build()
        with self._cache_lock:
            return self._cache.setdefault(key, value)

    def records(self, split: str) -> list[dict]:
        """Every record of `split` in stored order (schemas in flaxen.data.builders; parallel data:
        {"source": str, "target": str}). With data.train_examples_per_class the train split is its
        few-shot subset (`train_subset`), still in stored order."""
        if split == "train" and self.cfg.train_examples_per_class is not None:
            subset, stored = self.train_subset(), self.prepared.records(split)
            return self.cached(("train_subset_records", sampling.subset_key(self.cfg.train_examples_per_class),
                                int(self.cfg.train_subset_seed)), lambda: [stored[i] for i in subset])
        return self.prepared.records(split)

    def train_subset(self) -> Optional[np.ndarray]:
        """Ascending indices of the train records in the few-shot subset (data.train_examples_per_class,
        drawn by the task from data.train_subset_seed: flaxen.data.sampling), None without one."""
        k = self.cfg.train_examples_per_class
        if k is None:
            return None
        return self.cached(("train_subset", sampling.subset_key(k), int(self.cfg.train_subset_seed)),
                           lambda: self.task.subset_indices(self, self.prepared.records("train"),
                                                            sampling.examples_per_class_setting(k),
                                                            int(self.cfg.train_subset_seed)))

    def num_records(self, split: str) -> int:
        """Sentences (tagging), rows (classification) or text chunks (text) stored for `split` (the
        few-shot subset's for train when there is one)."""
        if split == "train" and self.cfg.train_examples_per_class is not None:
            return len(self.train_subset())
        return self.prepared.num_records(split)

    def epoch_examples(self, split: str) -> int:
        """Rows one training epoch over `split` draws: num_examples, or with data.resample=balanced the
        resampled epoch's (every class as often as the largest). What the `epochs` config key counts."""
        return self.task.epoch_examples(self, split)

    def train_summary(self) -> dict:
        """What of the train split the run trains on, for results.json: its examples, the rows of one
        epoch, and the few-shot subset, class weights and resampling when set."""
        summary = {"examples": int(self.num_examples("train")), "epoch_examples": int(self.epoch_examples("train"))}
        if self.cfg.train_examples_per_class is not None:
            summary["examples_per_class"] = sampling.examples_per_class_setting(self.cfg.train_examples_per_class)
            summary["subset_seed"] = int(self.cfg.train_subset_seed)
            summary["class_counts"] = self.task.subset_summary(self, self.records("train"))
        weights = self.task.label_weights(self) if getattr(self.task, "class_labels", False) else None
        if weights is not None:
            summary["class_weights"] = dict(zip(map(str, self.label_names), map(float, weights)))
        if self.cfg.resample is not None:
            summary["resample"] = self.cfg.resample
        return summary

    def num_examples(self, split: str) -> int:
        """Real rows of one ordered pass over `split` (the task's rows: records, packed rows, windows)."""
        return self.task.num_examples(self, split)

    def texts(self, split: str) -> list[str]:
        """The split's text: chunks that concatenate to the corpus (text data), else one string per
        sentence (tagging: words joined by spaces), per text field (classification) or per side of
        a sentence pair (parallel: source, target, source, target, ...)."""
        return record_texts(self.prepared, split)

    def sentences(self, split: str) -> list[str]:
        """Units packed into mlm rows: the non-empty lines of text data, else `texts(split)`."""
        if self.prepared.schema != "text":
            return self.texts(split)
        return [line for chunk in self.texts(split) for line in chunk.split("\n") if line.strip()]

    # ------------------------------------------------------------ batches

    def loader(self, split: str, batch_size: int, *, seed: int, train: bool, process_index: int = 0,
               process_count: int = 1) -> Loader:
        """Batches of `split` for this process (see the module docstring)."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size}: expected a positive integer")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index={process_index} is outside 0..process_count-1 ({process_count})")
        task = self.task
        rows = task.rows(self, split, train, seed)[process_index::process_count]
        buckets = task.buckets(self.cfg)
        pad_id = self.tokenizer.pad_token_id

        def batch_fn(batch_rows):
            return task.collate(batch_rows, batch_size, buckets, pad_id)

        group = task.length_grouping(self.cfg)
        if train and group > 1:
            grouped = _LengthGrouped(rows, batch_size, group, seed32(seed, 6), batch_fn)
            batches, num_batches = grain.MapDataset.range(ENDLESS).map(grouped), None
        elif train:
            batches, num_batches = rows.batch(batch_size, drop_remainder=True, batch_fn=batch_fn), None
        else:
            total = self.num_examples(split)
            per_process = math.ceil(total / process_count)
            num_batches = math.ceil(per_process / batch_size)
            shard = rows
            padded = grain.MapDataset.range(num_batches * batch_size).map(
                lambda index: shard[index] if index < len(shard) else encoding.PADDING)
            batches = padded.batch(batch_size, drop_remainder=False, batch_fn=batch_fn)
        meta = {"data": os.path.basename(os.path.dirname(self.prepared.path)), "split": split, "task": task.name,
                "batch_size": int(batch_size), "seed": int(seed), "train": bool(train),
                "process_index": int(process_index), "process_count": int(process_count),
                "vocab_size": int(self.tokenizer.vocab_size)}
        if train and group > 1:
            meta["length_grouping"] = int(group)
        if train and self.cfg.resample is not None:
            meta["resample"] = self.cfg.resample
        if split == "train" and self.cfg.train_examples_per_class is not None:
            meta["train_subset"] = [sampling.examples_per_class_setting(self.cfg.train_examples_per_class),
                                    int(self.cfg.train_subset_seed)]
        return Loader(batches, meta, self.cfg.loader_threads, num_batches)


    def poisson_loader(self, split: str, *, rate: float, max_rows: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> PoissonLoader:
        """Poisson-sampled batches of `split` (DP-SGD; see PoissonLoader): each example in a batch
        with probability `rate`, `max_rows` rows per batch (this process: max_rows / process_count).
        For tasks whose rows are records (task.example_rows)."""
        task = self.task
        if not task.example_rows:
            raise ConfigError(f"Poisson sampling draws records, but task {task.name}'s rows are not one record each")
        if not 0 < rate <= 1:
            raise ConfigError(f"Poisson sampling rate {rate}: expected a value in (0, 1]")
        rows = task.rows(self, split, False, seed)
        pad_id = self.tokenizer.pad_token_id
        meta = {"data": os.path.basename(os.path.dirname(self.prepared.path)), "split": split, "task": task.name,
                "sampling": "poisson", "rate": float(rate), "max_rows": int(max_rows), "seed": int(seed),
                "train": True, "process_index": int(process_index), "process_count": int(process_count),
                "vocab_size": int(self.tokenizer.vocab_size)}
        return PoissonLoader(rows, self.num_examples(split), rate, max_rows, seed32(seed, 7),
                             lambda batch_rows, size, buckets: task.collate(batch_rows, size, buckets, pad_id),
                             task.buckets(self.cfg), meta, process_index, process_count)


# ---------------------------------------------------------------- entry point

def record_texts(prepared: builders.PreparedDataset, split: str) -> list[str]:
    """See TaskData.texts."""
    return prepared.texts(split)


def _tokenizer(cfg: DataConfig, task: Any, prepared: builders.PreparedDataset, data_dir: str,
               tokenizer_path: Optional[str]) -> tokenization.Tokenizer:
    spec = cfg.tokenizer
    if tokenizer_path is not None:
        return tokenization.load_tokenizer(tokenizer_path)
    if spec.kind == "pretrained":
        if not spec.path:
            raise ConfigError("data.tokenizer.kind=pretrained needs data.tokenizer.path (a Hugging Face tokenizer "
                              "directory) unless the model is pretrained (its directory's tokenizer is used)")
        return tokenization.load_tokenizer(spec.path)
    def all_texts():
        return [t for split in prepared.splits for t in record_texts(prepared, split)]

    if spec.kind == "char":
        return tokenization.char_tokenizer(all_texts(), with_specials=task.special_tokens)
    if spec.kind == "word":
        if cfg.source == "synthetic":
            return tokenization.word_tokenizer([" ".join(synthetic.vocabulary())])
        return tokenization.word_tokenizer(all_texts())
    # named after the prepared dataset, whose name holds the raw files' checksums: changed train
    # files give a new dataset and a newly trained vocabulary
    sentinels = spec.sentinels if spec.kind == "sentencepiece_bpe" else 0
    directory = os.path.join(builders.prepared_root(cfg, data_dir), "tokenizers",
                             f"{os.path.basename(os.path.dirname(prepared.path))}_{spec.kind}_{spec.vocab_size}"
                             f"_min{spec.min_frequency}_{'lower' if spec.lowercase else 'cased'}"
                             + (f"_sentinels{sentinels}" if sentinels else ""))
    return tokenization.cached_trained_tokenizer(directory, spec.kind, lambda: record_texts(prepared, "train"),
                                                 spec.vocab_size, spec.min_frequency, spec.lowercase, sentinels)


def load_task_data(cfg: Any, task: Any, data_dir: Optional[str] = None,
                   tokenizer_path: Optional[str] = None, presets=None) -> TaskData:
    """Prepares (or reuses) the data of `cfg` for `task` (a flaxen Task, e.g. flaxen.tasks.get('seq_cls'))
    under `<data_dir>/tfds/` and returns its TaskData. `tokenizer_path` (a Hugging Face model directory)
    overrides data.tokenizer. `presets(name) -> DataConfig` looks up the components of a mixture
    (flaxen.config.data_preset: configs/data/<name>.yaml)."""
    cfg = as_data_config(cfg)
    check_config(cfg, task)
    task.check_data_config(cfg)
    if data_dir is None:
        from flaxen.data.config import default_data_dir
        data_dir = default_data_dir()
    prepared = builders.prepare(cfg, data_dir, presets)
    tokenizer = _tokenizer(cfg, task, prepared, data_dir, tokenizer_path)
    return TaskData(dataclasses.replace(cfg), task, prepared, tokenizer)
