"""`Task`: everything that differs between tasks, in one object, and the registry of tasks by name.

Why: the steps, the loop, evaluation, the data pipeline and the config checks call a Task's
methods and never test a task's name, so a new task is one file under flaxen/tasks/ (a subclass
registered with `@register`), a head in models/heads.py if it needs a new one, a configs/task/
YAML and its tests. See docs/adding_a_task.md.

A Task is stateless (its settings come from the config each call receives), so one instance per
name serves every run; a task whose rows, loss or head depend on its settings or on the model
(seq2seq, span_corruption) is bound to a run by `for_run(cfg)` (`bind`: a copy holding them).
Its methods fall in three groups:

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
    eval_generator(model, data, task_cfg, training)   None, or what evaluation generates per batch

Host (evaluation, after the device outputs are gathered):
    host_fields(batch)                  what of each host batch evaluation keeps
    evaluate(outputs, host, data, split, task_cfg) -> (metrics dict, predictions or None)
    metric_names(cfg, data)             the scalar metrics `evaluate` returns (checked at start-up)

Prediction (predict.py through flaxen.predict; `run` is flaxen.inference's TrainedRun):
    predict_records(path, cfg, options)  a file of inputs -> records (each with `where`: "PATH:LINE")
    predict_rows(records, run, options)  records -> unpadded rows as training encodes them
    prediction_buckets / prediction_collate / prediction_step   batches and the jitted forward pass
    prediction_outputs(output, batch, options)   what leaves the device (traced)
    format_predictions(records, rows, outputs, run, options) -> one JSON-ready dict per record
    hf_pipeline                         the transformers pipeline of the exported model (export.py)

Generation (generate.py through flaxen.generate; seq2seq and clm):
    can_generate(spec)                  whether a run of this task generates text
    generation_rows(records, run, settings, truncate)   input texts -> prompt ids as training encodes them
    generate_batch(model, tokenizer, cfg, rows, batch_size, settings, call) -> one decoded text per row

Explanation (one example, host; flaxen.attribution and scripts/explain.py):
    explain_row(tokenizer, data_cfg, text, text_pair, context)  one raw input -> a row, as training encodes it
    attribution_targets(output, row, ...)   the output scalars an attribution explains (AttributionTarget)
    describe_prediction(output, row, targets, label_names) -> (prediction in words, {name: probability})
Tasks without them (the language models) raise ConfigError naming the tasks that have them.

Batches follow the data contract: `labels` is IGNORE_INDEX wherever nothing is scored and `valid`
([batch], 1 for real rows) marks padding rows of an eval split's last batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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


@dataclasses.dataclass(frozen=True)
class AttributionTarget:
    """One scalar of a model's output for one example: `output.<field>[0, *index]` (flaxen.attribution
    differentiates it). name: what it is, in words ("logit of 'positive'")."""

    name: str
    field: str
    index: tuple[int, ...]


def get(name: Any) -> "Task":
    """The registered Task called `name` (a Task passes through); ConfigError naming the choices."""
    if isinstance(name, Task):
        return name
    if name not in _REGISTRY:
        raise ConfigError(f"task.name={name!r}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def generating_names() -> list[str]:
    """The registered tasks that generate text (generate.py serves them)."""
    return [name for name, task in _REGISTRY.items() if type(task).can_generate is not Task.can_generate]


def for_run(cfg: Any) -> "Task":
    """The Task of a run's TrainConfig as that run uses it: `get(cfg.task.name).bind(cfg)`."""
    return get(cfg.task.name).bind(cfg)


def model_family(cfg: Any) -> str:
    """The model family a run's config builds (models.FAMILIES): model.family, or for
    model.pretrained=PATH the family of PATH's config.json model_type."""
    pretrained = cfg.model.get("pretrained") if hasattr(cfg.model, "get") else getattr(cfg.model, "pretrained", None)
    if pretrained:
        import json
        import os

        from models import hf

        path = os.path.join(os.path.expanduser(str(pretrained)), "config.json")
        try:
            with open(path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError):
            model_type = None
        if model_type in hf.MODEL_TYPES:
            return hf.MODEL_TYPES[model_type].family
    return str(cfg.model.family)


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
    # whether each train row is exactly one stored record (and a record exactly one row): the
    # example DP-SGD protects (flaxen.privacy); its per-example loss is loss_terms on that one row
    example_rows: bool = False
    # whether examples have classes (ClassTask: seq_cls, token_cls): few-shot subsets
    # (data.train_examples_per_class), balanced resampling (data.resample) and task.class_weights apply
    class_labels: bool = False

    # ------------------------------------------------------------------ config

    def bind(self, cfg: Any) -> "Task":
        """This task as the run of TrainConfig `cfg` uses it (`for_run`). A task whose rows, loss or
        head depend on its settings or on the model (seq2seq, span_corruption) returns a copy that
        holds them; the others return themselves, one instance serving every run."""
        return self

    def check_config(self, cfg: Any) -> None:
        """Raises ConfigError for task settings of a TrainConfig that cannot work (beyond types)."""

    @staticmethod
    def class_label_tasks() -> list[str]:
        """The registered tasks whose examples have classes (`class_labels`)."""
        return [name for name, task in _REGISTRY.items() if task.class_labels]

    def check_class_weights(self, value: Any) -> None:
        """ConfigError unless task.class_weights=`value` is null, or `balanced` or a list of positive
        numbers for a task with classes (its length is checked against the labels once the data is read)."""
        if value is None:
            return
        if not self.class_labels:
            raise ConfigError(f"task.class_weights applies to tasks whose examples have classes "
                              f"({', '.join(self.class_label_tasks())}); task {self.name} has none "
                              "(set task.class_weights=null)")
        if isinstance(value, str):
            if value != "balanced":
                raise ConfigError(f"task.class_weights={value!r}: expected balanced, a list of num_labels positive "
                                  "weights, or null")
            return
        weights = _plain(value)
        if not isinstance(weights, list) or not weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and np.isfinite(w) for w in weights):
            raise ConfigError(f"task.class_weights={weights!r}: expected balanced, a list of num_labels positive "
                              "weights (e.g. [1.0, 3.5]), or null")

    def check_class_options(self, data: Any) -> None:
        """Once the data is read (flaxen.data.TaskData): ConfigError when the few-shot subset, the
        class weights or the resampling cannot be made from it (ClassTask)."""

    def epoch_examples(self, data: Any, split: str) -> int:
        """Rows one training epoch over `split` draws (what `epochs` counts): num_examples, unless the
        task resamples."""
        return self.num_examples(data, split)

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

    def eval_generator(self, model: Any, data: Any, task_cfg: Any = None, training: bool = False):
        """None, or host batch -> {name: numpy [batch, ...]}: what evaluation needs of the whole
        model beyond one forward pass (generated tokens), added to each batch's `host_fields`.
        `model`: the models.Model with the evaluated weights; `training`: an evaluation inside
        train.py (rather than eval.py's)."""
        return None

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

    # ------------------------------------------------------------------ prediction (predict.py, export.py)

    # the transformers pipeline that serves this task's exported model (export.py's README.md)
    hf_pipeline: Optional[str] = None

    def predict_records(self, path: str, cfg: Any, options: Any) -> list[dict]:
        """The inputs of file `path` (read with flaxen.predict's readers; `cfg` is the run's
        TrainConfig, `options` the flaxen.predict.PredictConfig), each with `where` ("PATH:LINE")."""
        raise ConfigError(f"task {self.name} has no prediction; tasks with one: "
                          + ", ".join(t.name for t in _REGISTRY.values()
                                      if type(t).predict_records is not Task.predict_records))

    def predict_rows(self, records: list[dict], run: Any, options: Any) -> list[dict]:
        """Unpadded model rows as training encodes them (numpy), for `run` (flaxen.inference's
        TrainedRun: cfg, model, tokenizer, label_names); DataError naming an input's `where` when it
        is over the run's length limit and options.truncate is false."""
        raise NotImplementedError

    def prediction_buckets(self, run: Any, options: Any, longest: int) -> list[int]:
        """The padded lengths of prediction batches: training's buckets (and `longest`, the longest
        row, when it is beyond them)."""
        buckets = sorted(self.buckets(run.cfg.data))
        return buckets if buckets and buckets[-1] >= longest else buckets + [longest]

    def prediction_collate(self, rows: Sequence, batch_size: int, buckets: Sequence[int], pad_id: int) -> dict:
        """Rows (or encoding.PADDING) -> a batch with the model's inputs, padded on the right."""
        from flaxen.data import encoding

        return encoding.collate(rows, batch_size, buckets, pad_id, token_fields={"token_type_ids": (np.int32, 0)})

    def prediction_step(self, run: Any, options: Any):
        """batch -> {name: numpy [batch, ...]}: by default one jitted forward pass returning
        `prediction_outputs` (flaxen.predict.forward_step)."""
        from flaxen.predict import forward_step

        return forward_step(self, run.model, options)

    def prediction_outputs(self, output: Any, batch: dict, options: Any) -> dict:
        """What leaves the device per prediction batch (traced; `output` is the models.ModelOutput)."""
        raise NotImplementedError

    def format_predictions(self, records: list[dict], rows: list[dict], outputs: list[dict], run: Any,
                           options: Any) -> list[dict]:
        """One JSON-ready dict per record; outputs[i] holds row i's slice of each prediction output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generation (generate.py, flaxen.generate)

    def can_generate(self, spec: Any) -> bool:
        """Whether a run of this task with model `spec` (flaxen.modeling.ModelSpec) generates text."""
        return False

    def generation_rows(self, records: list[dict], run: Any, settings: Any, truncate: bool) -> list[list[int]]:
        """The prompt ids of each record ({"where", "text"}) as training encodes an input; DataError
        naming its `where` when it is over the run's length limit and `truncate` is false.
        `settings`: flaxen.generate.GenerationConfig."""
        raise ConfigError(f"task {self.name} does not generate text; tasks that do: {', '.join(generating_names())}")

    def generate_batch(self, model: Any, tokenizer: Any, cfg: Any, rows: Sequence[Sequence[int]], batch_size: int,
                       settings: Any, call: int = 0) -> list[str]:
        """The generated text of each row (prompt ids from `generation_rows`), decoded up to eos;
        the batch is filled up to `batch_size` rows so its shapes repeat. `call` numbers the
        batches (sampling folds it into the key)."""
        raise ConfigError(f"task {self.name} does not generate text; tasks that do: {', '.join(generating_names())}")

    # ------------------------------------------------------------------ explanation (host, one example)

    def _not_explainable(self) -> ConfigError:
        able = sorted(task.name for task in _REGISTRY.values()
                      if type(task).attribution_targets is not Task.attribution_targets)
        return ConfigError(f"task {self.name} has no attribution target (no output scalar that explains its "
                           f"prediction is defined for it); tasks that can be explained: {', '.join(able)}")

    def explain_row(self, tokenizer: Any, data_cfg: Any, text: str, text_pair: Optional[str] = None,
                    context: Optional[str] = None) -> dict:
        """One raw input as the unpadded row training makes of it (numpy: input_ids [T'],
        token_type_ids [T'], and the task's own fields)."""
        raise self._not_explainable()

    def attribution_targets(self, output: Any, row: dict, *, target: Any = None, position: Any = None,
                            span: Any = None, label_names: Optional[Sequence[str]] = None) -> list[AttributionTarget]:
        """The output scalars that explain the model's prediction on `row` (`output`: the
        models.ModelOutput of that row as a batch of one, no padding). `target` (a label name or
        index), `position` (a token index) and `span` ((start, end) or "start:end") choose among
        them where the task has a choice; unset, the model's own prediction is explained."""
        raise self._not_explainable()

    def describe_prediction(self, output: Any, row: dict, targets: Sequence[AttributionTarget],
                            label_names: Optional[Sequence[str]] = None) -> tuple[str, dict[str, float]]:
        """(the prediction in words, {name: probability} of the distribution the targets belong to)."""
        raise self._not_explainable()


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


def label_strings(names: Optional[Sequence[str]], count: int) -> list[str]:
    """The run's label names, or "0", "1", ... for `count` labels when it has none."""
    return list(names) if names else [str(i) for i in range(count)]


def label_index(value: Any, names: Optional[Sequence[str]], count: int, key: str = "target") -> int:
    """The index of label `value` (a name, or an index as int or digits) among `count` labels;
    ConfigError naming `key` and the choices."""
    names = label_strings(names, count)
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = None
    if index is None or isinstance(value, float) or not 0 <= index < count:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(names)} (or an index 0-{count - 1})")
    return index


def check_unused(task: "Task", **given: Any) -> None:
    """ConfigError naming each explanation option set that `task` has no use for."""
    unused = [key for key, value in given.items() if value is not None]
    if unused:
        raise ConfigError(f"task {task.name} takes no {' or '.join(f'{key}=' for key in unused)} to choose what "
                          "to explain")


def softmax(logits) -> np.ndarray:
    """float64 probabilities over the last axis."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


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
    example_rows = True

    def label_names(self, prepared: Any) -> Optional[list[str]]:
        return list(prepared.label_names) if prepared.label_names else None

    def row(self, data: Any, record: dict) -> dict:
        raise NotImplementedError

    def rows(self, data: Any, split: str, train: bool, seed: int):
        return epochs(data.records(split), train, seed, salt=5).map(lambda record: self.row(data, record))

    def length_grouping(self, cfg: Any) -> int:
        return int(cfg.length_grouping)


def _plain(value: Any) -> Any:
    """OmegaConf lists and dicts as plain Python ones (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class ClassTask(RecordTask):
    """A record task whose examples have classes (seq_cls: the label; token_cls: the word tags and
    their entity types). For these, flaxen.data.sampling gives:

    - few-shot subsets (data.train_examples_per_class, data.train_subset_seed): the train split's
      records become `subset_indices(data, records, k, seed)` of them (TaskData.records); `k` is K,
      or where `subset_counts_per_label` a mapping {label name: count} (the labels not named keep
      every record: an imbalanced split made from a balanced one);
    - balanced resampling (data.resample=balanced): training epochs draw every class of
      `resample_classes` equally often (`rows`, `epoch_examples`);
    - class weights (task.class_weights, bound by `bind`): rows carry `label_weights`, each scored
      label's weight (0 elsewhere), and the loss is sum(w_y * ce) / sum(w_y) (`weighted_terms`). The
      weights enter the batch scaled so the smallest is 1, which leaves that ratio unchanged and keeps
      every batch's total weight >= 1 (the train step divides by max(total weight, 1)).

    Subclasses define `label_counts(data)` (counts of the label ids the loss sees on the train
    split), `subset_indices`, `resample_classes` and `subset_summary`."""

    class_labels = True
    class_weights: Any = None  # the run's task.class_weights: None, "balanced" or a list
    # whether data.train_examples_per_class may be a mapping {label name: count} (each example has one
    # label: seq_cls); else only one K (token_cls: a sentence holds several entity types)
    subset_counts_per_label: bool = False

    def bind(self, cfg: Any) -> "Task":
        task_cfg = cfg.get("task") if hasattr(cfg, "get") else getattr(cfg, "task", None)
        weights = task_cfg.get("class_weights") if hasattr(task_cfg, "get") else getattr(task_cfg, "class_weights",
                                                                                          None)
        weights = _plain(weights)
        if weights == self.class_weights:
            return self
        import copy

        bound = copy.copy(self)
        bound.class_weights = list(weights) if isinstance(weights, (list, tuple)) else weights
        return bound

    # ------------------------------------------------------------------ to define per task

    def label_counts(self, data: Any) -> np.ndarray:
        """[num_labels] counts of each label id that the loss scores on the train split."""
        raise NotImplementedError

    def subset_indices(self, data: Any, records: list, k: Any, seed: int) -> np.ndarray:
        """Ascending indices of the few-shot subset of the train split's `records` (`k`: K, or a
        mapping {label name: count} where `subset_counts_per_label`)."""
        raise NotImplementedError

    def resample_classes(self, data: Any, records: list) -> np.ndarray:
        """[records] the class each record counts for in balanced resampling."""
        raise NotImplementedError

    def subset_summary(self, data: Any, records: list) -> dict:
        """{class name: count} in `records` (what few-shot sampling counts: examples or mentions)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def check_data_config(self, cfg: Any) -> None:
        super().check_data_config(cfg)
        k = getattr(cfg, "train_examples_per_class", None)
        if isinstance(k, Mapping) and not self.subset_counts_per_label:
            takers = [name for name, task in _REGISTRY.items() if getattr(task, "subset_counts_per_label", False)]
            raise ConfigError(f"data.train_examples_per_class={_plain(k)}: a mapping from label to count applies to "
                              f"tasks whose examples have one label each ({', '.join(takers)}); task "
                              f"{self.name}'s few-shot subset takes one number K (its examples hold several "
                              "classes each)")

    def check_class_options(self, data: Any) -> None:
        cfg = data.cfg
        k, resample = getattr(cfg, "train_examples_per_class", None), getattr(cfg, "resample", None)
        used = [key for key, value in (("data.train_examples_per_class", k), ("data.resample", resample),
                                       ("task.class_weights", self.class_weights)) if value is not None]
        if not used or "train" not in data.splits:
            return
        if getattr(data, "regression", False):
            raise ConfigError(f"{', '.join(used)}: data '{cfg.name}' is regression data (one float label per "
                              "example), which has no classes")
        if k is not None:
            data.records("train")  # draws the subset: a class with fewer than K examples fails here
        self.label_weights(data)
        if resample is not None:
            self.epoch_examples(data, "train")

    def label_weights(self, data: Any) -> Optional[np.ndarray]:
        """float64 [num_labels]: task.class_weights resolved on `data` (balanced: from the train
        split the run trains on), None when unweighted. ConfigError for a list of the wrong length."""
        if self.class_weights is None:
            return None
        setting = self.class_weights
        key = ("class_weights", setting if isinstance(setting, str) else tuple(setting))

        def build():
            from flaxen.data import sampling

            names = list(data.label_names or [])
            if isinstance(setting, str):
                return sampling.balanced_weights(self.label_counts(data), names)
            if len(setting) != len(names):
                raise ConfigError(f"task.class_weights has {len(setting)} weights but num_labels is {len(names)} "
                                  f"(labels: {', '.join(map(str, names))}): give one weight per label, in that order")
            return np.asarray(setting, np.float64)

        return data.cached(key, build)

    def weighted_row(self, data: Any, row: dict) -> dict:
        """`row` with `label_weights` (each scored label's scaled class weight, 0 where nothing is
        scored) when the run weighs classes."""
        weights = self.label_weights(data)
        if weights is None:
            return row
        scaled = (weights / weights.min()).astype(np.float32)
        labels = np.asarray(row["labels"])
        row["label_weights"] = np.where(labels != IGNORE_INDEX, scaled[np.maximum(labels, 0)], 0).astype(np.float32)
        return row

    def rows(self, data: Any, split: str, train: bool, seed: int):
        if not (train and getattr(data.cfg, "resample", None)):
            return super().rows(data, split, train, seed)
        from flaxen.data import sampling
        from flaxen.data.pipeline import seed32

        records = data.records(split)
        return sampling.balanced_epochs(records, self._classes(data, split), seed32(seed, 8)).map(
            lambda record: self.row(data, record))

    def _classes(self, data: Any, split: str) -> np.ndarray:
        """`resample_classes` of the split's records, computed once per data."""
        return data.cached(("resample_classes", split), lambda: self.resample_classes(data, data.records(split)))

    def epoch_examples(self, data: Any, split: str) -> int:
        if not getattr(data.cfg, "resample", None):
            return self.num_examples(data, split)
        classes = self._classes(data, split)
        counts = np.bincount(np.asarray(classes, np.int64)) if len(classes) else np.zeros(0, np.int64)
        return int((counts > 0).sum() * counts.max()) if len(counts) else 0

    @staticmethod
    def weighted_terms(losses, mask, batch: dict):
        """(sum of losses, their weight): weighted by the batch's `label_weights` when it has them
        (sum(w * ce), sum(w)), else the plain sum and count of `mask`."""
        import jax.numpy as jnp

        weights = ClassTask.scored_weights(mask, batch)
        return jnp.sum(losses * weights), jnp.sum(weights)

    @staticmethod
    def scored_weights(mask, batch: dict):
        """float32 like `mask`: each scored label's class weight (`label_weights`), or `mask` itself
        when the run does not weigh classes; their sum is the loss's weight."""
        import jax.numpy as jnp

        mask = mask.astype(jnp.float32)
        return batch["label_weights"].astype(jnp.float32) * mask if "label_weights" in batch else mask
