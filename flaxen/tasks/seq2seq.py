"""Sequence to sequence (translation, summarisation, question -> answer): a source text in, a
target text out, on parallel records {"source", "target"} (data.source=parallel).

The model decides the form (a property of its family, models.heads: which of the heads
'seq2seq_lm' and 'causal_lm' the family has):

- Encoder-decoder (T5, head 'seq2seq_lm'): encoder input_ids = source + eos (data.max_length
  tokens at most), labels = target + eos (data.max_target_length), decoder_input_ids = labels
  shifted right behind the decoder start token (T5's pad token; Hugging Face's _shift_right),
  padded with pad and never scored. Source and target are padded to their own bucket lengths.
- Decoder-only (GPT-2, head 'causal_lm'): prompt -> completion, the fine-tuning people expect of a
  decoder: input_ids = source + separator + target + eos in one row of data.max_length tokens at
  most (the completion keeps data.max_target_length tokens, the source is cut to fit), labels the
  next token on the completion only (the prompt's tokens score nothing). `task.separator` is a
  text ("\n" by default); a tokenizer that encodes it to nothing (a word-level vocabulary) uses its
  sep token, else its eos.

Loss: cross-entropy over the target tokens (mean over scored tokens; pad -> -100 is ignored), with
label smoothing `task.label_smoothing` = eps as optax.smooth_labels / Hugging Face's label
smoother: targets (1 - eps) * one_hot + eps / vocab_size.

Evaluation: loss, perplexity and token accuracy (argmax hits on scored tokens) on the device; then
the sources are decoded with the run's settings (task.generation: max_new_tokens, num_beams,
length_penalty, early_stopping, do_sample, ...; inside train.py only with
task.generation.during_training) and the detokenised hypotheses are scored against the records'
raw target text on the host: sacreBLEU corpus BLEU (its signature kept beside it) and ROUGE-1/2/L
F-measure (flaxen.metrics). The hypotheses, one per record in record order, are the split's
predictions (eval.py: predictions_<split>.txt).
Rows are one record each, shuffled per epoch for training, in stored order for evaluation.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np

from flaxen import metrics
from flaxen.data import encoding
from flaxen.errors import ConfigError, DataError
from flaxen.tasks.base import IGNORE_INDEX, Task, epochs, model_family, register

# what a record of parallel data holds
SOURCE, TARGET = "source", "target"


def smoothed_cross_entropy(logits, labels, label_smoothing: float):
    """Per-position cross-entropy (float32) against (1 - eps) * one_hot + eps / classes where
    labels != IGNORE_INDEX, 0 elsewhere, and that mask. logits [..., classes], labels [...]."""
    import jax
    import jax.numpy as jnp
    import optax

    mask = labels != IGNORE_INDEX
    safe = jnp.where(mask, labels, 0)
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.where(mask, losses, 0.0), mask


def end_of_sequence_id(tokenizer: Any) -> int:
    """The token a target ends with (and generation stops at): eos, else sep."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ConfigError("sequence-to-sequence needs a tokenizer with an eos (or sep) token to end targets with; "
                          "data.tokenizer has neither")
    return int(eos)


def encoder_decoder_head(family: str) -> bool:
    """Whether models of `family` are encoder-decoders (have the 'seq2seq_lm' head)."""
    from models.heads import HEADS

    return family in HEADS["seq2seq_lm"].families


class _EncoderDecoderTask(Task):
    """What the encoder-decoder tasks (seq2seq, span_corruption) share: rows with encoder
    input_ids and labels, decoder inputs shifted right, two padded lengths, the (smoothed)
    cross-entropy over labels, token accuracy. `settings` holds the run's task config (`bind`)."""

    head = "seq2seq_lm"
    best_metric = ("loss", "min")
    special_tokens = False
    lower_is_better = ("loss", "perplexity")
    settings: Any = None

    def bind(self, cfg: Any) -> "Task":
        bound = copy.copy(self)
        bound.settings = cfg.task
        bound.family = model_family(cfg)
        return bound

    def setting(self, key: str, default: Any) -> Any:
        value = getattr(self.settings, key, None) if self.settings is not None else None
        return default if value is None else value

    @property
    def label_smoothing(self) -> float:
        return float(self.setting("label_smoothing", 0.0))

    def check_config(self, cfg: Any) -> None:
        smoothing = float(cfg.task.label_smoothing)
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing={smoothing}: expected a value in [0, 1)")

    # ------------------------------------------------------------------ data (host)

    def collate_encoder_decoder(self, rows, batch_size: int, source_buckets, target_buckets, pad_id: int) -> dict:
        """flaxen.data.encoding.collate_seq2seq: sources and targets padded to their own buckets,
        decoder_input_ids the labels shifted right behind the decoder start token (pad, as T5)."""
        return encoding.collate_seq2seq(rows, batch_size, list(source_buckets), list(target_buckets), pad_id)

    # ------------------------------------------------------------------ device (traced)

    def model_inputs(self, batch: dict) -> dict:
        if "decoder_input_ids" in batch:
            return {"attention_mask": batch.get("attention_mask"), "decoder_input_ids": batch["decoder_input_ids"],
                    "decoder_attention_mask": batch.get("decoder_attention_mask")}
        return {"attention_mask": batch.get("attention_mask")}

    def loss_weight(self, batch: dict):
        import jax.numpy as jnp

        return jnp.sum(batch["labels"] != IGNORE_INDEX).astype(jnp.float32)

    def loss_terms(self, output: Any, batch: dict):
        import jax.numpy as jnp

        losses, mask = smoothed_cross_entropy(output.logits, batch["labels"], self.label_smoothing)
        return jnp.sum(losses), jnp.sum(mask).astype(jnp.float32)

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        """loss_sum / weight (the smoothed loss training minimises), `nll_sum` (plain cross-entropy,
        for perplexity) and `correct` (argmax hits on scored tokens)."""
        import jax.numpy as jnp

        out = super().eval_outputs(output, batch)
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        nll, _ = smoothed_cross_entropy(output.logits, labels, 0.0)
        out["nll_sum"] = jnp.sum(nll)
        out["correct"] = jnp.sum((jnp.argmax(output.logits, -1) == labels) & mask).astype(jnp.float32)
        return out

    # ------------------------------------------------------------------ host (evaluation)

    def evaluate(self, outputs, host, data, split, task_cfg=None):
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        weight = float(sum(np.sum(o["weight"]) for o in outputs))
        nll = float(sum(np.sum(o["nll_sum"]) for o in outputs))
        result["perplexity"] = metrics.perplexity(nll / weight) if weight else float("nan")
        result["accuracy"] = float(sum(np.sum(o["correct"]) for o in outputs)) / weight if weight else 0.0
        return result, None

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        return super().metric_names(cfg, data) + ("perplexity", "accuracy")


@register
class SequenceToSequence(_EncoderDecoderTask):
    name = "seq2seq"
    data_kinds = ("parallel",)
    # example_rows stays False: DP-SGD's micro-batch cutting (flaxen.steps) reads one sequence
    # length per batch, and an encoder-decoder batch has two
    family: Optional[str] = None

    # ------------------------------------------------------------------ config

    @property
    def decoder_only(self) -> bool:
        return self.family is not None and not encoder_decoder_head(self.family)

    def bind(self, cfg: Any) -> "Task":
        bound = super().bind(cfg)
        bound.head = "causal_lm" if bound.decoder_only else "seq2seq_lm"
        return bound

    def check_config(self, cfg: Any) -> None:
        from flaxen.generate import check_generation
        from models.heads import HEADS

        super().check_config(cfg)
        family = model_family(cfg)
        if not encoder_decoder_head(family) and family not in HEADS["causal_lm"].families:
            raise ConfigError(f"task seq2seq needs an encoder-decoder (model.family t5) or a decoder-only model "
                              f"(model.family gpt2); model.family={family!r} is neither")
        largest = max(cfg.data.bucket_lengths)
        if encoder_decoder_head(family) and cfg.data.max_target_length > largest:
            raise ConfigError(f"data.max_target_length={cfg.data.max_target_length}: targets are padded to "
                              f"data.bucket_lengths; expected at most the largest, {largest}")
        check_generation(cfg.task.generation)

    def max_target_length(self, data_cfg: Any) -> int:
        """Target ids kept, eos included (data.max_target_length)."""
        return int(data_cfg.max_target_length)

    # ------------------------------------------------------------------ data (host)

    def check_data(self, data: Any) -> None:
        super().check_data(data)
        end_of_sequence_id(data.tokenizer)

    def separator_ids(self, tokenizer: Any) -> list[int]:
        """The ids between a decoder-only row's prompt and completion (see the module docstring)."""
        ids = tokenizer.encode(str(self.setting("separator", "\n")))
        if ids:
            return ids
        fallback = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        return [] if fallback is None else [int(fallback)]

    def row(self, tokenizer: Any, data_cfg: Any, record: dict) -> dict:
        """One record -> an unpadded row (module docstring): encoder-decoder {input_ids, labels};
        decoder-only {input_ids, labels, prompt_length}."""
        limit, target_limit = int(data_cfg.max_length), self.max_target_length(data_cfg)
        if not self.decoder_only:
            return encoding.seq2seq_row(tokenizer, record, limit, target_limit)
        eos = end_of_sequence_id(tokenizer)
        source, target = tokenizer.encode(record[SOURCE]), tokenizer.encode(record[TARGET])
        separator = self.separator_ids(tokenizer)
        completion = target[:max(min(target_limit, limit - len(separator) - 1) - 1, 0)] + [eos]
        prompt = source[:max(limit - len(separator) - len(completion), 0)] + separator or [eos]
        ids = np.asarray(prompt + completion, np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
        labels[len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]
        return {"input_ids": ids, "labels": labels, "prompt_length": np.int32(len(prompt))}

    def rows(self, data: Any, split: str, train: bool, seed: int):
        tokenizer, data_cfg = data.tokenizer, data.cfg
        return epochs(data.records(split), train, seed, salt=11).map(lambda r: self.row(tokenizer, data_cfg, r))

    def length_grouping(self, cfg: Any) -> int:
        return int(cfg.length_grouping)

    def buckets(self, cfg: Any) -> list[int]:
        return list(cfg.bucket_lengths)

    def collate(self, rows, batch_size, buckets, pad_id) -> dict:
        if self.decoder_only:
            return encoding.collate(rows, batch_size, buckets, pad_id, token_fields={"labels": (np.int32, IGNORE_INDEX)},
                                    row_fields={"prompt_length": (np.int32, 1)})
        return self.collate_encoder_decoder(rows, batch_size, buckets, buckets, pad_id)

    def example_batch(self, cfg: Any, rows: int) -> dict:
        length = int(cfg.data.max_length)
        token = ((rows, length), np.int32)
        if self.decoder_only:
            return {"input_ids": token, "attention_mask": token, "labels": token, "prompt_length": ((rows,), np.int32),
                    "valid": ((rows,), np.int32)}
        target = ((rows, self.max_target_length(cfg.data)), np.int32)
        return {"input_ids": token, "attention_mask": token, "labels": target, "decoder_input_ids": target,
                "decoder_attention_mask": target, "valid": ((rows,), np.int32)}

    # ------------------------------------------------------------------ host (evaluation)

    def generation_settings(self, task_cfg: Any = None):
        """The run's decoding settings (task.generation) as a flaxen.generate.GenerationConfig."""
        from omegaconf import OmegaConf

        from flaxen.generate import GenerationConfig

        node = getattr(task_cfg if task_cfg is not None else self.settings, "generation", None)
        if node is None:
            return GenerationConfig()
        values = OmegaConf.to_container(node) if OmegaConf.is_config(node) else dict(vars(node))
        return GenerationConfig(**values)

    def eval_generator(self, model: Any, data: Any, task_cfg: Any = None, training: bool = False):
        """Host batch -> {"generated": object array [batch] of decoded hypotheses} with the run's
        decoding settings; None inside train.py when task.generation.during_training is false."""
        from flaxen.generate import generate_ids

        settings = self.generation_settings(task_cfg)
        if training and not settings.during_training:
            return None
        tokenizer, data_cfg = data.tokenizer, data.cfg
        eos = end_of_sequence_id(tokenizer)
        calls = [0]

        def generate(batch: dict) -> dict:
            ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
            real = np.flatnonzero(np.asarray(batch["valid"])) if "valid" in batch else np.arange(len(ids))
            if self.decoder_only:
                lengths = np.asarray(batch["prompt_length"])
            else:
                lengths = mask.sum(axis=1)
            prompts = [ids[i, :int(lengths[i])].tolist() for i in real]
            new = generate_ids(model, prompts, settings, batch_size=len(ids), buckets=self.buckets(data_cfg),
                               eos_id=eos, pad_id=tokenizer.pad_token_id, encoder_decoder=not self.decoder_only,
                               max_positions=getattr(model.config, "max_position_embeddings", None), call=calls[0])
            calls[0] += 1
            texts = np.full(len(ids), "", dtype=object)
            texts[real] = [tokenizer.decode(t) for t in new]
            return {"generated": texts}

        return generate

    def evaluate(self, outputs, host, data, split, task_cfg=None):
        """Loss, perplexity, accuracy; with generated text also bleu and bleu_signature (sacreBLEU),
        rouge1 / rouge2 / rougeL (percent); predictions: the hypotheses in record order."""
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        if not host or "generated" not in host[0]:
            return result, None
        hypotheses = [str(text) for h in host for text in h["generated"][h["valid"]]]
        references = [record[TARGET] for record in data.records(split)[:len(hypotheses)]]
        result.update(metrics.bleu(hypotheses, references))
        result.update(metrics.rouge(hypotheses, references))
        return result, hypotheses

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        names = super().metric_names(cfg, data)
        if cfg.task.generation.during_training:
            names += ("bleu",) + metrics.ROUGE_TYPES
        return names

    # ------------------------------------------------------------------ generation (generate.py)

    def can_generate(self, spec: Any) -> bool:
        return True

    def generation_rows(self, records, run, settings, truncate):
        """Each text as training encodes a source: + eos (encoder-decoder), + separator
        (decoder-only), within data.max_length."""
        tokenizer, limit = run.tokenizer, int(run.cfg.data.max_length)
        tail = self.separator_ids(tokenizer) if self.decoder_only else [end_of_sequence_id(tokenizer)]
        rows = []
        for record in records:
            ids = tokenizer.encode(record["text"])
            if not ids:
                raise DataError(f"{record['where']}: the text encodes to no tokens")
            if len(ids) + len(tail) > limit:
                if not truncate:
                    raise DataError(f"{record['where']}: {len(ids) + len(tail)} tokens, more than the run's "
                                    f"data.max_length={limit}; shorten the input or pass truncate=true to cut it "
                                    "as training did")
                ids = ids[:limit - len(tail)]
            rows.append(ids + tail)
        return rows

    def generate_batch(self, model, tokenizer, cfg, rows, batch_size, settings, call=0):
        from flaxen.generate import generate_ids

        new = generate_ids(model, rows, settings, batch_size=batch_size, buckets=self.buckets(cfg.data),
                           eos_id=end_of_sequence_id(tokenizer), pad_id=tokenizer.pad_token_id,
                           encoder_decoder=not self.decoder_only,
                           max_positions=getattr(model.config, "max_position_embeddings", None), call=call)
        return [tokenizer.decode(ids) for ids in new]
