"""Span corruption (T5's pretraining objective) for an encoder-decoder, on any text data.

Rows: the split's sentences (text data: its non-empty lines; parallel data: source and target
texts; labelled data: its texts) are tokenized, concatenated and cut into chunks of tokens_length
ids, where (tokens_length, targets_length) = random_spans_helper(data.max_length, noise_density,
mean_noise_span_length) (flaxen.data.span_corruption): the longest chunk whose corrupted input
fits data.max_length ids. Each chunk is corrupted by flaxen.data.span_corruption.span_corruption
(data.noise_density of its tokens in spans of data.mean_noise_span_length on average, each span
replaced by the next sentinel <extra_id_i>; targets: sentinel i then span i; eos ends both).
Batches are padded to exactly data.max_length source and targets_length target ids: one shape,
one compiled step. Training draws a fresh mask for every chunk each epoch (grain random_map,
reproducible from the seed); evaluation's masks are fixed per chunk (seed, chunk index).

Loss, decoder inputs and metrics as seq2seq's encoder-decoder form (flaxen.tasks.seq2seq):
(smoothed, task.label_smoothing) cross-entropy over target tokens; loss, perplexity, accuracy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import register
from flaxen.tasks.seq2seq import _EncoderDecoderTask, encoder_decoder_head, end_of_sequence_id

EVAL_SEED = 0x5C0E


def sentinel_ids(tokenizer: Any) -> list[int]:
    """<extra_id_0>, <extra_id_1>, ... of the tokenizer, in that order; ConfigError when it has none."""
    ids = list(getattr(tokenizer, "sentinel_ids", None) or [])
    if not ids:
        raise ConfigError("task span_corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the "
                          "vocabulary (data.tokenizer.sentinels with a trained tokenizer, or a T5 tokenizer)")
    return [int(i) for i in ids]


@register
class SpanCorruption(_EncoderDecoderTask):
    name = "span_corruption"
    data_kinds = ("text", "parallel", "classification", "tagging")
    _target_length = None

    @staticmethod
    def settings_of(data_cfg: Any) -> tuple[float, float]:
        """(noise_density, mean_noise_span_length) of the data config."""
        return float(data_cfg.noise_density), float(data_cfg.mean_noise_span_length)

    def check_config(self, cfg: Any) -> None:
        from flaxen.data.span_corruption import random_spans_helper
        from flaxen.tasks.base import model_family

        super().check_config(cfg)
        if not encoder_decoder_head(model_family(cfg)):
            raise ConfigError(f"task span_corruption trains an encoder-decoder (model.family t5); model.family="
                              f"{model_family(cfg)!r}")
        density, span = self.settings_of(cfg.data)
        try:
            random_spans_helper(int(cfg.data.max_length), density, span)
        except ConfigError as error:
            raise ConfigError(f"data.max_length={cfg.data.max_length}: {error}") from None

    def lengths(self, data_cfg: Any) -> tuple[int, int]:
        """(tokens per chunk, target length) for inputs of data.max_length ids."""
        from flaxen.data.span_corruption import random_spans_helper

        density, span = self.settings_of(data_cfg)
        return random_spans_helper(int(data_cfg.max_length), density, span)

    # ------------------------------------------------------------------ data (host)

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        end_of_sequence_id(data.tokenizer)
        sentinel_ids(data.tokenizer)

    def chunks(self, data: Any, split: str) -> list[np.ndarray]:
        """The split's token ids cut into chunks of tokens_length (computed once per split)."""
        from flaxen.data.span_corruption import chunks

        def build():
            pieces = data.tokenizer.encode_batch(data.sentences(split))
            cut = chunks(pieces, self.lengths(data.cfg)[0])
            if not cut:
                raise DataError(f"split {split!r} holds no text to corrupt")
            return cut

        return data.cached(("span_corruption_chunks", split) + self.lengths(data.cfg), build)

    def corrupt(self, data: Any, chunk: np.ndarray, rng) -> dict:
        """One chunk -> {input_ids, labels} (span_corruption's inputs and targets)."""
        from flaxen.data.span_corruption import span_corruption

        density, span = self.settings_of(data.cfg)
        inputs, targets = span_corruption(chunk, rng, sentinel_ids=sentinel_ids(data.tokenizer),
                                          eos_id=end_of_sequence_id(data.tokenizer), noise_density=density,
                                          mean_noise_span_length=span)
        return {"input_ids": inputs, "labels": targets}

    def rows(self, data: Any, split: str, train: bool, seed: int):
        import grain

        from flaxen.data.pipeline import seed32
        from flaxen.tasks.base import epochs

        chunks = self.chunks(data, split)
        if train:
            return epochs(list(range(len(chunks))), True, seed, salt=12).random_map(
                lambda index, rng: self.corrupt(data, chunks[index], rng), seed=seed32(seed, 13))
        return grain.MapDataset.range(len(chunks)).map(
            lambda index: self.corrupt(data, chunks[index], np.random.default_rng([EVAL_SEED, int(index)])))

    def num_examples(self, data: Any, split: str) -> int:
        return len(self.chunks(data, split))

    def buckets(self, cfg: Any) -> list[int]:
        return [int(cfg.max_length)]

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        """Sources padded to data.max_length, targets to the run's target length (unbound: the
        longest target of the batch)."""
        targets = buckets if self._target_length is None else [int(self._target_length)]
        return self.collate_encoder_decoder(rows, batch_size, buckets, targets, pad_id)

    def bind(self, cfg: Any):
        bound = super().bind(cfg)
        bound._target_length = bound.lengths(cfg.data)[1]
        return bound

    def example_batch(self, cfg: Any, rows: int) -> dict:
        source = ((rows, int(cfg.data.max_length)), np.int32)
        target = ((rows, self.lengths(cfg.data)[1]), np.int32)
        return {"input_ids": source, "attention_mask": source, "labels": target, "decoder_input_ids": target,
                "decoder_attention_mask": target, "valid": ((rows,), np.int32)}
