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
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import IGNORE_INDEX, register
from flaxen.tasks.language_model import LanguageModelTask

ENDLESS = 1 << 62


def end_of_text_id(tokenizer: Any):
    """The token the training stream puts between texts (and generation stops at): eos, else sep."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def token_stream(data: Any, split: str) -> np.ndarray:
    """The split as one int32 id sequence (computed once per split)."""

    def build():
        tokenizer = data.tokenizer
        pieces = tokenizer.encode_batch(data.texts(split))
        separator = end_of_text_id(tokenizer)
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

    # ------------------------------------------------------------------ prediction (predict.py)

    hf_pipeline = "text-generation"

    @staticmethod
    def _prompt_room(run: Any, options: Any) -> int:
        limit = run.model.config.max_position_embeddings
        room = limit - options.max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={options.max_new_tokens} leaves no room for a prompt within the "
                              f"model's max_position_embeddings={limit}")
        return room

    def predict_records(self, path, cfg, options):
        from flaxen import predict

        predict.input_format(path, options, self.name, ("lines",))
        return predict.read_lines(path, "one prompt per line")

    def predict_rows(self, records, run, options):
        """The prompt's ids, as the training stream holds text (no special tokens). A prompt plus
        max_new_tokens must fit the model's positions; truncate=true keeps the prompt's end."""
        room = self._prompt_room(run, options)
        limit = run.model.config.max_position_embeddings
        rows = []
        for record in records:
            ids = run.tokenizer.encode(record["text"])
            if not ids:
                raise DataError(f"{record['where']}: the prompt encodes to no tokens")
            if len(ids) > room:
                if not options.truncate:
                    raise DataError(f"{record['where']}: {len(ids)} tokens and max_new_tokens={options.max_new_tokens} "
                                    f"are more than the model's max_position_embeddings={limit}; shorten the prompt, "
                                    f"lower max_new_tokens or pass truncate=true to keep its last {room} tokens")
                ids = ids[-room:]
            rows.append({"input_ids": np.asarray(ids, np.int32)})
        return rows

    def prediction_buckets(self, run, options, longest):
        """Prompt lengths 8, 16, 32, ... up to the room max_new_tokens leaves (one compiled
        generation loop each)."""
        room = self._prompt_room(run, options)
        buckets, length = [], 8
        while length < room:
            buckets.append(length)
            length *= 2
        return buckets + [room]

    def prediction_collate(self, rows, batch_size, buckets, pad_id):
        """Prompts padded on the left (what models.generate continues); a padding row is one pad
        token, generated from and dropped."""
        real = [row for row in rows if row is not encoding.PADDING]
        longest = max(len(row["input_ids"]) for row in real)
        length = next(b for b in buckets if b >= longest)
        input_ids = np.full((batch_size, length), pad_id, np.int32)
        attention_mask = np.zeros((batch_size, length), np.int32)
        attention_mask[:, -1] = 1
        for index, row in enumerate(rows):
            if row is encoding.PADDING:
                continue
            n = len(row["input_ids"])
            input_ids[index, length - n:] = row["input_ids"]
            attention_mask[index, length - n:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def prediction_step(self, run, options):
        """models.generate: greedy, or sampled (do_sample, temperature, top_k, top_p) from `seed`;
        stops at the end-of-text token the training stream puts between texts (eos, else sep)."""
        import jax

        import models

        tokenizer = run.tokenizer
        eos = end_of_text_id(tokenizer)
        key = jax.random.key(options.seed)
        calls = [0]

        def step(batch):
            tokens = models.generate(run.model, batch["input_ids"], batch["attention_mask"],
                                     max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                                     temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                                     eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                     rng=jax.random.fold_in(key, calls[0]))
            calls[0] += 1
            return {"new_tokens": np.asarray(tokens)[:, batch["input_ids"].shape[1]:]}

        return step

    def format_predictions(self, records, rows, outputs, run, options):
        """{"prompt", "completion"}: the new tokens up to the end-of-text token, decoded."""
        tokenizer = run.tokenizer
        eos = end_of_text_id(tokenizer)
        out = []
        for record, output in zip(records, outputs):
            ids = [int(i) for i in output["new_tokens"]]
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
            out.append({"prompt": record["text"], "completion": tokenizer.decode(ids)})
        return out

    # ------------------------------------------------------------------ generation (generate.py)

    def can_generate(self, spec) -> bool:
        return True

    def generation_rows(self, records, run, settings, truncate):
        """The prompts as predict_rows encodes them (the same limits and truncation)."""
        from types import SimpleNamespace

        options = SimpleNamespace(max_new_tokens=settings.max_new_tokens, truncate=truncate)
        return [row["input_ids"].tolist() for row in self.predict_rows(records, run, options)]

    def generate_batch(self, model, tokenizer, cfg, rows, batch_size, settings, call=0):
        """Continuations (models.generate with `settings`) up to the end-of-text token, decoded;
        prompts padded on the left to 8, 16, 32, ... tokens."""
        from flaxen.generate import generate_ids

        limit = model.config.max_position_embeddings
        buckets = [8 << k for k in range(16) if (8 << k) < limit - settings.max_new_tokens] + \
            [limit - settings.max_new_tokens]
        new = generate_ids(model, rows, settings, batch_size=batch_size, buckets=buckets,
                           eos_id=end_of_text_id(tokenizer), pad_id=tokenizer.pad_token_id, encoder_decoder=False,
                           max_positions=limit, call=call)
        return [tokenizer.decode(ids) for ids in new]
