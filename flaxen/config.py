"""Typed config schema for train.py and eval.py, registered in Hydra's ConfigStore.

Why: Hydra composes configs/config.yaml from its groups (model/ task/ data/ optimizer/ schedule/
peft/ privacy/ mesh/ experiment/) on top of the dataclass `TrainConfig`, so a misspelled key or a value of
the wrong type fails at composition, naming the key, before any data or model is touched.
`validate` then checks what types cannot (choices, divisibility, ranges) and raises ConfigError.

`compose(overrides, config_name="config")` is the programmatic entry (tests, notebooks): the same
composition as the command line, with Hydra's errors turned into ConfigError.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from flaxen import tasks
from flaxen.data import DataConfig
from flaxen.data.config import check_config as check_data_config
from flaxen.errors import ConfigError
from flaxen.generate import GenerationConfig
from flaxen.logging import check_loggers
from flaxen.privacy import PrivacyConfig
from flaxen.privacy import check_config as check_privacy_config
from flaxen.pruning import PruneConfig
from flaxen.pruning import check_config as check_prune_config

import models
from models import peft

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "warmup_linear", "warmup_cosine")
METRIC_MODES = ("max", "min")


def _model_schema():
    """ModelConfig's architecture fields (from models/) plus `name` and `pretrained`."""
    hints = typing.get_type_hints(models.ModelConfig)
    fields = [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(models.ModelConfig)]
    fields += [("name", str, field(default="custom")), ("pretrained", Optional[str], field(default=None))]
    return dataclasses.make_dataclass("ModelSchema", fields)


ModelSchema = _model_schema()


@dataclass
class TaskConfig:
    """What is learned: a task registered in flaxen/tasks/ (mlm, clm, seq_cls, token_cls, qa,
    seq2seq, span_corruption).

    num_labels: the head's size for labelled tasks (null: from the data's label set).
    n_best_size / max_answer_length: qa post-processing (start/end candidates per window, longest
    answer in tokens), as Hugging Face's run_qa.py.
    label_smoothing: seq2seq / span_corruption, the smoothed cross-entropy's epsilon (0: plain).
    separator: seq2seq on a decoder-only model, the text between prompt and completion.
    class_weights: seq_cls / token_cls, the cross-entropy's per-class weights: `balanced` (scikit-learn's
        n_samples / (num_labels * count_c) over the train split the run trains on; token_cls counts the
        label ids of scored tokens) or a list of num_labels positive weights; null: unweighted. The loss
        is sum(w_y * ce) / sum(w_y), as PyTorch's CrossEntropyLoss(weight=...) (flaxen.tasks.base).
    max_predictions_per_row: mlm, the most masked tokens one row may hold; the MLM head (transform
        and vocabulary projection) then runs at that many gathered positions per row instead of at
        every position. null: derived from data.mlm_probability and data.window_length (a row
        exceeds it with probability below 1e-6: 41 for 15 % of 128); 0: no cap, the head at every
        position (flaxen.tasks.mlm).
    generation: decoding at evaluation and generate.py's defaults (flaxen.generate.GenerationConfig).
    (How records become rows is data's: data.max_target_length, data.noise_density, ...)
    """
    name: str = "mlm"
    num_labels: Optional[int] = None
    n_best_size: int = 20
    max_answer_length: int = 30
    label_smoothing: float = 0.0
    separator: str = "\n"
    class_weights: Any = None
    max_predictions_per_row: Optional[int] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay, masked off biases and LayerNorm), Adafactor (T5's: factored
    second moments, updates relative to the parameter's RMS; `decay_rate`,
    `multiply_by_parameter_scale`, `clipping_threshold` (0: off), `momentum` (null: none)) or SGD with
    momentum; global-norm clipping when `clip_norm` > 0."""
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: Optional[float] = 0.9
    clip_norm: float = 1.0
    decay_rate: float = 0.8
    multiply_by_parameter_scale: bool = True
    clipping_threshold: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier over optimizer updates: `constant`, or linear warmup from 0 over
    `warmup_steps` then linear or cosine decay to `end_lr_ratio * lr` at the last step."""
    name: str = "warmup_linear"
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0


@dataclass
class MeshConfig:
    """Mesh sizes (-1 = all remaining devices) and logical-axis -> mesh-axis rules (configs/mesh/).
    With fsdp > 1 every parameter's largest divisible dimension is also sharded over fsdp."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    logical_axis_rules: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DistributedConfig:
    """Multi-process start-up (flaxen.distributed): `initialize` is auto | always | never; auto
    starts JAX's distributed runtime when the keys below or a cluster environment (SLURM, Open MPI,
    Cloud TPU, JAX_COORDINATOR_ADDRESS) ask for more than one process. Unset keys: from the environment."""
    initialize: str = "auto"
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[List[int]] = None
    initialization_timeout: int = 300


@dataclass
class TrainConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # configs/peft/*.yaml: `name` (none | lora | adapter | prefix | bitfit | adalora | prompt | ia3) and that
    # method's keys, checked by models.peft.from_dict in `validate` (the keys differ per method)
    peft: Any = field(default_factory=lambda: {"name": "none"})
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # configs/privacy/*.yaml: none | dp_sgd (differentially private training; flaxen/privacy.py)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # configs/prune/*.yaml: none | gradual (gradual magnitude pruning; flaxen/pruning.py)
    prune: PruneConfig = field(default_factory=PruneConfig)
    experiment_name: str = "default"
    seed: int = 0
    data_dir: str = MISSING
    run_dir: str = MISSING
    init_from: Optional[str] = None
    # training length: `steps` optimizer updates, or `epochs` passes over the train split (when set,
    # epochs decides and steps is unused):
    # steps = ceil(epochs * train examples / batch_size), resolved once the data is loaded (resolve_epochs)
    steps: Optional[int] = 1000
    epochs: Optional[float] = None
    batch_size: int = 32
    micro_batch_size: Optional[int] = None
    log_every: int = 50
    eval_every: int = 500
    eval_split: Optional[str] = "validation"
    eval_batch_size: int = 64
    eval_batches: Optional[int] = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    best_metric: Optional[str] = None
    best_mode: Optional[str] = None
    early_stopping_patience: Optional[int] = None
    progress_bar: bool = True
    # where metrics go besides metrics.jsonl (always written): tensorboard, wandb (flaxen.logging)
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: Optional[str] = None  # null: WANDB_PROJECT, else "flaxen"
    wandb_entity: Optional[str] = None   # null: WANDB_ENTITY, else wandb's default entity
    # JAX's persistent compilation cache (flaxen.compilation); null: off
    compilation_cache_dir: Optional[str] = None


@dataclass
class EvalConfig(TrainConfig):
    """eval.py: a run directory (or `checkpoint`, or `model.pretrained`) and a split.

    `output_dir`: where eval_<split>.json goes (default: the run directory; for a pretrained
    baseline without a run: runs/<experiment_name>_pretrained).
    """
    run_dir: Optional[str] = None
    split: str = "validation"
    checkpoint: Optional[str] = None
    step: Optional[int] = None
    output_dir: Optional[str] = None


def register() -> None:
    """Registers the schemas in Hydra's ConfigStore and two resolvers: `${expanduser:PATH}` and
    `${minilm_path:}` (the all-MiniLM-L6-v2 model directory, from models.minilm_path)."""
    if not OmegaConf.has_resolver("expanduser"):
        OmegaConf.register_new_resolver("expanduser", lambda path: os.path.expanduser(str(path)))
    if not OmegaConf.has_resolver("minilm_path"):
        OmegaConf.register_new_resolver("minilm_path", lambda: models.minilm_path())
    store = ConfigStore.instance()
    store.store(name="flaxen_train_schema", node=TrainConfig)
    store.store(name="flaxen_eval_schema", node=EvalConfig)


register()

def data_preset(name: str) -> DataConfig:
    """The data preset configs/data/<name>.yaml as a DataConfig (how a mixture finds its components)."""
    path = os.path.join(CONFIG_DIR, "data", f"{name}.yaml")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".yaml"))
        raise ConfigError(f"data.mixture: {name!r} is not a data preset (configs/data/ has {', '.join(presets)})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path)))


def best_metric(cfg) -> tuple[str, str]:
    """(metric name, 'max' | 'min') used for the best checkpoint and early stopping: the task's
    default unless `best_metric` / `best_mode` are set."""
    task = tasks.get(cfg.task.name)
    name, mode = task.best_metric
    if cfg.best_metric is not None:
        name = cfg.best_metric
        mode = cfg.best_mode or ("min" if name in task.lower_is_better else "max")
    elif cfg.best_mode is not None:
        mode = cfg.best_mode
    return name, mode


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}={value}: expected a {'non-negative' if allow_zero else 'positive'} integer")


def validate(cfg) -> None:
    """Checks beyond types: choices, ranges and the batch-size arithmetic. Raises ConfigError."""
    task = tasks.get(cfg.task.name)
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    _choice("schedule.name", cfg.schedule.name, SCHEDULES)
    _check_length(cfg)
    peft_config = peft.for_run(cfg.peft, cfg.steps) if cfg.steps is not None else peft.from_dict(cfg.peft)
    for key in ("steps", "batch_size", "eval_batch_size", "keep_checkpoints"):
        _positive(key, cfg[key])
    for key in ("log_every", "eval_every", "checkpoint_every", "schedule.warmup_steps"):
        _positive(key, OmegaConf.select(cfg, key), allow_zero=True)
    _positive("micro_batch_size", cfg.micro_batch_size)
    _positive("eval_batches", cfg.eval_batches)
    _positive("early_stopping_patience", cfg.early_stopping_patience)
    _positive("task.num_labels", cfg.task.num_labels)
    _positive("task.n_best_size", cfg.task.n_best_size)
    _positive("task.max_answer_length", cfg.task.max_answer_length)
    check_loggers(cfg.loggers)
    if cfg.micro_batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size} "
            "(gradient accumulation runs batch_size // micro_batch_size micro-batches per step)")
    if not 0.0 <= cfg.schedule.end_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.end_lr_ratio={cfg.schedule.end_lr_ratio}: expected a value in [0, 1]")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={cfg.optimizer.lr}: expected a positive learning rate")
    if cfg.best_mode is not None:
        _choice("best_mode", cfg.best_mode, METRIC_MODES)
    if cfg.early_stopping_patience is not None and not (cfg.eval_every and cfg.eval_split):
        raise ConfigError("early_stopping_patience needs periodic evaluation: set eval_every > 0 and eval_split")
    if cfg.model.pretrained is not None and not os.path.isdir(os.path.expanduser(cfg.model.pretrained)):
        raise ConfigError(f"model.pretrained={cfg.model.pretrained!r}: no such directory")
    check_data_config(cfg.data, task)
    task.check_data_config(cfg.data)
    task.check_config(cfg)
    check_privacy_config(cfg, task)
    if cfg.get("epochs") is None:  # else once `epochs` gave the steps (resolve_epochs)
        _check_steps(cfg)
    task.check_class_weights(cfg.task.get("class_weights"))
    _check_class_sampling_with_privacy(cfg)
    length = task.row_length(cfg.data)
    if cfg.model.pretrained is None and length > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.{task.length_key}={length} exceeds model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings}")
    if cfg.init_from is not None and cfg.model.pretrained is not None:
        raise ConfigError("init_from and model.pretrained are both set: choose one starting point")
    check_prompt_config(cfg, peft_config, length, task.length_key)


def _check_length(cfg) -> None:
    """`epochs`, when set, gives the length (any `steps`, e.g. an experiment's, is then unused);
    otherwise `steps`."""
    epochs = cfg.get("epochs")
    if epochs is None and cfg.steps is None:
        raise ConfigError("steps and epochs are both null: set steps=N (optimizer updates) or epochs=N (passes over "
                          "the train split)")
    if epochs is not None and not epochs > 0:
        raise ConfigError(f"epochs={epochs}: expected a positive number of passes over the train split")


def _check_steps(cfg) -> None:
    """What depends on the run's length (`steps`, given or resolved from `epochs`)."""
    given = "" if cfg.get("epochs") is None else f" (from epochs={cfg.epochs})"
    peft.for_run(cfg.peft, cfg.steps)  # AdaLoRA's total_step defaults to the run's steps
    if cfg.schedule.warmup_steps > cfg.steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds steps={cfg.steps}{given}")
    check_prune_config(cfg)


def _check_class_sampling_with_privacy(cfg) -> None:
    """DP-SGD's accounting assumes each example is drawn independently with one rate and protects
    each example's whole loss: oversampling and per-class loss weights break those assumptions."""
    from flaxen import privacy

    if not privacy.enabled(cfg):
        return
    if cfg.data.get("resample") is not None:
        raise ConfigError(f"data.resample={cfg.data.resample} with privacy={cfg.privacy.name}: oversampling draws some "
                          "examples more often than the privacy accounting assumes; set data.resample=null")
    if cfg.task.get("class_weights") is not None:
        raise ConfigError(f"task.class_weights with privacy={cfg.privacy.name}: DP-SGD normalises each example's "
                          "loss on its own, which undoes the class weights; set task.class_weights=null")


def resolve_epochs(cfg, epoch_examples: int):
    """`cfg` itself when it sets `steps`; for `epochs=E` a copy with steps = ceil(E * epoch_examples /
    batch_size) (epoch_examples: the rows one training epoch draws, after any few-shot subset and
    resampling; batch_size is the examples per optimizer update, gradient accumulation included), with
    the checks that depend on the run's length. E is read as the decimal it is written as (epochs=0.3
    over 1000 examples at batch 10 is 30 steps, not 31)."""
    if cfg.get("epochs") is None:
        return cfg
    import copy
    import math
    from fractions import Fraction

    if epoch_examples <= 0:
        raise ConfigError(f"epochs={cfg.epochs}: the train split has no examples")
    resolved = copy.deepcopy(cfg)
    resolved.steps = math.ceil(Fraction(repr(float(cfg.epochs))) * int(epoch_examples) / int(cfg.batch_size))
    _check_steps(resolved)
    return resolved


def train_length(cfg, epoch_examples: int) -> dict:
    """The run's length in both units, for results.json: planned steps, the epochs they cover, the
    rows per epoch and per step, and which of steps / epochs the config set."""
    return {"steps": int(cfg.steps), "epochs": int(cfg.steps) * int(cfg.batch_size) / int(epoch_examples)
            if epoch_examples else None, "epoch_examples": int(epoch_examples), "batch_size": int(cfg.batch_size),
            "set_by": "steps" if cfg.get("epochs") is None else "epochs", "epochs_given": cfg.get("epochs")}


def check_prompt_config(cfg, config, length: int, length_key: str) -> None:
    """Prompt tuning (`config`: the run's models.peft config): the virtual tokens need positions too,
    and a text initialisation needs the word embeddings the run starts from (init_from copies them in
    only after the model is built)."""
    if not isinstance(config, peft.PromptTuningConfig):
        return
    v = config.num_virtual_tokens
    if cfg.model.pretrained is None and length + v > cfg.model.max_position_embeddings:
        raise ConfigError(f"peft.num_virtual_tokens={v}: data.{length_key}={length} + {v} virtual tokens exceeds "
                          f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    if cfg.init_from is not None and config.prompt_tuning_init == "text":
        raise ConfigError("peft.prompt_tuning_init=text with init_from: the text's embeddings would be read from the "
                          "freshly initialised model before init_from copies its weights in; use model.pretrained, "
                          "or peft.prompt_tuning_init=random")


def check_data_dir(cfg) -> None:
    """ConfigError when `data_dir` is not an existing directory: a mistyped path (or
    FLAXEN_DATA_DIR) must not silently become a new, empty data root. The one exception is the
    default root (~/flaxen_data while FLAXEN_DATA_DIR is unset), where generated data (the
    quickstart) is prepared on first use. A read-only data_dir is fine (data is prepared into a
    per-user cache)."""
    path = os.path.abspath(os.path.expanduser(str(cfg.data_dir)))
    if os.path.isdir(path):
        return
    env = os.environ.get("FLAXEN_DATA_DIR")
    from_env = bool(env) and os.path.abspath(os.path.expanduser(env)) == path
    if not env and path == os.path.join(os.path.expanduser("~"), "flaxen_data"):
        return
    what = "is not a directory" if os.path.exists(path) else "does not exist"
    origin = " (from FLAXEN_DATA_DIR)" if from_env else ""
    raise ConfigError(f"data_dir={path!r}{origin} {what}: set data_dir=PATH or FLAXEN_DATA_DIR to the folder "
                      "that holds the data (e.g. <data_dir>/sst2/train.tsv for data=sst2), or create the folder "
                      "first for generated data")


def load_saved(path: str) -> DictConfig:
    """A run directory's config.yaml, with the keys of earlier flaxen versions replaced by theirs
    today: `tensorboard: true | false` became `loggers: [tensorboard] | []`."""
    saved = OmegaConf.load(path)
    if isinstance(saved, DictConfig) and "tensorboard" in saved:
        tensorboard = saved.pop("tensorboard")
        if "loggers" not in saved:
            saved.loggers = ["tensorboard"] if tensorboard else []
    return saved


def to_container(cfg) -> dict:
    """The resolved config as plain Python containers (for config.yaml in the run directory)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def override(key: str, value: Any) -> str:
    """`key=value` as a Hydra command-line override: quoted when the value holds characters Hydra's
    override grammar would read as syntax (run directories such as runs/x/seed=1 hold `=`)."""
    text = str(value)
    if text and all(c.isalnum() or c in "_-+./~@%*?$|" for c in text):
        return f"{key}={text}"
    return f"{key}='" + text.replace("'", "\\'") + "'"


def shell_word(word: str) -> str:
    """`word` quoted for a shell command line, in double quotes where that reads best."""
    import shlex

    if word == shlex.quote(word):
        return word
    return f'"{word}"' if not any(c in word for c in '"$`\\!') else shlex.quote(word)


def shell_override(key: str, value: Any) -> str:
    """`override(key, value)` as one word of a shell command line (printed hints, recorded commands)."""
    return shell_word(override(key, value))


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """Composes configs/<config_name>.yaml with command-line style overrides; ConfigError on bad keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="flaxen"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error)) from error
    validate(cfg)
    return cfg
