"""`Task`: everything that differs between tasks, in one object, and the registry of tasks by name.

Why: the steps, the loop, evaluation, the data pipeline and the config checks call a Task's
methods and never test a task's name, so a new task is one file under flaxen/tasks/ (a subclass
registered with `@register`), a head in models/heads.py if it needs a new one, a configs/task/
YAML and its tests. See docs/adding_a_task.md.

A Task is stateless (its settings come from the config each call receives), so one instance per
name serves every run. Its methods fall in three groups:

Data (host, numpy; `data` is a flaxen.data TaskData: `data.cfg` the DataConfig, `data.tokenizer`,
`data.records(split)`, `data.cached(key, fn)`):
    check_data(data)                    ConfigError when the prepared data cannot serve this task
    label_names(prepared)               the label set the model's head predicts, or None
    rows(data, split, train, seed)      grain.MapDataset of unpadded rows (train: endless)
    num_examples(data, split)           rows of one ordered pass over `split`
    buckets(cfg) / length_grouping(cfg) padded lengths and length-grouped batching
    collate(rows, batch_size, buckets, pad_id)  rows -> the padded batch the steps take
    example_batch(cfg, rows)            the shapes of one batch (ahead-of-time compilation, benchmarks)

Device (traced inside the jitted steps; `output` is the models.ModelOutput):
    model_inputs(batch), loss_weight(batch), loss_terms(output, batch), eval_outputs(output, batch)

Host (evaluation, after the device outputs are gathered):
    host_fields(batch)                  what of each host batch evaluation keeps
    evaluate(outputs, host, data, split, task_cfg) -> (metrics dict, predictions or None)
    metric_names(cfg, data)             the scalar metrics `evaluate` returns (checked at start-up)

Batches follow the data contract: `labels` is IGNORE_INDEX wherever nothing is scored and `valid`
([batch], 1 for real rows) marks padding rows of an eval split's last batch.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from flaxen.errors import ConfigError

from flaxen.data.encoding import IGNORE_INDEX  # noqa: F401  (the tasks' label for "not scored")

_REGISTRY: dict[str, "Task"] = {}


def register(cls):
    """Class decorator: registers one instance of a Task subclass under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: Any) -> "Task":
    """The registered Task called `name` (a Task passes through); ConfigError naming the choices."""
    if isinstance(name, Task):
        return name
    if name not in _REGISTRY:
        raise ConfigError(f"task.name={name!r}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


class Task:
    """The base: defaults shared by most tasks. Subclasses set the class attributes below."""

    name: str = ""
    # the models.heads entry the model is built with
    head: Optional[str] = None
    # prepared-data schemas this task reads (flaxen.data.builders: classification, tagging, text, qa)
    data_kinds: tuple[str, ...] = ()
    # the default metric for the best checkpoint and early stopping, and its mode
    best_metric: tuple[str, str] = ("loss", "min")
    # the data key holding a row's length in tokens (checked against model.max_position_embeddings)
    length_key: str = "max_length"
    # whether the head's size comes from the data's label set (task.num_labels overrides it)
    labelled: bool = False
    # whether rows carry special tokens ([CLS]/[SEP]): a character vocabulary then reserves them
    special_tokens: bool = True
    # metric names where smaller is better (a user-chosen best_metric takes its mode from here)
    lower_is_better: tuple[str, ...] = ("loss", "perplexity")

    # ------------------------------------------------------------------ config

    def check_config(self, cfg: Any) -> None:
        """Raises ConfigError for task settings of a TrainConfig that cannot work (beyond types)."""

    def num_labels(self, cfg: Any, data: Any) -> int:
        """The head's output size: task.num_labels, else the data's label count (labelled tasks)."""
        if not self.labelled:
            return 2
        if cfg.task.num_labels is not None:
            return int(cfg.task.num_labels)
        if getattr(data, "num_labels", None):
            return int(data.num_labels)
        if getattr(data, "label_names", None) is None:
            raise ConfigError(f"task.num_labels is not set and data '{cfg.data.name}' declares no label names")
        return len(data.label_names)

    def baselines(self, data: Any) -> dict:
        """Reference figures of the data recorded in results.json (e.g. a language model's unigram entropy)."""
        return {}

    def row_length(self, data_cfg: Any) -> int:
        return int(getattr(data_cfg, self.length_key))

    # ------------------------------------------------------------------ data (host)

    def check_data(self, data: Any) -> None:
        """ConfigError when the prepared data's schema is not one this task reads."""
        schema = data.prepared.schema
        if schema not in self.data_kinds:
            raise ConfigError(f"task {self.name} needs {' or '.join(self.data_kinds)} data but data.source="
                              f"{data.cfg.source} ({data.cfg.name}) holds {schema} records")

    def check_data_config(self, cfg: Any) -> None:
        """ConfigError for data settings this task cannot use (called before any data is read)."""

    def label_names(self, prepared: Any) -> Optional[list[str]]:
        return None

    def rows(self, data: Any, split: str, train: bool, seed: int):
        raise NotImplementedError(f"task {self.name} defines no rows")

    def num_examples(self, data: Any, split: str) -> int:
        return data.num_records(split)

    def buckets(self, cfg: Any) -> list[int]:
        return list(cfg.bucket_lengths)

    def length_grouping(self, cfg: Any) -> int:
        return 0

    def collate(self, rows: Sequence, batch_size: int, buckets: Sequence[int], pad_id: int) -> dict:
        raise NotImplementedError(f"task {self.name} defines no collate")

    def example_batch(self, cfg: Any, rows: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (shape, dtype)} of one global batch of `rows` rows at the longest length."""
        length = self.row_length(cfg.data)
        token = ((rows, length), np.int32)
        return {"input_ids": token, "attention_mask": token, "token_type_ids": token, "labels": token,
                "valid": ((rows,), np.int32)}

    # ------------------------------------------------------------------ device (traced)

    def model_inputs(self, batch: dict) -> dict:
        """Keyword arguments of `model(batch['input_ids'], ...)`."""
        inputs = {"attention_mask": batch.get("attention_mask")}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        return inputs

    def loss_weight(self, batch: dict):
        """How many examples or tokens the batch's loss averages over (float32 scalar)."""
        raise NotImplementedError

    def loss_terms(self, output: Any, batch: dict):
        """(sum of per-example or per-token losses, their count), float32 scalars."""
        raise NotImplementedError

    def eval_outputs(self, output: Any, batch: dict) -> dict:
        """What leaves the device per eval batch: always `loss_sum` and `weight`."""
        loss_sum, weight = self.loss_terms(output, batch)
        return {"loss_sum": loss_sum, "weight": weight}

    # ------------------------------------------------------------------ host (evaluation)

    def host_fields(self, batch: dict) -> dict:
        """The numpy fields of a host batch that `evaluate` needs besides the device outputs."""
        valid = np.asarray(batch["valid"]).astype(bool) if "valid" in batch else \
            np.ones(np.asarray(batch["input_ids"]).shape[0], bool)
        return {"valid": valid, "labels": np.asarray(batch["labels"])}

    def evaluate(self, outputs: list[dict], host: list[dict], data: Any, split: str,
                 task_cfg: Any = None) -> tuple[dict, Any]:
        """(metrics, predictions or None) of one pass over `split`; metrics always hold `loss`
        and `num_examples`. `task_cfg` is the run's `task` config node (task-specific settings).
        Predictions, when a task has them, go to predictions_<split>.json."""
        loss_sum = float(sum(np.sum(o["loss_sum"]) for o in outputs))
        weight = float(sum(np.sum(o["weight"]) for o in outputs))
        result = {"loss": loss_sum / weight if weight else float("nan"),
                  "num_examples": int(sum(h["valid"].sum() for h in host))}
        return result, None

    def metric_names(self, cfg: Any, data: Any) -> tuple[str, ...]:
        """The scalar metrics `evaluate` returns for a run of `cfg` (a TrainConfig) on `data`; the
        loop checks before the first step that best_metric is one of them."""
        return ("loss", "num_examples")


# ---------------------------------------------------------------------- shared pieces of tasks

def epochs(items, train: bool, seed: int, salt: int):
    """grain MapDataset over `items`: for training shuffled per epoch from (seed, salt) and endless,
    for evaluation in stored order. Each task's stream of randomness takes a salt of its own."""
    import grain

    from flaxen.data.pipeline import seed32

    rows = grain.MapDataset.source(items)
    return rows.shuffle(seed=seed32(seed, salt)).repeat(None) if train else rows


def token_cross_entropy(logits, labels):
    """Per-position cross-entropy (float32) where labels != IGNORE_INDEX, 0 elsewhere, and that mask.

    logits [..., classes], labels [...] integer."""
    import jax.numpy as jnp
    import optax

    mask = labels != IGNORE_INDEX
    safe = jnp.where(mask, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.where(mask, losses, 0.0), mask


def valid_rows(batch: dict):
    """[batch] float32: 1 for real rows (the `valid` field), else from integer labels != IGNORE_INDEX."""
    import jax.numpy as jnp

    labels = batch["labels"]
    if "valid" in batch:
        return batch["valid"].astype(jnp.float32)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return (labels != IGNORE_INDEX).astype(jnp.float32)
    return jnp.ones(labels.shape[:1], jnp.float32)


class TokenTask(Task):
    """A loss on scored positions: labels [batch, seq], IGNORE_INDEX where nothing is scored,
    logits [batch, seq, classes]; the loss averages over scored positions."""

    def loss_weight(self, batch: dict):
        import jax.numpy as jnp

        return jnp.sum(batch["labels"] != IGNORE_INDEX).astype(jnp.float32)

    def loss_terms(self, output: Any, batch: dict):
        import jax.numpy as jnp

        losses, mask = token_cross_entropy(output.logits, batch["labels"])
        return jnp.sum(losses), jnp.sum(mask).astype(jnp.float32)


class RecordTask(Task):
    """A task whose rows come one per stored record (classification, tagging): shuffled per
    epoch from the seed for training, in stored order for evaluation; batches optionally
    length-grouped (data.length_grouping)."""

    labelled = True

    def label_names(self, prepared: Any) -> Optional[list[str]]:
        return list(prepared.label_names) if prepared.label_names else None

    def row(self, data: Any, record: dict) -> dict:
        raise NotImplementedError

    def rows(self, data: Any, split: str, train: bool, seed: int):
        return epochs(data.records(split), train, seed, salt=5).map(lambda record: self.row(data, record))

    def length_grouping(self, cfg: Any) -> int:
        return int(cfg.length_grouping)
