"""grain loaders over prepared tfds data: the public surface the training loop calls.

    task_data = load_task_data(cfg, task, data_dir, tokenizer_path=None)
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

With `data.length_grouping=G` (seq_cls / token_cls training), each run of G consecutive batches
is formed from its G x B shuffled rows sorted by length, in a seeded order: batches hold rows of
similar length and mostly fall in the small buckets (HF Trainer's group_by_length, as a pure
function of the batch index, so resume stays exact). Each process groups its own shard, so P
processes see the same rows per window as one process, in other batches.

Per task: seq_cls / token_cls rows are tokenized on the fly from the records; mlm rows are the
split's sentences packed into `window_length` rows once, then masked afresh each epoch (eval:
a fixed mask from the seed); clm rows are windows of the split's token stream (train: uniformly
random starts as nanoGPT; eval: consecutive windows covering every next-token target once).
Records are read from the tfds data source once per split and kept in memory (SST-2 train,
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

from flaxen.data import builders, encoding, synthetic
from flaxen.data import tokenizers as tokenization
from flaxen.data.config import DataConfig, check_config
from flaxen.errors import CheckpointError, ConfigError, DataError

PREFETCH_BATCHES = 8
ENDLESS = 1 << 62


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


def _seed32(seed: int, salt: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, salt]).generate_state(1)[0])


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
        mismatched = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in self._meta.items()
                      if state.get(key) != value]
        if mismatched:
            raise CheckpointError("the data iterator state does not belong to this loader (" + "; ".join(mismatched)
                                  + "); resuming would not replay the same batches")
        if "next_index" not in state:
            raise CheckpointError("the data iterator state has no 'next_index'")
        self._iterator.set_state({"next_index": int(state["next_index"])})


class _LengthGrouped:
    """Batch `index` of a length-grouped train loader (see the module docstring): the rows of its
    window of `group` batches, sorted by length, cut into batches, in an order seeded by the window."""

    def __init__(self, rows: grain.MapDataset, batch_size: int, group: int, seed: int, batch_fn):
        self.rows, self.batch_size, self.group, self.seed, self.batch_fn = rows, batch_size, group, seed, batch_fn
        self._lock = threading.Lock()
        self._windows: dict[int, list] = {}

    def _window(self, window: int) -> list:
        with self._lock:
            if window in self._windows:
                return self._windows[window]
        size = self.batch_size * self.group
        rows = [self.rows[window * size + j] for j in range(size)]
        order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
        batches = [[rows[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]] for k in range(self.group)]
        permutation = np.random.default_rng([self.seed, window]).permutation(self.group)
        batches = [batches[k] for k in permutation]
        with self._lock:
            self._windows[window] = batches
            for old in sorted(self._windows)[:-2]:
                del self._windows[old]
        return batches

    def __call__(self, index: int) -> dict:
        window, position = divmod(int(index), self.group)
        return self.batch_fn(self._window(window)[position])


class TaskData:
    """A prepared dataset, its tokenizer and its loaders for one task."""

    def __init__(self, cfg: DataConfig, task: str, prepared: builders.PreparedDataset,
                 tokenizer: tokenization.Tokenizer):
        self.cfg = cfg
        self.task = task
        self.prepared = prepared
        self.tokenizer = tokenizer
        self._cache: dict = {}
        expected = {"seq_cls": "classification", "token_cls": "tagging"}.get(task)
        if expected and prepared.schema != expected:
            raise ConfigError(f"task {task} needs {expected} data but data.source={cfg.source} ({cfg.name}) holds "
                              f"{prepared.schema} records")
        if task == "seq_cls" and "label" not in prepared.fields:
            raise ConfigError(f"task seq_cls needs labels: set data.label_column ({cfg.name} has none)")
        if task == "mlm" and tokenizer.mask_token_id is None:
            raise ConfigError("task mlm needs a tokenizer with a mask token; this one has none")
        self.label_names = list(prepared.label_names) if task in ("seq_cls", "token_cls") and prepared.label_names else None
        self.tag_scheme = prepared.tag_scheme if task == "token_cls" else None
        self.regression = task == "seq_cls" and prepared.regression
        self._random_ids = np.asarray(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special_ids)), np.int32)

    # ------------------------------------------------------------ facts about the data

    @property
    def splits(self) -> list[str]:
        return self.prepared.splits

    @property
    def num_labels(self) -> Optional[int]:
        if self.regression:
            return 1
        return len(self.label_names) if self.label_names is not None else None

    def records(self, split: str) -> list[dict]:
        return self.prepared.records(split)

    def num_records(self, split: str) -> int:
        """Sentences (tagging), rows (classification) or text chunks (text) stored for `split`."""
        return self.prepared.num_records(split)

    def num_examples(self, split: str) -> int:
        """Real rows of one ordered pass over `split` (records; packed rows for mlm; windows for clm)."""
        if self.task == "mlm":
            return len(self._packs(split))
        if self.task == "clm":
            return self._num_windows(split)
        return self.num_records(split)

    def texts(self, split: str) -> list[str]:
        """The split's text: chunks that concatenate to the corpus (text data), else one string per
        sentence (tagging: words joined by spaces) or per text field (classification)."""
        return record_texts(self.prepared, split)

    def sentences(self, split: str) -> list[str]:
        """Units packed into mlm rows: the non-empty lines of text data, else `texts(split)`."""
        if self.prepared.schema != "text":
            return self.texts(split)
        return [line for chunk in self.texts(split) for line in chunk.split("\n") if line.strip()]

    def token_stream(self, split: str) -> np.ndarray:
        """clm: the split as one id sequence (text data verbatim; sentences followed by eos or sep)."""
        key = ("stream", split)
        if key not in self._cache:
            tokenizer = self.tokenizer
            pieces = tokenizer.encode_batch(self.texts(split))
            separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            if self.prepared.schema != "text" and separator is not None:
                pieces = [p + [separator] for p in pieces]
            stream = np.fromiter((i for p in pieces for i in p), np.int32)
            if len(stream) < 2:
                raise DataError(f"split {split!r} has {len(stream)} tokens; clm needs at least 2")
            self._cache[key] = stream
        return self._cache[key]

    def unigram_entropy(self, split: str = "train") -> float:
        """Nats per token of the split's token ids under their own frequencies (clm: the stream;
        otherwise the sentences' ids): the loss of a model that ignores context."""
        if self.task == "clm":
            ids = self.token_stream(split)
        else:
            ids = np.fromiter((i for p in self.tokenizer.encode_batch(self.sentences(split)) for i in p), np.int64)
        counts = np.bincount(ids)
        p = counts[counts > 0] / len(ids)
        return float(-(p * np.log(p)).sum())

    def word_labels(self, split: str, process_index: int = 0, process_count: int = 1) -> list[list[str]]:
        """token_cls: gold tags of every word of every sentence (untruncated), in eval-loader order."""
        if self.task != "token_cls":
            raise ConfigError(f"word_labels is for token_cls, not {self.task}")
        names = self.label_names
        return [[names[t] for t in r["tags"]] for r in self.records(split)[process_index::process_count]]

    # ------------------------------------------------------------ rows

    def _packs(self, split: str) -> list[list[int]]:
        key = ("packs", split)
        if key not in self._cache:
            budget = self.cfg.window_length - self.tokenizer.single_template.num_special
            if budget < 1:
                raise ConfigError(f"data.window_length={self.cfg.window_length} leaves no room beside special tokens")
            self._cache[key] = encoding.pack(self.tokenizer.encode_batch(self.sentences(split)), budget)
            if not self._cache[key]:
                raise DataError(f"split {split!r} has no tokens to pack into mlm rows")
        return self._cache[key]

    def _num_windows(self, split: str) -> int:
        return math.ceil((len(self.token_stream(split)) - 1) / self.cfg.window_length)

    def _source(self, split: str, train: bool, seed: int) -> grain.MapDataset:
        """Unbatched rows in global order (train: endless)."""
        cfg, tokenizer, task = self.cfg, self.tokenizer, self.task
        if task == "clm":
            stream, length = self.token_stream(split), cfg.window_length
            if train:
                high = len(stream) - length
                if high < 1:
                    raise DataError(f"split {split!r} has {len(stream)} tokens, fewer than data.window_length+1="
                                    f"{length + 1}")
                return grain.MapDataset.range(ENDLESS).random_map(
                    lambda _, rng: encoding.clm_row(stream, int(rng.integers(0, high)), length),
                    seed=_seed32(seed, 1))
            return grain.MapDataset.range(self._num_windows(split)).map(
                lambda index: encoding.clm_row(stream, index * length, length))
        if task == "mlm":
            rows = grain.MapDataset.source(self._packs(split))
            if train:
                rows = rows.shuffle(seed=_seed32(seed, 2)).repeat(None)
            probability, random_ids = cfg.mlm_probability, self._random_ids
            return rows.random_map(lambda content, rng: encoding.mlm_row(tokenizer, content, rng, probability, random_ids),
                                   seed=_seed32(seed, 3 if train else 4))
        rows = grain.MapDataset.source(self.records(split))
        if train:
            rows = rows.shuffle(seed=_seed32(seed, 5)).repeat(None)
        max_length = cfg.max_length
        if task == "seq_cls":
            regression = self.regression
            return rows.map(lambda record: encoding.classification_row(tokenizer, record, max_length, regression))
        return rows.map(lambda record: encoding.tagging_row(tokenizer, record, max_length))

    def loader(self, split: str, batch_size: int, *, seed: int, train: bool, process_index: int = 0,
               process_count: int = 1) -> Loader:
        """Batches of `split` for this process (see the module docstring)."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size={batch_size}: expected a positive integer")
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index={process_index} is outside 0..process_count-1 ({process_count})")
        rows = self._source(split, train, seed)[process_index::process_count]
        buckets = [self.cfg.window_length] if self.task in ("mlm", "clm") else list(self.cfg.bucket_lengths)
        pad_id, task = self.tokenizer.pad_token_id, self.task

        def batch_fn(batch_rows):
            return encoding.collate(batch_rows, batch_size, buckets, pad_id, task)

        group = self.cfg.length_grouping if task in ("seq_cls", "token_cls") else 0
        if train and group > 1:
            grouped = _LengthGrouped(rows, batch_size, group, _seed32(seed, 6), batch_fn)
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
        meta = {"data": os.path.basename(os.path.dirname(self.prepared.path)), "split": split, "task": self.task,
                "batch_size": int(batch_size), "seed": int(seed), "train": bool(train),
                "process_index": int(process_index), "process_count": int(process_count),
                "vocab_size": int(self.tokenizer.vocab_size)}
        if train and group > 1:
            meta["length_grouping"] = int(group)
        return Loader(batches, meta, self.cfg.loader_threads, num_batches)


# ---------------------------------------------------------------- entry point

def record_texts(prepared: builders.PreparedDataset, split: str) -> list[str]:
    """See TaskData.texts."""
    return prepared.texts(split)


def _tokenizer(cfg: DataConfig, task: str, prepared: builders.PreparedDataset, data_dir: str,
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
        return tokenization.char_tokenizer(all_texts(), with_specials=task != "clm")
    if spec.kind == "word":
        if cfg.source == "synthetic":
            return tokenization.word_tokenizer([" ".join(synthetic.vocabulary())])
        return tokenization.word_tokenizer(all_texts())
    directory = os.path.join(builders.prepared_root(cfg, data_dir), "tokenizers",
                             f"{os.path.basename(os.path.dirname(prepared.path))}_{spec.kind}_{spec.vocab_size}"
                             f"_min{spec.min_frequency}_{'lower' if spec.lowercase else 'cased'}")
    return tokenization.cached_trained_tokenizer(directory, spec.kind, lambda: record_texts(prepared, "train"),
                                                 spec.vocab_size, spec.min_frequency, spec.lowercase)


def load_task_data(cfg: Any, task: str, data_dir: Optional[str] = None,
                   tokenizer_path: Optional[str] = None) -> TaskData:
    """Prepares (or reuses) the data of `cfg` for `task` under `<data_dir>/tfds/` and returns its
    TaskData. `tokenizer_path` (a Hugging Face model directory) overrides data.tokenizer."""
    cfg = as_data_config(cfg)
    check_config(cfg, task)
    if data_dir is None:
        from flaxen.data.config import default_data_dir
        data_dir = default_data_dir()
    prepared = builders.prepare(cfg, data_dir)
    tokenizer = _tokenizer(cfg, task, prepared, data_dir, tokenizer_path)
    return TaskData(dataclasses.replace(cfg), task, prepared, tokenizer)
