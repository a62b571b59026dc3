"""Masked language modelling (BERT pretraining): cross-entropy on the masked positions.

Rows: the split's sentences packed into rows of data.window_length tokens ([CLS] ... [SEP]) once,
then masked afresh each epoch with BERT's 80/10/10 rule (evaluation: a fixed mask from the seed);
labels hold the original id at chosen positions and IGNORE_INDEX elsewhere.

The MLM head (transform, LayerNorm, vocabulary projection) runs at the masked positions only, as
BERT's own pretraining code does (max_predictions_per_seq): a row holds at most m =
task.max_predictions_per_row masked tokens, the steps gather the positions of each row's labelled
tokens into [batch, m] (static shape; unused slots point at position 0 and are scored with weight
0) and the model applies its head to those hidden states alone (models.Model's
`masked_positions`), so the loss, its gradients and the accuracy are the full computation's while
the head does m / window_length of the work. The cap is kept by the masking, not hoped for: a row
that draws more than m tokens keeps a random subset of m of them drawn from the row's own seed
(encoding.mlm_row), the others unmasked, so rows are reproducible and no scored token is ever
dropped by the gather. Unset (null), m is the smallest count a row of window_length tokens
exceeds with probability below 1e-6 under data.mlm_probability (41 for 15 % of 128, 118 for 512),
so the cap practically never changes the data; BERT's 20 for 128 is `task.max_predictions_per_row=20`
(about a third of rows capped at 15 % masking). 0: no cap and the head at every position (the full
projection). Prediction (predict.py) and export always run the head at every position.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Any, Optional

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


# a row of window_length tokens holds more masked tokens than the derived cap with at most this probability
CAP_EXCEEDED_PROBABILITY = 1e-6


@functools.lru_cache(maxsize=None)
def default_max_predictions(window_length: int, probability: float) -> int:
    """The smallest m with P(X > m) <= CAP_EXCEEDED_PROBABILITY for X ~ Binomial(window_length,
    probability): the masked tokens of a row when every one of its tokens were maskable (special
    tokens never are, so the real tail is lighter). At least 1."""
    n, p = int(window_length), float(probability)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
               + (n - k) * math.log1p(-p) for k in range(n + 1)]
    tail = 0.0
    for k in range(n, 0, -1):
        tail += math.exp(log_pmf[k])  # P(X >= k)
        if tail > CAP_EXCEEDED_PROBABILITY:
            return k
    return 1


def masked_positions(labels, size: int):
    """(positions [batch, size] int32, used [batch, size] bool): the positions of each row's scored
    labels (!= IGNORE_INDEX) in order, then position 0 in the unused slots (traced)."""
    import jax
    import jax.numpy as jnp

    scored = labels != IGNORE_INDEX
    positions = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(scored)
    used = jnp.arange(size)[None, :] < jnp.sum(scored, axis=1, keepdims=True)
    return positions.astype(jnp.int32), used


@register
class MaskedLanguageModel(LanguageModelTask):
    name = "mlm"
    head = "mlm"
    # task.max_predictions_per_row as a bound run uses it (`bind`): positive, or 0 for no cap and the
    # head at every position; None: not bound to a run (the steps then run the head at every
    # position, and rows are capped at default_max_predictions of the data's settings)
    max_predictions: Optional[int] = None

    # ------------------------------------------------------------------ config

    def bind(self, cfg: Any) -> "MaskedLanguageModel":
        bound = copy.copy(self)
        value = getattr(cfg.task, "max_predictions_per_row", None)
        bound.max_predictions = (default_max_predictions(int(cfg.data.window_length), float(cfg.data.mlm_probability))
                                 if value is None else int(value))
        return bound

    def check_config(self, cfg: Any) -> None:
        super().check_config(cfg)
        value = getattr(cfg.task, "max_predictions_per_row", None)
        length = int(cfg.data.window_length)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= length):
            raise ConfigError(f"task.max_predictions_per_row={value!r}: expected null (derived from "
                              f"data.mlm_probability), 0 (no cap: the head at every position) or a positive "
                              f"integer at most data.window_length={length}")

    def row_cap(self, data_cfg: Any) -> Optional[int]:
        """The most masked tokens a row of `data_cfg` holds (None: no cap)."""
        if self.max_predictions is None:
            return default_max_predictions(int(data_cfg.window_length), float(data_cfg.mlm_probability))
        return self.max_predictions or None

    def gather_size(self, length: int) -> Optional[int]:
        """The static number of positions per row the head runs at in the steps, for rows of
        `length` tokens (None: every position)."""
        return min(self.max_predictions, length) if self.max_predictions else None

    # ------------------------------------------------------------------ data (host)

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        if data.tokenizer.mask_token_id is None:
            raise ConfigError("task mlm needs a tokenizer with a mask token; this one has none")

    def rows(self, data: Any, split: str, train: bool, seed: int):
        from flaxen.data.pipeline import seed32

        rows = epochs(packs(data, split), train, seed, salt=2)
        tokenizer, probability, cap = data.tokenizer, data.cfg.mlm_probability, self.row_cap(data.cfg)
        random_ids = data.cached("random_ids", lambda: np.asarray(
            sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special_ids)), np.int32))
        return rows.random_map(
            lambda content, rng: encoding.mlm_row(tokenizer, content, rng, probability, random_ids, cap),
            seed=seed32(seed, 3 if train else 4))

    def num_examples(self, data: Any, split: str) -> int:
        return len(packs(data, split))

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        """The padded batch; DataError when a row holds more masked tokens than the bound run's
        cap (the steps score at most that many per row)."""
        batch = encoding.collate(rows, batch_size, buckets, pad_id,
                                 token_fields={"token_type_ids": (np.int32, 0), "labels": (np.int32, IGNORE_INDEX)})
        if self.max_predictions:
            counts = np.sum(batch["labels"] != IGNORE_INDEX, axis=1)
            if counts.max(initial=0) > self.max_predictions:
                raise DataError(f"an mlm row holds {int(counts.max())} masked tokens, more than "
                                f"task.max_predictions_per_row={self.max_predictions}")
        return batch

    # ------------------------------------------------------------------ device (traced)

    def model_inputs(self, batch: dict) -> dict:
        """The model's inputs, with `masked_positions` [batch, m] when the run gathers (batches
        with labels: training and evaluation; prediction batches run the head everywhere)."""
        inputs = super().model_inputs(batch)
        size = self.gather_size(batch["input_ids"].shape[1]) if "labels" in batch else None
        if size is not None:
            inputs["masked_positions"] = masked_positions(batch["labels"], size)[0]
        return inputs

    def scored_labels(self, batch: dict):
        """[batch, m] labels at the gathered positions (IGNORE_INDEX in unused slots), or the
        batch's labels when the head runs at every position."""
        import jax.numpy as jnp

        labels = batch["labels"]
        size = self.gather_size(labels.shape[1])
        if size is None:
            return labels
        positions, used = masked_positions(labels, size)
        return jnp.where(used, jnp.take_along_axis(labels, positions, axis=1), IGNORE_INDEX)

    def loss_weight(self, batch: dict):
        """The scored tokens: the masked tokens, at most m per row when gathering."""
        import jax.numpy as jnp

        return jnp.sum(self.scored_labels(batch) != IGNORE_INDEX).astype(jnp.float32)

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
