"""Causal language modelling (GPT pretraining): next-token cross-entropy.

Rows: windows of data.window_length tokens of the split's token stream (text data verbatim;
sentences of labelled data each followed by eos, or sep); labels are the next token of each
position. Training draws uniformly random window starts (as nanoGPT); evaluation takes
consecutive windows, scoring every next-token target once. No token types reach the model.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from flaxen.data import encoding
from flaxen.errors import DataError
from flaxen.tasks.base import IGNORE_INDEX, register
from flaxen.tasks.language_model import LanguageModelTask

ENDLESS = 1 << 62


def token_stream(data: Any, split: str) -> np.ndarray:
    """The split as one int32 id sequence (computed once per split)."""

    def build():
        tokenizer = data.tokenizer
        pieces = tokenizer.encode_batch(data.texts(split))
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if data.prepared.schema != "text" and separator is not None:
            pieces = [p + [separator] for p in pieces]
        stream = np.fromiter((i for p in pieces for i in p), np.int32)
        if len(stream) < 2:
            raise DataError(f"split {split!r} has {len(stream)} tokens; clm needs at least 2")
        return stream

    return data.cached(("stream", split), build)


@register
class CausalLanguageModel(LanguageModelTask):
    name = "clm"
    head = "causal_lm"
    special_tokens = False

    def rows(self, data: Any, split: str, train: bool, seed: int):
        import grain

        from flaxen.data.pipeline import seed32

        stream, length = token_stream(data, split), data.cfg.window_length
        if train:
            high = len(stream) - length
            if high < 1:
                raise DataError(f"split {split!r} has {len(stream)} tokens, fewer than data.window_length+1="
                                f"{length + 1}")
            return grain.MapDataset.range(ENDLESS).random_map(
                lambda _, rng: encoding.clm_row(stream, int(rng.integers(0, high)), length), seed=seed32(seed, 1))
        return grain.MapDataset.range(self.num_examples(data, split)).map(
            lambda index: encoding.clm_row(stream, index * length, length))

    def num_examples(self, data: Any, split: str) -> int:
        return math.ceil((len(token_stream(data, split)) - 1) / data.cfg.window_length)

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        return encoding.collate(rows, batch_size, buckets, pad_id,
                                token_fields={"labels": (np.int32, IGNORE_INDEX)})

    def example_batch(self, cfg: Any, rows: int) -> dict:
        shapes = super().example_batch(cfg, rows)
        del shapes["token_type_ids"]
        return shapes

    def model_inputs(self, batch: dict) -> dict:
        return {"attention_mask": batch.get("attention_mask")}

    def unigram_ids(self, data: Any) -> np.ndarray:
        return token_stream(data, "train")
