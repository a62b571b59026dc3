"""Masked language modelling (BERT pretraining): cross-entropy on the masked positions.

Rows: the split's sentences packed into rows of data.window_length tokens ([CLS] ... [SEP]) once,
then masked afresh each epoch with BERT's 80/10/10 rule (evaluation: a fixed mask from the seed);
labels hold the original id at chosen positions and IGNORE_INDEX elsewhere.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from flaxen.data import encoding
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import IGNORE_INDEX, epochs, register
from flaxen.tasks.language_model import LanguageModelTask


def packs(data: Any, split: str) -> list[list[int]]:
    """The split's sentences as token ids packed greedily into rows of window_length minus the
    special tokens (computed once per split)."""

    def build():
        budget = data.cfg.window_length - data.tokenizer.single_template.num_special
        if budget < 1:
            raise ConfigError(f"data.window_length={data.cfg.window_length} leaves no room beside special tokens")
        rows = encoding.pack(data.tokenizer.encode_batch(data.sentences(split)), budget)
        if not rows:
            raise DataError(f"split {split!r} has no tokens to pack into mlm rows")
        return rows

    return data.cached(("packs", split), build)


@register
class MaskedLanguageModel(LanguageModelTask):
    name = "mlm"
    head = "mlm"

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        if data.tokenizer.mask_token_id is None:
            raise ConfigError("task mlm needs a tokenizer with a mask token; this one has none")

    def rows(self, data: Any, split: str, train: bool, seed: int):
        from flaxen.data.pipeline import seed32

        rows = epochs(packs(data, split), train, seed, salt=2)
        tokenizer, probability = data.tokenizer, data.cfg.mlm_probability
        random_ids = data.cached("random_ids", lambda: np.asarray(
            sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special_ids)), np.int32))
        return rows.random_map(lambda content, rng: encoding.mlm_row(tokenizer, content, rng, probability, random_ids),
                               seed=seed32(seed, 3 if train else 4))

    def num_examples(self, data: Any, split: str) -> int:
        return len(packs(data, split))

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        return encoding.collate(rows, batch_size, buckets, pad_id,
                                token_fields={"token_type_ids": (np.int32, 0), "labels": (np.int32, IGNORE_INDEX)})

    def unigram_ids(self, data: Any) -> np.ndarray:
        return np.fromiter((i for p in data.tokenizer.encode_batch(data.sentences("train")) for i in p), np.int64)
