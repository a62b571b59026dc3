"""Run outputs a researcher watches: metrics.jsonl, TensorBoard events and the progress bar.

Why: one writer sends every logged row to both sinks, so the JSON lines (for scripts) and
TensorBoard (for eyes) never disagree. tensorboardX writes event files without TensorFlow.

- `MetricsWriter(run_dir, tensorboard=True)`: `write(step, {"loss": ..., "validation/f1": ...})`
  appends `{"step": step, ...}` to <run_dir>/metrics.jsonl and adds each scalar to TensorBoard
  under its key (train rows are prefixed `train/` there).
- `ProgressBar(total, initial)`: tqdm with loss, learning rate and tokens/s in its postfix.
- `write_json(path, obj)`: atomic JSON write (temporary file, then rename).
- `peak_memory()`: the accelerator's peak bytes in use where the backend reports it, else this
  process's peak resident memory (results.json records it).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

from tqdm.auto import tqdm


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


def write_json(path: str, obj) -> None:
    """Writes `obj` as indented JSON to `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
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
