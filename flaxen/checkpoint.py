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

Integrity (a run must survive a kill during a save, a full disk and damaged files):
- After each save, `flaxen_checksums.json` in the step directory records the size and sha256 of
  every file orbax wrote ({"format": 1, "algorithm": "sha256", "files": {relative path: {"bytes",
  "sha256"}}}). Hashing reads what was just written, from the page cache: ~0.15 s for the 211 MB
  of a MiniLM step with its Adam state.
- `verify(step)` checks a step before it is used: orbax's commit markers (_CHECKPOINT_METADATA
  with its commit time, commit_success.txt in the step and in each item), each item directory and
  its metadata (_METADATA of arrays, `metadata` of JSON items), then every file against the
  checksums or, for a step without them (saved before they existed, or killed before they were
  written), reads every file through. Without checksums, damaged bytes inside an array file go
  unseen: TensorStore restores them without complaint.
- `restore` compares the saved parameter paths and shapes with the model's first (a mismatch is
  CheckpointError "does not match the model", never damage); a restore that still fails
  (TensorStore/orbax errors) is damage, unless the checksums proved the files intact.
- `restore_latest_good` (resume) moves a damaged step aside, never deleting it, into
  RUN_DIR/checkpoints.corrupt/<step> (outside the directory orbax manages) with a printed message
  naming the step and the file, and falls back to the newest good step; when none is good it
  raises one CheckpointError naming each step's cause. Read-only users (eval.py, init_from) get
  CorruptCheckpointError and move nothing.
- A save that fails on an operating-system error (no space left, read-only file system,
  permission denied, possibly wrapped by orbax or reported by TensorStore as text) raises
  StorageError naming the path and the errno; its unfinished `<step>.orbax-checkpoint-tmp*`
  directory is removed, as are any left by a killed run when a writable Checkpointer opens the
  directory (with a message).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from flaxen.errors import CheckpointError, StorageError
from flaxen.data.raw import sha256_file

ARRAY_ITEMS = ("params", "opt_state", "rest")
JSON_ITEMS = ("meta", "data")
CHECKSUM_FILE = "flaxen_checksums.json"
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into the step and each item when they are complete
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"  # RUN_DIR/checkpoints.corrupt/<step>


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step whose files are missing, truncated or damaged (`step`, `cause`)."""

    def __init__(self, message: str, step: int, cause: str):
        super().__init__(message)
        self.step, self.cause = step, cause


def _files_under(directory: str) -> list[str]:
    """Relative paths of the files below `directory` (sorted), without our checksum file."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != CHECKSUM_FILE:
                found.append(relative)
    return sorted(found)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:400]


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
        self.corrupt_directory = self.directory + CORRUPT_SUFFIX
        if not read_only and jax.process_index() == 0:
            self._remove_unfinished_saves()
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as error:
            if not read_only and (storage := StorageError.from_exception(error, self.directory, "checkpoints")):
                raise storage from error
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_first_line(error)}") from error
        except (ValueError, KeyError, TypeError) as error:  # e.g. a damaged metrics file of some step
            raise CheckpointError(f"cannot read the checkpoints in {self.directory}: {_first_line(error)}") from error

    # ------------------------------------------------------------ integrity

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _remove_unfinished_saves(self, step: int | None = None) -> None:
        """Removes `<step>.orbax-checkpoint-tmp-*` directories: saves that never committed (a killed
        run or a failed save), which orbax ignores but which hold disk space."""
        if not os.path.isdir(self.directory):
            return
        prefix = "" if step is None else f"{step}{TMP_MARKER}"
        for name in sorted(os.listdir(self.directory)):
            if TMP_MARKER in name and name.startswith(prefix):
                path = os.path.join(self.directory, name)
                shutil.rmtree(path, ignore_errors=True)
                if step is None:
                    print(f"removed {path}: an unfinished checkpoint save (the run was stopped while saving)",
                          flush=True)

    def verify(self, step: int) -> str | None:
        """Why checkpoint `step` cannot be used (naming the file), or None when it is intact (see the
        module docstring). Reads every file of the step."""
        step_dir = self._step_dir(step)
        if not os.path.isdir(step_dir):
            return f"{step_dir} does not exist"
        try:
            metadata = _read_json(os.path.join(step_dir, STEP_METADATA))
        except FileNotFoundError:
            return f"{STEP_METADATA} is missing (the save never committed)"
        except (OSError, ValueError) as error:
            return f"{STEP_METADATA} is unreadable ({_first_line(error)})"
        if not isinstance(metadata, dict) or not metadata.get("commit_timestamp_nsecs"):
            return f"{STEP_METADATA} has no commit time (the save never committed)"
        if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
            return f"{COMMIT_MARKER} is missing (the save never committed)"
        handlers = metadata.get("item_handlers")
        items = set(handlers) if isinstance(handlers, dict) else set()
        items |= {"params", "meta"}
        for item in sorted(items):
            item_dir = os.path.join(step_dir, item)
            if not os.path.isdir(item_dir):
                return f"item directory {item}/ is missing"
            json_item = item in JSON_ITEMS or item == "metrics" or "Json" in str((handlers or {}).get(item))
            required = ("metrics" if item == "metrics" else "metadata") if json_item else "_METADATA"
            try:
                _read_json(os.path.join(item_dir, required))
            except FileNotFoundError:
                return f"{item}/{required} is missing"
            except (OSError, ValueError) as error:
                return f"{item}/{required} is unreadable ({_first_line(error)})"
            if not os.path.isfile(os.path.join(item_dir, COMMIT_MARKER)):
                return f"{item}/{COMMIT_MARKER} is missing (the item was never completely written)"
        checksums = os.path.join(step_dir, CHECKSUM_FILE)
        if os.path.isfile(checksums):
            try:
                recorded = {name: (int(entry["bytes"]), entry["sha256"])
                            for name, entry in _read_json(checksums)["files"].items()}
            except (OSError, ValueError, KeyError, TypeError) as error:
                return f"{CHECKSUM_FILE} is unreadable ({_first_line(error)})"
            for name, (size, digest) in sorted(recorded.items()):
                path = os.path.join(step_dir, name)
                try:
                    actual = os.path.getsize(path)
                    if actual != size:
                        return f"{name} has {actual:,} bytes where {size:,} were saved"
                    if sha256_file(path) != digest:
                        return f"{name} differs from what was saved (sha256 mismatch: damaged bytes)"
                except FileNotFoundError:
                    return f"{name} is missing"
                except OSError as error:
                    return f"{name} is unreadable ({_first_line(error)})"
            return None
        for name in _files_under(step_dir):
            try:
                with open(os.path.join(step_dir, name), "rb") as f:
                    while f.read(1 << 20):
                        pass
            except OSError as error:
                return f"{name} is unreadable ({_first_line(error)})"
        return None

    def _has_checksums(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self._step_dir(step), CHECKSUM_FILE))

    def _write_checksums(self, step: int) -> None:
        step_dir = self._step_dir(step)
        files = {}
        for name in _files_under(step_dir):
            path = os.path.join(step_dir, name)
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        path = os.path.join(step_dir, CHECKSUM_FILE)
        temporary = path + ".tmp"
        try:
            with open(temporary, "w") as f:
                json.dump({"format": 1, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def _corrupt(self, step: int, cause: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {self._step_dir(step)} is corrupt: {cause}", step, cause)

    def move_aside(self, step: int) -> str:
        """Moves step `step` to RUN_DIR/checkpoints.corrupt/<step> (another name if taken), where orbax
        no longer sees it; returns the new path."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        target = os.path.join(self.corrupt_directory, str(step))
        if jax.process_index() == 0:
            suffix = 1
            while os.path.exists(target):
                suffix += 1
                target = os.path.join(self.corrupt_directory, f"{step}.{suffix}")
            try:
                os.makedirs(self.corrupt_directory, exist_ok=True)
                os.rename(self._step_dir(step), target)
            except OSError as error:
                raise CheckpointError(
                    f"checkpoint {self._step_dir(step)} is corrupt and could not be moved to {target} "
                    f"({_first_line(error)}); move or delete it by hand, then run again") from error
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"flaxen checkpoint {step} moved aside")
        self.manager.reload()
        return target

    @staticmethod
    def _difference(saved, name: str, target) -> str | None:
        """How the saved item `name` (its orbax metadata) differs from `target` (paths and shapes), or None."""
        ours = {variable_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
        theirs = {variable_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
        if name == "opt_state":  # optax state containers flatten differently once saved: compare shapes only
            ours, theirs = sorted(ours.values()), sorted(theirs.values())
            return None if ours == theirs else f"its optimizer state has {len(theirs)} arrays, this one {len(ours)}"
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                return (f"parameter {'.'.join(key)} has shape {theirs.get(key, 'missing')} there, "
                        f"{ours.get(key, 'missing')} in this model")
        return None

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
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=clean, force=True)
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                self._write_checksums(step)
        except Exception as error:
            storage = StorageError.os_error_in(error) is not None or isinstance(error, OSError)
            if step not in self._finished_steps():
                self._remove_unfinished_saves(step)
            self.manager.reload()
            if not storage:
                raise
            good = self.latest_step()
            raise StorageError.from_exception(
                error, self.directory, f"checkpoint step {step}",
                advice=(f"The last good checkpoint is {self._step_dir(good)}" if good is not None
                        else "No checkpoint was saved") + "; free space (or fix the permissions), then run the same "
                "command to resume") from error

    def _finished_steps(self) -> set[int]:
        if not os.path.isdir(self.directory):
            return set()
        return {int(name) for name in os.listdir(self.directory) if name.isdigit()}

    def _item_names(self, step: int) -> set[str]:
        step_dir = os.path.join(self.directory, str(step))
        return {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}

    def restore(self, step: int, *, params, opt_state=None, rest=None, meta: bool = True,
                data: bool = True) -> dict[str, Any]:
        """Restores `step` onto abstract targets (jax.ShapeDtypeStruct pytrees with shardings).

        Only the items given (or flagged) are read; `opt_state=None` restores parameters only.
        A damaged step raises CorruptCheckpointError; one that does not fit the targets CheckpointError.
        """
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}")
        problem = self.verify(step)
        if problem is not None:
            raise self._corrupt(step, problem)
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
        intact = self._has_checksums(step)
        try:
            # a model that does not fit is told from damage before restoring (orbax's own errors mix both)
            for name in ARRAY_ITEMS:
                if name in items:
                    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(step), name))
                    difference = self._difference(saved, name, wanted[name])
                    if difference is not None:
                        raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model "
                                              f"being restored: {difference}")
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            if intact:
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} does not match the model being restored: {error}") from error
            raise self._corrupt(step, f"restoring it failed ({_first_line(error)})") from error
        except Exception as error:  # TensorStore / orbax read errors
            raise self._corrupt(step, f"restoring it failed ({_first_line(error)})") from error
        return {name: restored[name] for name in items}

    def restore_latest_good(self, *, params, opt_state=None, rest=None, log=print) -> tuple[int, dict] | None:
        """(step, `restore(...)` of it) for the newest intact step, or None when there is no step.

        Each damaged newer step is moved aside (see `move_aside`) with a message naming the step and
        the cause; CheckpointError naming every step's cause when none is intact. A checkpoint that
        does not fit the model raises CheckpointError at once (nothing is moved)."""
        causes = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.restore(step, params=params, opt_state=opt_state, rest=rest)
            except CorruptCheckpointError as error:
                where = self.move_aside(step)
                log(f"checkpoint step {step} is corrupt ({error.cause}); moved {self._step_dir(step)} to {where} "
                    "(kept for inspection)")
                causes.append(f"step {step}: {error.cause}")
        if causes:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: " + "; ".join(causes) + f". They were moved to "
                f"{self.corrupt_directory}; running the same command again starts the run from step 0")
        return None

    def restore_arrays(self, step: int, items: tuple[str, ...] = ("params", "rest")) -> dict[tuple[str, ...], Any]:
        """The arrays of `items` at `step` without a target, keyed by variable path
        (('backbone', 'layers', '0', 'attention', 'query', 'kernel'), ...): restores whatever
        split (trainable / frozen) the run used."""
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}")
        problem = self.verify(step)
        if problem is not None:
            raise self._corrupt(step, problem)
        present = [name for name in items if name in self._item_names(step)]
        # Targets on this process's first device, from the saved shapes: a checkpoint written on
        # any mesh or device count restores here (without a target orbax insists on the saving topology).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            metadata = self.manager.item_metadata(step)
            targets = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                                          metadata[name]) for name in present}
            restored = self.manager.restore(
                step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(targets[name]) for name in present}))
        except Exception as error:  # no target to mismatch: any failure is damage
            raise self._corrupt(step, f"restoring it failed ({_first_line(error)})") from error
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
