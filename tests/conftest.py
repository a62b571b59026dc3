"""Shared test fixtures: small in-memory datasets with flaxen.data's TaskData surface.

`jax_compilation_cache` (session, autouse) shares compiled XLA programs between tests.
`InMemoryTaskData(task, ...)` serves deterministic numpy batches shaped per the data contract
(input_ids / attention_mask / token_type_ids / labels, `valid` and `word_count` where the task
has them) through `loader(split, batch_size, *, seed, train)`, with exact `get_state` /
`set_state`, so the training system can be tested without building a real dataset.
"""
from __future__ import annotations

import numpy as np
import pytest

IGNORE = -100


def _tokenizer(vocab_size: int):
    """A real flaxen word-level Tokenizer of `vocab_size` ids: [PAD]=0, [MASK]=1, then w2, w3, ..."""
    import tokenizers

    from flaxen.data.tokenizers import Tokenizer

    vocab = {"[PAD]": 0, "[MASK]": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["[PAD]", "[MASK]"])
    return Tokenizer(backend, {"pad": "[PAD]", "mask": "[MASK]"}, kind="word")


class _Loader:
    """Train: endless epochs, reshuffled per epoch from (seed, epoch). Eval: one padded pass."""

    def __init__(self, data: dict, batch_size: int, seed: int, train: bool):
        self.data, self.batch_size, self.seed, self.train = data, batch_size, seed, train
        self.n = len(data["input_ids"])
        self.epoch, self.position = 0, 0

    def _order(self):
        if not self.train:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self):
        if self.train and self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        if not self.train and self.position >= self.n:
            raise StopIteration
        rows = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        batch = {k: v[rows] for k, v in self.data.items()}
        valid = np.ones(len(rows), np.int32)
        short = self.batch_size - len(rows)
        if short:
            for key, value in batch.items():
                fill = IGNORE if key == "labels" else 0
                batch[key] = np.concatenate([value, np.full((short,) + value.shape[1:], fill, value.dtype)])
            valid = np.concatenate([valid, np.zeros(short, np.int32)])
        batch["valid"] = valid
        return batch

    def get_state(self):
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class InMemoryTaskData:
    """A learnable toy task: seq_cls label = first token is even; token_cls tag = token parity;
    mlm masks 15 % of positions; clm predicts the next token of a repeating pattern."""

    def __init__(self, task: str, *, vocab_size: int = 50, seq_len: int = 16, num_train: int = 64,
                 num_validation: int = 20, seed: int = 0):
        self.task = task
        self.tokenizer = _tokenizer(vocab_size)
        self.tag_scheme = "IOB2" if task == "token_cls" else None
        self.label_names = {"seq_cls": ["odd", "even"], "token_cls": ["O", "B-EVEN", "I-EVEN"]}.get(task)
        rng = np.random.default_rng(seed)
        self.splits = {"train": self._make(rng, num_train, seq_len), "validation": self._make(rng, num_validation, seq_len)}

    def _make(self, rng, n, t):
        vocab = self.tokenizer.vocab_size
        ids = rng.integers(2, vocab, (n, t)).astype(np.int32)
        mask = np.ones((n, t), np.int32)
        lengths = rng.integers(t // 2, t + 1, n)
        mask[np.arange(t)[None, :] >= lengths[:, None]] = 0
        ids = np.where(mask == 1, ids, 0).astype(np.int32)
        data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        if self.task == "seq_cls":
            data["labels"] = (ids[:, 0] % 2 == 0).astype(np.int32)
        elif self.task == "token_cls":
            even = ids % 2 == 0
            prev_even = np.concatenate([np.zeros((n, 1), bool), even[:, :-1]], axis=1)
            tags = np.where(even, np.where(prev_even, 2, 1), 0)
            data["labels"] = np.where(mask == 1, tags, IGNORE).astype(np.int32)
            data["word_count"] = lengths.astype(np.int32)
        elif self.task == "mlm":
            chosen = (rng.random((n, t)) < 0.15) & (mask == 1)
            data["labels"] = np.where(chosen, ids, IGNORE).astype(np.int32)
            data["input_ids"] = np.where(chosen, 1, ids).astype(np.int32)
        else:
            pattern = (np.arange(t)[None, :] + rng.integers(0, vocab - 2, (n, 1))) % (vocab - 2) + 2
            data = {"input_ids": pattern.astype(np.int32), "attention_mask": np.ones((n, t), np.int32)}
            data["labels"] = np.concatenate([pattern[:, 1:], np.full((n, 1), IGNORE)], axis=1).astype(np.int32)
        return data

    def num_examples(self, split):
        return len(self.splits[split]["input_ids"])

    def loader(self, split, batch_size, *, seed=0, train=False, process_index=0, process_count=1):
        return _Loader(self.splits[split], batch_size, seed, train)

    def records(self, split):
        """token_cls: the stored sentences as the task reads them (one tag id per word)."""
        return [{"tags": row[row != IGNORE].tolist()} for row in self.splits[split]["labels"]]


@pytest.fixture(scope="session")
def in_memory_task_data():
    """A factory: in_memory_task_data(task, **kwargs) -> InMemoryTaskData (cached per arguments)."""
    cache = {}

    def make(task, **kwargs):
        key = (task, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = InMemoryTaskData(task, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache per test session: a program compiled by one test
    (a train step, an init) is loaded, not recompiled, by the next test that builds it again.
    XDG_CACHE_HOME points at the session's directory, so the runs tests start (whose
    compilation_cache_dir defaults to $XDG_CACHE_HOME/flaxen/jax, flaxen.compilation), in this
    process or in subprocesses, share that cache and never write to the user's."""
    import os

    import jax

    cache_home = tmp_path_factory.mktemp("cache_home")
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    jax.config.update("jax_compilation_cache_dir", str(cache_home / "flaxen" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
