"""Run outputs a researcher watches: metrics.jsonl, TensorBoard events and the progress bar.

Why: one writer sends every logged row to both sinks, so the JSON lines (for scripts) and
TensorBoard (for eyes) never disagree. tensorboardX writes event files without TensorFlow.

- `MetricsWriter(run_dir, tensorboard=True)`: `write(step, {"loss": ..., "validation/f1": ...})`
  appends `{"step": step, ...}` to <run_dir>/metrics.jsonl and adds each scalar to TensorBoard
  under its key (train rows are prefixed `train/` there).
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
import sys
import tempfile

from tqdm.auto import tqdm

from flaxen.errors import StorageError


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


class MetricsWriter:
    def __init__(self, run_dir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tensorboard = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))

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
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, int(step))
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


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
