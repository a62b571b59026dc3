"""orbax checkpoints of a training run: <run_dir>/checkpoints/<step>/{params,opt_state,rest,meta,data}.

Why: a run must resume exactly (parameters, optimizer state, step, RNG and the data position)
and eval.py must find the best checkpoint, while a crash or a NaN never touches a good earlier
checkpoint. orbax writes every step into a temporary directory and renames it when complete.

Items of one step:
    params     trainable parameters (nnx.State pytree of arrays)
    opt_state  optax state (only for trainable parameters)
    rest       every other model variable (frozen parameters, ...), when there is any
    meta       JSON: step, RNG key data, best-metric bookkeeping, tokens and wall time so far
    data       JSON: the training loader's `get_state()` (its exact position)
Retention: the last `keep` steps, plus the best step by `best_metric` (name, 'max' | 'min') among
steps saved with eval metrics. Saves are synchronous: the train step donates its input buffers,
so a save must finish reading them before the next step runs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flaxen.errors import CheckpointError

ARRAY_ITEMS = ("params", "opt_state", "rest")


def _has_leaves(tree) -> bool:
    return tree is not None and len(jax.tree.leaves(tree)) > 0


class Checkpointer:
    """Saves and restores the items above under `directory`; `read_only` for evaluation."""

    def __init__(self, directory: str, *, keep: int = 2, best_metric: tuple[str, str] | None = None,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.best_metric = best_metric
        best_fn, mode, preservation = None, "max", policies.LatestN(n=keep)
        if best_metric is not None:
            name, mode = best_metric

            def best_fn(metrics: dict) -> float:
                return float(metrics[name])

            preservation = policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=best_fn, reverse=mode == "min", n=1,
                               keep_checkpoints_without_metrics=False),
            ])
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode=mode, preservation_policy=preservation,
            enable_async_checkpointing=False, create=not read_only,
        )
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The best step among those saved with metrics; the latest when none has metrics."""
        if self.best_metric is None:
            return self.latest_step()
        with_metrics = [s for s in self.all_steps() if self.manager.metrics(s)]
        return self.manager.best_step() if with_metrics else self.latest_step()

    def metrics(self, step: int) -> dict | None:
        return self.manager.metrics(step)

    def save(self, step: int, *, params, opt_state, rest=None, meta: dict, data: dict | None = None,
             metrics: dict | None = None) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state),
                 "meta": ocp.args.JsonSave(meta)}
        if _has_leaves(rest):
            items["rest"] = ocp.args.StandardSave(rest)
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=clean, force=True)
        self.manager.wait_until_finished()

    def _item_names(self, step: int) -> set[str]:
        step_dir = os.path.join(self.directory, str(step))
        return {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}

    def restore(self, step: int, *, params, opt_state=None, rest=None, meta: bool = True,
                data: bool = True) -> dict[str, Any]:
        """Restores `step` onto abstract targets (jax.ShapeDtypeStruct pytrees with shardings).

        Only the items given (or flagged) are read; `opt_state=None` restores parameters only.
        """
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}")
        present = self._item_names(step)
        wanted = {"params": params, "opt_state": opt_state, "rest": rest if _has_leaves(rest) else None}
        items = {name: ocp.args.StandardRestore(target) for name, target in wanted.items()
                 if target is not None and name in present}
        if _has_leaves(rest) and "rest" not in present:
            raise CheckpointError(f"checkpoint {self.directory}/{step} holds no 'rest' item, but the model has "
                                  "non-trainable variables")
        if meta and "meta" in present:
            items["meta"] = ocp.args.JsonRestore()
        if data and "data" in present:
            items["data"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the model being restored: {error}") from error
        return {name: restored[name] for name in items}

    def restore_arrays(self, step: int, items: tuple[str, ...] = ("params", "rest")) -> dict[tuple[str, ...], Any]:
        """The arrays of `items` at `step` without a target, keyed by variable path
        (('backbone', 'layers', '0', 'attention', 'query', 'kernel'), ...): restores whatever
        split (trainable / frozen) the run used."""
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}")
        present = [name for name in items if name in self._item_names(step)]
        # Targets on this process's first device, from the saved shapes: a checkpoint written on
        # any mesh or device count restores here (without a target orbax insists on the saving topology).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = self.manager.item_metadata(step)
        targets = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), metadata[name])
                   for name in present}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(targets[name]) for name in present}))
        arrays = {}
        for name in present:
            for path, value in jax.tree_util.tree_leaves_with_path(restored[name]):
                arrays[variable_path(path)] = value
        return arrays

    def close(self) -> None:
        self.manager.close()


def variable_path(key_path) -> tuple[str, ...]:
    """A pytree key path of an nnx.State (or its restored dict form) as strings, without the
    trailing 'value' of the variable."""
    names = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)))
                break
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def find_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """A run directory, its checkpoints/ folder or one step folder -> (checkpoints dir, step or None)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path.rstrip(os.sep))
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(base)
    if any(name.isdigit() for name in os.listdir(path)):
        return path, None
    raise CheckpointError(
        f"{path} is neither a run directory (with checkpoints/), a checkpoints directory nor a step directory")
