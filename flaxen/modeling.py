"""Building the model a run trains or evaluates, from config, a Hugging Face directory or a run.

Why: train.py and eval.py must agree on the architecture. A run writes `model.json`
(ModelConfig fields, head, num_labels, label names) into its directory; eval.py rebuilds exactly
that model (abstractly, without initialising weights) before restoring a checkpoint into it.

Starting points, in the order the loop checks them:
- `model.pretrained=PATH`: `models.load_pretrained(PATH, head, num_labels=..., dtype=..., remat=...)`;
  the architecture comes from PATH's config.json.
- from scratch: `models.build_model` with the `model` config group, `vocab_size` and
  `pad_token_id` taken from the tokenizer.
- `init_from=RUN_DIR` (on top of from-scratch): parameters whose path exists in RUN_DIR's best
  checkpoint are copied (shapes must agree); the rest (a new head, a pooler) stay fresh. The run
  also takes RUN_DIR's tokenizer (RUN_DIR/tokenizer/), since the copied embedding rows are indexed
  by that vocabulary.

Every run saves the tokenizer it used as a Hugging Face tokenizer directory, RUN_DIR/tokenizer/,
which eval.py and later init_from runs read back (`tokenizer_path`).

Parameter-efficient fine-tuning (`peft` config group, models.peft) is applied on top of either
starting point. PEFT keeps the base parameters' paths, so init_from and checkpoints of the base
model still match by path; `model.json` records the method (`peft`) and `ModelSpec.build` /
`build_abstract` apply it again, so eval.py and resume see the same structure.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

import models
from flaxen import logging as run_logging
from flaxen import tasks
from flaxen.errors import CheckpointError, StorageError
from models import peft

MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
# PEFT parameters are initialised from their own stream of the run's seed: nnx.Rngs(seed) again
# would hand them the keys the base model's (or the head's) first parameters were drawn with.
PEFT_SEED_STREAM = 0x50454654


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a run's model: its config, head, labels and PEFT method
    (`peft`: a configs/peft mapping or config, kept as models.peft.to_dict; None = a plain model).
    `tokenizer`: the run's flaxen Tokenizer, which prompt tuning's text initialisation encodes its
    text with when the model is built fresh; not recorded (restored models need no initial values)."""
    config: models.ModelConfig
    head: str | None
    num_labels: int
    label_names: list[str] | None = None
    peft: Any = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.peft = peft.to_dict(peft.from_dict(self.peft))

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "head": self.head, "num_labels": self.num_labels,
                "label_names": self.label_names, "peft": dict(self.peft)}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        return cls(models.ModelConfig.from_dict(values["config"]), values["head"], values["num_labels"],
                   values.get("label_names"), values.get("peft"))

    def build(self, seed: int = 0) -> models.Model:
        """A freshly initialised model (with its PEFT method). Initialisation runs as one jitted
        program: eager initialisation would compile one small program per parameter shape."""
        abstract = self.build_abstract()
        graphdef, _ = nnx.split(abstract)
        state = jax.jit(lambda: nnx.state(self._construct(seed)))()
        return nnx.merge(graphdef, state)

    def _construct(self, seed: int, restoring: bool = False) -> models.Model:
        model = models.build_model(self.config, self.head, self.num_labels, rngs=nnx.Rngs(seed))
        return apply_peft(model, self.peft, seed, tokenizer=self.tokenizer, restoring=restoring)

    def build_abstract(self) -> models.Model:
        """The model with ShapeDtypeStruct leaves: a restore target that costs no initialisation."""
        return nnx.eval_shape(lambda: self._construct(0, restoring=True))


def apply_peft(model: models.Model, config: Any, seed: int, *, tokenizer: Any = None,
               restoring: bool = False) -> models.Model:
    """`model` with the PEFT method of `config` (a configs/peft mapping; none leaves it plain).

    tokenizer: the run's flaxen Tokenizer (prompt tuning's text initialisation encodes its text as
    the run encodes a sentence, special tokens included); restoring: the values will be replaced."""
    config = peft.from_dict(config)
    if isinstance(config, peft.NoPeftConfig):
        return model
    key = jax.random.fold_in(jax.random.key(seed), PEFT_SEED_STREAM)
    return peft.apply(model, config, rngs=nnx.Rngs(key), tokenizer=text_ids(tokenizer), restoring=restoring)


def text_ids(tokenizer: Any):
    """text -> the token ids a flaxen Tokenizer gives one sentence (its special tokens around it);
    None without a tokenizer."""
    if tokenizer is None:
        return None
    from flaxen.data.encoding import single_inputs

    return lambda text: single_inputs(tokenizer, tokenizer.encode(text))["input_ids"].tolist()


def build(cfg: Any, task_data: Any, log=print) -> tuple[models.Model, ModelSpec]:
    """The starting model of a run (pretrained or from scratch, with `cfg.peft` applied; init_from
    is applied by the loop). Method settings that default to the run's length (AdaLoRA's
    total_step) are filled in from `cfg.steps` (models.peft.for_run), so model.json records them."""
    task = tasks.for_run(cfg)
    head = task.head
    num_labels = task.num_labels(cfg, task_data)
    label_names = list(task_data.label_names) if getattr(task_data, "label_names", None) is not None else None
    if cfg.model.pretrained is not None:
        kwargs = {"dtype": cfg.model.dtype, "remat": cfg.model.remat, "seed": cfg.seed}
        if task.labelled:
            kwargs["num_labels"] = num_labels
            if label_names is not None and len(label_names) == num_labels:
                kwargs["id2label"] = label_names
        model = models.load_pretrained(os.path.expanduser(cfg.model.pretrained), head=head, **kwargs)
        spec = ModelSpec(model.config, head, num_labels, label_names, peft.for_run(cfg.peft, cfg.steps))
        return apply_peft(model, spec.peft, cfg.seed, tokenizer=task_data.tokenizer), spec
    values = {k: v for k, v in dict(cfg.model).items() if k not in ("name", "pretrained")}
    tokenizer = task_data.tokenizer
    if values["vocab_size"] != tokenizer.vocab_size:
        log(f"model.vocab_size: {values['vocab_size']} -> {tokenizer.vocab_size} (from the tokenizer)")
        values["vocab_size"] = tokenizer.vocab_size
    if tokenizer.pad_token_id is not None:
        values["pad_token_id"] = tokenizer.pad_token_id
    spec = ModelSpec(models.ModelConfig.from_dict(values), head, num_labels, label_names,
                     peft.for_run(cfg.peft, cfg.steps), tokenizer=tokenizer)
    return spec.build(cfg.seed), spec


def tokenizer_path(cfg: Any, run_dir: str | None = None) -> str | None:
    """The Hugging Face tokenizer directory a run must use, or None (data.tokenizer decides):
    model.pretrained's own; else `run_dir`'s saved one (evaluating a trained run); else the
    init_from run's saved one."""
    if cfg.model.pretrained:
        return os.path.expanduser(cfg.model.pretrained)
    sources = [run_dir] if run_dir is not None else []
    if cfg.get("init_from"):
        from flaxen.checkpoint import find_checkpoint_dir

        sources.append(os.path.dirname(find_checkpoint_dir(cfg.init_from)[0]))
    for source in sources:
        path = os.path.join(source, TOKENIZER_DIR)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    return None


def write_tokenizer(run_dir: str, tokenizer) -> None:
    """Saves `tokenizer` as RUN_DIR/tokenizer/ (into a temporary folder, then swapped in)."""
    import shutil
    import tempfile

    target = os.path.join(run_dir, TOKENIZER_DIR)
    temporary = None
    try:
        temporary = tempfile.mkdtemp(prefix=".tokenizer-", dir=run_dir)
        tokenizer.save(temporary)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(temporary, target)
    except OSError as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise StorageError.from_exception(error, target) from error


def write_spec(run_dir: str, spec: ModelSpec) -> None:
    run_logging.write_json(os.path.join(run_dir, MODEL_FILE), spec.to_dict())


def read_spec(run_dir: str) -> ModelSpec:
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: {run_dir} is not a flaxen run directory")
    with open(path) as f:
        return ModelSpec.from_dict(json.load(f))


def abstract_like(tree, shardings=None):
    """ShapeDtypeStruct pytree of `tree` (with `shardings` where given) for orbax restores."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def count_parameters(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def fill(target, arrays: dict, where: str, shardings=None):
    """`target` (a State, possibly abstract) with every leaf taken from `arrays` (keyed by
    checkpoint.variable_path). A missing or mis-shaped entry raises CheckpointError."""
    from flaxen.checkpoint import variable_path

    flat_shardings = None if shardings is None else jax.tree.leaves(shardings)
    leaves = []
    for index, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(target)):
        key = variable_path(path)
        if key not in arrays:
            raise CheckpointError(f"{where} has no parameter {'.'.join(key)} (shape {tuple(leaf.shape)}) of this model")
        value = arrays[key]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{where}: parameter {'.'.join(key)} has shape {tuple(value.shape)} there but "
                                  f"{tuple(leaf.shape)} in this model")
        value = np.asarray(value).astype(leaf.dtype)
        leaves.append(jax.device_put(value, flat_shardings[index]) if flat_shardings else jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def transfer(arrays: dict, target, source_name: str) -> tuple[Any, int, list[str]]:
    """Copies checkpoint `arrays` (keyed by checkpoint.variable_path) into `target` where paths agree.

    Returns (new target, number of copied tensors, paths left fresh). A shared path with a
    different shape raises CheckpointError naming the parameter and both shapes.
    """
    from flaxen.checkpoint import variable_path

    copied, fresh = 0, []

    def pick(path, value):
        nonlocal copied
        key = variable_path(path)
        if key not in arrays:
            fresh.append(".".join(key))
            return value
        other = arrays[key]
        if tuple(other.shape) != tuple(value.shape):
            raise CheckpointError(
                f"init_from={source_name}: parameter {'.'.join(key)} has shape {tuple(other.shape)} there but "
                f"{tuple(value.shape)} in this model")
        copied += 1
        return jax.device_put(np.asarray(other).astype(value.dtype), value.sharding)

    new = jax.tree_util.tree_map_with_path(pick, target)
    return new, copied, fresh
