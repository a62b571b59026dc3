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

    # ------------------------------------------------------------------ prediction (predict.py)

    hf_pipeline = "fill-mask"
    # predictions per mask token when predict.py's top_k is unset
    default_top_k = 5

    def predict_records(self, path, cfg, options):
        from flaxen import predict

        predict.input_format(path, options, self.name, ("lines",))
        return predict.read_lines(path, "one text per line, with the mask token where a token is to be predicted")

    def predict_rows(self, records, run, options):
        """[CLS] text [SEP] with the mask token's id wherever the text holds the mask token's
        string (the pieces between are encoded on their own); `mask_count` counts them before
        truncation. At most data.window_length tokens, the length the model was trained on."""
        from flaxen import predict

        tokenizer = run.tokenizer
        mask = tokenizer.special_tokens.get("mask")
        if mask is None or tokenizer.mask_token_id is None:
            raise ConfigError(f"{run.run_dir}: the run's tokenizer has no mask token to predict")
        limit = run.cfg.data.window_length
        budget = limit - tokenizer.single_template.num_special
        rows = []
        for record in records:
            pieces = record["text"].split(mask)
            if len(pieces) == 1:
                raise DataError(f"{record['where']}: no {mask} in the text; write {mask} where a token is to be "
                                "predicted")
            ids = []
            for number, piece in enumerate(pieces):
                if number:
                    ids.append(tokenizer.mask_token_id)
                ids.extend(tokenizer.encode(piece))
            if len(ids) > budget and not options.truncate:
                raise predict.too_long(record["where"], len(ids) + limit - budget, limit, "data.window_length")
            row = encoding.single_inputs(tokenizer, ids[:budget])
            row["mask_count"] = len(pieces) - 1
            rows.append(row)
        return rows

    def prediction_outputs(self, output, batch, options):
        import jax
        import jax.numpy as jnp

        probabilities = jax.nn.softmax(output.logits.astype(jnp.float32), axis=-1)
        k = min(options.top_k or self.default_top_k, probabilities.shape[-1])
        top, ids = jax.lax.top_k(probabilities, k)
        return {"top_probabilities": top, "top_ids": ids.astype(jnp.int32)}

    def format_predictions(self, records, rows, outputs, run, options):
        """{"text", "predictions": [[token, p], ...] per mask token, most likely first}; a mask cut
        off by truncate=true gets an empty list."""
        tokenizer = run.tokenizer
        out = []
        for record, row, output in zip(records, rows, outputs):
            positions = np.flatnonzero(np.asarray(row["input_ids"]) == tokenizer.mask_token_id)
            predictions = [[[tokenizer.id_to_token(int(i)), float(p)]
                            for i, p in zip(output["top_ids"][position], output["top_probabilities"][position])]
                           for position in positions]
            out.append({"text": record["text"], "predictions": predictions + [[]] * (row["mask_count"] - len(positions))})
        return out
