"""Run outputs a researcher watches: metrics.jsonl, TensorBoard events, a W&B run and the progress bar.

Why: one writer sends every logged row to every sink, so the JSON lines (for scripts),
TensorBoard and Weights & Biases (for eyes) never disagree. tensorboardX writes event files
without TensorFlow; wandb (the `wandb` extra) is imported only when a run asks for it.

- `MetricsWriter(run_dir, loggers=("tensorboard",), config=cfg, start_step=0)`:
  `write(step, {"loss": ..., "validation/f1": ...})` appends `{"step": step, ...}` to
  <run_dir>/metrics.jsonl (always) and sends each numeric scalar to the `loggers` (LOGGERS:
  tensorboard, wandb) under its key, train rows (keys without `/`) prefixed `train/`, at `step`.
  `close()` closes the sinks (the W&B run is finished). Only an `enabled` writer (process 0)
  writes anything.
- The W&B sink (`loggers` holds wandb): `wandb.init` with `dir=run_dir` (offline files land in
  RUN_DIR/wandb/), the config `cfg` resolved plus `git_commit` (also in the run summary), name
  `<experiment_name>/<run directory name>`, group `experiment_name`, project `wandb_project`
  (null: WANDB_PROJECT, else "flaxen"), entity `wandb_entity` (null: WANDB_ENTITY / wandb's
  default) and `resume="allow"` with the id kept in RUN_DIR/wandb_id, so a resumed flaxen run
  continues its W&B run. A start at step 0 (a new run, or a restart without checkpoint) takes a
  new id. WANDB_MODE=offline needs no network or account (`wandb sync RUN_DIR/wandb/offline-run-*`
  uploads later).
- `ProgressBar(total, initial)`: tqdm with loss, learning rate and tokens/s in its postfix.
- `write_json(path, obj)` / `write_text(path, text)`: atomic writes (temporary file, then rename);
  `append_jsonl(path, row)`: one JSON line appended (commands.jsonl).
- `truncate_metrics(run_dir, step)`: on resume, drops what a run logged past the checkpoint it
  resumes from, so no step is listed twice: metrics.jsonl rows with a larger step (and a torn last
  line) are dropped, by rewriting the file atomically; a TensorBoard event file with such steps
  is moved into tensorboard/superseded/ and replaced by a copy of its records up to `step`. Event
  files are append-only record streams (records cannot be removed in place) and TensorBoard reads
  every events file of a directory as one run, so a superseded file left in place would draw
  both the old and the resumed curve over the same steps. Moved into a subdirectory, the old
  points stay available and TensorBoard shows them as a separate run named `superseded`.
  W&B history cannot be truncated: online, a resumed W&B run continues after the last step it
  holds, and wandb drops (with a warning: "Tried to log to step N that is less than the current
  step M") the resumed start's points at steps up to the last step the earlier start logged, so
  between the checkpoint and that step W&B keeps the earlier start's points while metrics.jsonl
  and TensorBoard hold the resumed start's. Offline, each start writes its own
  RUN_DIR/wandb/offline-run-<time>-<id>/ directory with the same id; the resumed start's history
  there begins right after the checkpoint step.
- `git_commit()`: the commit flaxen's checkout is at (None outside a git checkout of flaxen).
- `peak_memory()`: the accelerator's peak bytes in use where the backend reports it, else this
  process's peak resident memory (results.json records it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
import subprocess
import sys
import tempfile

from tqdm.auto import tqdm

from flaxen.errors import ConfigError, StorageError

LOGGERS = ("tensorboard", "wandb")  # the `loggers` choices; metrics.jsonl is always written
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # flaxen's checkout (setup.cfg's folder)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def peak_memory() -> dict:
    """{"bytes": ..., "kind": ...}: device peak bytes in use (GPU/TPU), else the process's peak RSS."""
    import resource

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"bytes": int(stats["peak_bytes_in_use"]), "kind": f"{jax.default_backend()} peak bytes in use"}
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "kind": "host peak RSS"}


def git_commit() -> str | None:
    """`git rev-parse HEAD` of flaxen's checkout; None when flaxen is not a git checkout's top level
    (an installed copy inside some other repository must not report that repository's commit)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        if os.path.realpath(top) != os.path.realpath(ROOT):
            return None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def _writing(path: str):
    """Turns an operating-system error (disk full, read-only file system, permission denied)
    while writing `path` into one StorageError naming the path and the errno."""
    try:
        yield
    except OSError as error:
        raise StorageError.from_exception(error, path) from error


def _mode_of(path: str) -> int:
    """The permission bits `path` has (a file being replaced keeps them), else rw-r--r--."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o644


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (a temporary file, then a rename). An operating-system
    error raises StorageError naming `path` and the errno; the previous file, if any, is left as
    it was and no temporary file stays behind."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    with _writing(path):
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, _mode_of(path))
            os.replace(tmp, path)
        except OSError:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            raise


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON to `path` atomically (see write_text)."""
    write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def append_jsonl(path: str, row: dict) -> None:
    """Appends `row` as one JSON line to `path` (StorageError naming the path on an OS error)."""
    with _writing(path), open(path, "a") as f:
        f.write(json.dumps(_jsonable(row)) + "\n")


def _step_of_line(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _event_records(path: str) -> list[tuple[bytes, int]]:
    """(raw TFRecord, event step) of an event file; a torn last record is left out. A record:
    uint64 length, uint32 masked CRC of it, the serialized Event, uint32 masked CRC of that."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    records, offset = [], 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        end = offset + 12 + length + 4
        if end > len(data):
            break
        records.append((data[offset:end], event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]).step))
        offset = end
    return records


def _truncate_events(directory: str, step: int) -> int:
    """Event files of `directory` with events past `step`: moved to directory/superseded/ and
    replaced by their records up to `step`. Returns how many were moved."""
    if not os.path.isdir(directory):
        return 0
    moved = 0
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith("events.out.tfevents") or not os.path.isfile(path):
            continue
        records = _event_records(path)
        if all(event_step <= step for _, event_step in records):
            continue
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(record for record, event_step in records if event_step <= step))
        os.chmod(tmp, _mode_of(path))
        superseded = os.path.join(directory, "superseded")
        os.makedirs(superseded, exist_ok=True)
        target, copy = os.path.join(superseded, name), 1
        while os.path.exists(target):
            target, copy = os.path.join(superseded, f"{name}.{copy}"), copy + 1
        os.replace(path, target)
        os.replace(tmp, path)
        moved += 1
    return moved


def truncate_metrics(run_dir: str, step: int) -> tuple[int, int]:
    """Drops what was logged after `step` (see the module docstring); returns (metrics.jsonl rows
    dropped, TensorBoard event files superseded)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    dropped = 0
    if os.path.isfile(path):
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:  # a line without its newline is a write torn by a crash
            row_step = _step_of_line(line) if line.endswith("\n") else None
            if row_step is not None and row_step <= step:
                kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            write_text(path, "".join(kept))
    board = os.path.join(run_dir, "tensorboard")
    with _writing(board):
        return dropped, _truncate_events(board, step)


def check_loggers(loggers) -> list[str]:
    """`loggers` as a list of names; ConfigError naming the key for a name outside LOGGERS, a name
    given twice, or wandb without its package."""
    names = [] if loggers is None else [loggers] if isinstance(loggers, str) else list(loggers)
    choices = ", ".join(LOGGERS)
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"loggers={names}: {name!r} is not a logger; expected a list of {choices} "
                              "(e.g. loggers=[tensorboard,wandb]; loggers=[] writes only metrics.jsonl)")
        if names.count(name) > 1:
            raise ConfigError(f"loggers={names}: {name!r} is listed twice; expected each of {choices} at most once")
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("loggers includes wandb but the wandb package is not installed: "
                              "pip install 'flaxen[wandb]' (or pip install -e \".[wandb]\" in a checkout)")
    return names


def _scalars(row: dict) -> dict:
    """{tag: value} of a metrics row's numbers (not booleans, not the step): a key without `/` (a
    train row's) becomes train/<key>; an evaluation's <split>/<metric> stays as it is."""
    return {key if "/" in key else f"train/{key}": value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


WANDB_ID_FILE = "wandb_id"  # RUN_DIR/wandb_id: the W&B run id a resumed flaxen run continues


def _new_wandb_id() -> str:
    import secrets

    return "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))


class _WandbRun:
    """The W&B sink of MetricsWriter (see the module docstring); MetricsWriter's check_loggers has
    made sure the wandb package is there."""

    def __init__(self, run_dir: str, config, start_step: int):
        import wandb
        from omegaconf import DictConfig, OmegaConf

        values = (OmegaConf.to_container(config, resolve=True, throw_on_missing=False)
                  if isinstance(config, DictConfig) else dict(config or {}))
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = None
        if start_step > 0 and os.path.isfile(id_path):
            with _writing(id_path), open(id_path) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = _new_wandb_id()
            write_text(id_path, run_id + "\n")
        commit = git_commit()
        experiment = str(values.get("experiment_name") or "default")
        directory = os.path.basename(os.path.normpath(run_dir))
        project = values.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "flaxen"
        try:
            self.run = wandb.init(
                project=project, entity=values.get("wandb_entity"), dir=run_dir, id=run_id, resume="allow",
                name=experiment if directory == experiment else f"{experiment}/{directory}", group=experiment,
                job_type="train", config={**values, "git_commit": commit})
        except wandb.errors.Error as error:
            raise ConfigError(f"loggers includes wandb but W&B could not start a run ({error}): log in (wandb login, "
                              "or WANDB_API_KEY), or set WANDB_MODE=offline to log without a network") from error
        if commit is not None:
            self.run.summary["git_commit"] = commit

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)  # rows of one step (train, evaluation) merge into one

    def close(self) -> None:
        failed = sys.exc_info()[0] is not None  # closed while an error propagates: W&B marks the run failed
        self.run.finish(exit_code=1 if failed else 0)


class MetricsWriter:
    """metrics.jsonl plus the `loggers` sinks (see the module docstring). `config`: the run's config
    (W&B records it); `start_step`: the step this start resumes from (0: a new W&B run)."""

    def __init__(self, run_dir: str, *, loggers=("tensorboard",), enabled: bool = True, config=None,
                 start_step: int = 0):
        loggers = check_loggers(loggers)
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tensorboard = None
        self.wandb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if "tensorboard" in loggers:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            if "wandb" in loggers:
                try:
                    self.wandb = _WandbRun(run_dir, config, start_step)
                except BaseException:
                    self.close()
                    raise

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **_jsonable(row)}
        size = None
        try:
            with open(self.path, "a") as f:
                size = f.tell()
                f.write(json.dumps(row) + "\n")
        except OSError as error:
            if size is not None:  # no half-written line stays behind (a truncation needs no space)
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
            raise StorageError.from_exception(error, self.path, f"the metrics of step {int(step)}") from error
        scalars = _scalars(row)
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, int(step))
            self.tensorboard.flush()
        if self.wandb is not None and scalars:
            self.wandb.log(int(step), scalars)

    def close(self) -> None:
        """Closes the sinks; a second call does nothing."""
        tensorboard, self.tensorboard = self.tensorboard, None
        wandb_run, self.wandb = self.wandb, None
        try:
            if tensorboard is not None:
                tensorboard.close()
        finally:
            if wandb_run is not None:
                wandb_run.close()


class ProgressBar:
    """A tqdm bar over training steps; `update(step, loss=, lr=, tokens_per_s=)` at log steps."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                        desc="train", unit="step", file=sys.stderr)
        self.position = initial

    def update(self, step: int, *, loss: float | None = None, lr: float | None = None,
               tokens_per_s: float | None = None) -> None:
        self.bar.update(step - self.position)
        self.position = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
