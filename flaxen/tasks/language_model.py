"""What masked and causal language modelling share: windows of `data.window_length` tokens,
a loss averaged over scored tokens, and evaluation by loss, perplexity and accuracy (argmax hits
on scored tokens), beside the train split's unigram entropy (the loss of a model that ignores
context). The loss and accuracy read `scored_labels(batch)`, the labels aligned with the model's
logits: the batch's labels [batch, seq], or (mlm) those at the gathered masked positions."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxen import metrics
from flaxen.tasks.base import IGNORE_INDEX, TokenTask, token_cross_entropy


class LanguageModelTask(TokenTask):
    data_kinds = ("text", "classification", "tagging")
    length_key = "window_length"

    def buckets(self, cfg: Any) -> list[int]:
        return [int(cfg.window_length)]

    def unigram_ids(self, data: Any) -> np.ndarray:
        raise NotImplementedError

    def baselines(self, data: Any) -> dict:
        """{'unigram_entropy': nats per token of the train split's ids under their own frequencies}
        ({} for data without stored records, e.g. in-memory batches)."""
        if getattr(data, "prepared", None) is None:
            return {}
        ids = self.unigram_ids(data)
        counts = np.bincount(ids)
        p = counts[counts > 0] / len(ids)
        return {"unigram_entropy": float(-(p * np.log(p)).sum())}

    def scored_labels(self, batch: dict):
        """The labels aligned with `output.logits` (traced): batch['labels'] [batch, seq]."""
        return batch["labels"]

    def loss_terms(self, output: Any, batch: dict):
        losses, mask = token_cross_entropy(output.logits, self.scored_labels(batch))
        return jnp.sum(losses), jnp.sum(mask).astype(jnp.float32)

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        out = super().eval_outputs(output, batch)
        labels = self.scored_labels(batch)
        mask = labels != IGNORE_INDEX
        out["correct"] = jnp.sum((jnp.argmax(output.logits, -1) == labels) & mask).astype(jnp.float32)
        return out

    def evaluate(self, outputs, host, data, split, task_cfg=None):
        result, _ = super().evaluate(outputs, host, data, split, task_cfg)
        weight = float(sum(np.sum(o["weight"]) for o in outputs))
        result["perplexity"] = metrics.perplexity(result["loss"])
        result["accuracy"] = float(sum(np.sum(o["correct"]) for o in outputs)) / weight if weight else 0.0
        return result, None

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        return super().metric_names(cfg, data) + ("perplexity", "accuracy")
