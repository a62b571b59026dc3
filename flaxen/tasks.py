"""Task definitions: which head a task needs, its loss, and what evaluation gathers.

Why: the train and eval steps are task-agnostic; a task contributes
- `model_inputs(task, batch)`: the keyword arguments of `model(...)`;
- `loss_terms(task, logits, batch) -> (loss_sum, weight)`: summed loss and the number of
  examples or tokens it covers (float32 scalars), so micro-batches and devices can be summed
  and divided once by the whole batch's weight (`loss_weight(task, batch)`);
- `eval_outputs(task, logits, batch)`: what leaves the device per eval batch.

Batches follow the data contract (flaxen.data): `labels` is `-100` wherever nothing is scored;
seq_cls rows also carry `valid` ([batch], 1 for real rows, 0 for padding rows).
Shapes: mlm / clm / token_cls logits [batch, seq, classes] with labels [batch, seq];
seq_cls logits [batch, num_labels] with labels [batch] (num_labels = 1: regression, float labels,
squared error).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

IGNORE_INDEX = -100
HEAD = {"mlm": "mlm", "clm": "causal_lm", "seq_cls": "seq_cls", "token_cls": "token_cls"}
TOKEN_TASKS = ("mlm", "clm", "token_cls")


def model_inputs(task: str, batch: dict) -> dict:
    inputs = {"attention_mask": batch.get("attention_mask")}
    if task != "clm" and "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def _row_mask(batch: dict) -> jnp.ndarray:
    labels = batch["labels"]
    if "valid" in batch:
        return batch["valid"].astype(jnp.float32)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return (labels != IGNORE_INDEX).astype(jnp.float32)
    return jnp.ones(labels.shape[:1], jnp.float32)


def loss_weight(task: str, batch: dict) -> jnp.ndarray:
    """How many scored tokens (token tasks) or real rows (seq_cls) the batch holds, float32."""
    if task in TOKEN_TASKS:
        return jnp.sum(batch["labels"] != IGNORE_INDEX).astype(jnp.float32)
    return jnp.sum(_row_mask(batch))


def _token_cross_entropy(logits, labels):
    mask = labels != IGNORE_INDEX
    safe = jnp.where(mask, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.where(mask, losses, 0.0), mask


def loss_terms(task: str, logits, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of per-example or per-token losses, their count), float32 scalars."""
    labels = batch["labels"]
    if task in TOKEN_TASKS:
        losses, mask = _token_cross_entropy(logits, labels)
        return jnp.sum(losses), jnp.sum(mask).astype(jnp.float32)
    rows = _row_mask(batch)
    if logits.shape[-1] == 1:
        errors = jnp.square(logits[:, 0].astype(jnp.float32) - labels.astype(jnp.float32))
        return jnp.sum(errors * rows), jnp.sum(rows)
    losses, _ = _token_cross_entropy(logits, jnp.where(rows > 0, labels, IGNORE_INDEX).astype(jnp.int32))
    return jnp.sum(losses), jnp.sum(rows)


def eval_outputs(task: str, logits, batch: dict) -> dict:
    """Per-batch device outputs of evaluation.

    Always `loss_sum`, `weight`; token LM tasks add `correct` (argmax hits on scored tokens);
    seq_cls adds `predictions` [batch] (argmax, or the regression value); token_cls adds
    `predictions` [batch, seq] (argmax per position).
    """
    loss_sum, weight = loss_terms(task, logits, batch)
    out = {"loss_sum": loss_sum, "weight": weight}
    if task in ("mlm", "clm"):
        mask = batch["labels"] != IGNORE_INDEX
        out["correct"] = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) & mask).astype(jnp.float32)
    elif task == "seq_cls":
        out["predictions"] = logits[:, 0] if logits.shape[-1] == 1 else jnp.argmax(logits, -1).astype(jnp.int32)
    else:
        out["predictions"] = jnp.argmax(logits, -1).astype(jnp.int32)
    return out
