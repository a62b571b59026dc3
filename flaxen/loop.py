"""The training loop: config in, trained checkpoints, metrics and results.json out.

Why one function: a researcher reads it top to bottom. Sections: mesh, data, model, state,
step, checkpoint (resume), loop, end. Everything is decided once at start-up; the loop only
feeds batches, logs, evaluates and saves.

`train(cfg, trainable_filter=None, should_stop=None) -> results dict`
- `cfg`: the composed TrainConfig (flaxen.config); outputs go to `cfg.run_dir`.
- `trainable_filter`: an nnx filter for the parameters that train; everything else becomes
  the frozen `rest` (no gradients, no optimizer state). None: from `cfg.peft`
  (models.peft.trainable_filter: every parameter for peft=none, else the PEFT parameters and
  the task head, plus what the method trains in full).
- `should_stop(step) -> bool`: checked after every step; True saves a checkpoint and returns
  (as does Ctrl-C / SIGTERM).
- `task_data`: an object with flaxen.data's TaskData surface to use instead of loading `cfg.data`
  (in-memory data in notebooks and tests). Re-running on the same run directory resumes from the latest
  checkpoint exactly (parameters, optimizer state, step, RNG, data position).
Raises `NonFiniteLossError` when the loss or gradient norm is NaN/Inf; checkpoints are only
written after a finiteness check, so the last good one survives.

A run directory cannot be damaged by a second command (`RunDirectory`):
- One training process at a time: process 0 holds RUN_DIR/.lock for the whole run
  (flaxen.runlock); a second start fails naming the holder's host, pid and start time.
- The config is recorded once. A start on a directory with a checkpoint is a resume: its config
  is compared with the saved config.yaml before anything is written, and a change to any key
  outside SAFE_ON_RESUME (the model, task, data, mesh, peft, optimizer, schedule, batch sizes,
  seed, init_from, evaluation split and metric, ...) is refused with one ConfigError listing
  `key: old -> new`. SAFE_ON_RESUME holds what changes when and how long the run trains, logs,
  evaluates and keeps checkpoints, and where it finds its files, never what one step computes:
  steps, epochs, eval_every, eval_batches, eval_batch_size, checkpoint_every, keep_checkpoints,
  log_every, early_stopping_patience, progress_bar, loggers, wandb_project, wandb_entity,
  experiment_name (a label), data_dir, run_dir (a moved directory), data.prepared_dir (prepared
  data is keyed by content), data.loader_threads (prefetching only) and distributed.* (how
  processes find each other) and compilation_cache_dir (flaxen.compilation: where compiled
  programs are kept, never what they compute). A saved config.yaml's retired keys are read as
  their replacements (config.load_saved: `tensorboard` as `loggers`).
  config.yaml keeps the first start's values; every start appends one JSON line to
  commands.jsonl: {"time", "host", "pid", "argv", "start": new | restart | resume,
  "changed": {key: [saved, this start's]}}. A directory without a checkpoint holds no state
  to protect: a new start there ("restart") replaces its config.
- Everything checkable is checked before the first step and before the directory is written
  (`_check_data`): data_dir exists, the train split and eval_split exist and are not empty,
  best_metric is a metric the task's evaluation gives, task.num_labels matches the data's
  labels, and a resume's data has the labels (and vocabulary) of the run's model.json.
- Ctrl-C / SIGTERM save a checkpoint and return {"status": "interrupted", "steps": N,
  "signal": "SIGINT" | "SIGTERM"}; train.py then exits with `exit_code(results)`: 130 / 143.
- A resume drops what an earlier start logged after the restored step (metrics.jsonl rows,
  TensorBoard events: flaxen.logging.truncate_metrics), so no step is listed twice. A W&B run
  (loggers=[..., wandb]) continues under the id in RUN_DIR/wandb_id; W&B cannot drop points (see
  flaxen.logging).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flaxen import checkpoint as checkpointing
from flaxen import compilation
from flaxen import config as config_lib
from flaxen import distributed
from flaxen import evaluate as evaluation
from flaxen import logging as run_logging
from flaxen import modeling, privacy, pruning, runlock, sharding, state, tasks
from flaxen.errors import ConfigError, DataError, FlaxenError
from flaxen.state import RNG_IMPL
from models import peft


# config keys a resume may change (a key covers the keys under it); see the module docstring
SAFE_ON_RESUME = ("steps", "epochs", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every",
                  "keep_checkpoints", "log_every", "early_stopping_patience", "progress_bar", "loggers", "wandb_project",
                  "wandb_entity", "experiment_name", "data_dir", "run_dir", "data.prepared_dir", "data.loader_threads", "distributed",
                  "compilation_cache_dir")


# what a DP-SGD step adds to a metrics.jsonl row (flaxen.steps.make_private_train_step), besides `epsilon`
PRIVATE_STEP_METRICS = ("examples", "clipped_fraction")


class NonFiniteLossError(FlaxenError):
    """The training loss or gradient norm became NaN or Inf."""


def exit_code(results: dict) -> int:
    """train.py's exit status for `results`: 128 + the signal number when a signal interrupted the
    run (130 for SIGINT, 143 for SIGTERM, as a shell reports a process that signal ended), else 0."""
    name = results.get("signal") if results.get("status") == "interrupted" else None
    return 128 + signal.Signals[name].value if name else 0


def best_value(results: dict) -> float | None:
    """The run's best evaluation of its best metric, `results["best_eval"][results["best_metric"]["name"]]`
    (what train.py returns to a hyperparameter sweeper, flaxen.sweep); None for a run that did not
    evaluate (eval_split=null) or was interrupted."""
    best = results.get("best_eval")
    if not best or results["best_metric"]["name"] not in best:
        return None
    return float(best[results["best_metric"]["name"]])


def is_time(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self.signal = None  # the first signal's number
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signal = signum
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again aborts)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Any, *, trainable_filter: Any = None, should_stop: Callable[[int], bool] | None = None,
          task_data: Any = None) -> dict:
    config_lib.validate(cfg)
    distributed.initialize(cfg.get("distributed"))
    compilation.use_cache(cfg.get("compilation_cache_dir"))
    task = tasks.for_run(cfg)
    metric_name, metric_mode = config_lib.best_metric(cfg)
    evaluating = bool(cfg.eval_split)
    with RunDirectory(cfg) as run:  # locked, and a resume's config checked; nothing written yet
        log = run.log

        # ---- mesh ----
        mesh = sharding.make_mesh(cfg.mesh)
        _check_batch_sizes(cfg, mesh)

        # ---- data (checked before the run directory is written) ----
        if task_data is None:
            from flaxen.data import load_task_data

            config_lib.check_data_dir(cfg)
            task_data = load_task_data(cfg.data, task, run.data_dir, tokenizer_path=modeling.tokenizer_path(cfg),
                                       presets=config_lib.data_preset)
        _check_data(cfg, task, task_data, metric_name if evaluating else None)
        # training length: `epochs` gives the steps once the rows of a training epoch are known
        epoch_examples = _epoch_examples(task_data)
        given_steps = cfg.steps
        cfg = config_lib.resolve_epochs(cfg, epoch_examples)
        run.use_config(cfg)
        if cfg.get("epochs") is not None:
            log(f"epochs={cfg.epochs}: {epoch_examples} train examples per epoch at batch {cfg.batch_size} -> "
                f"{cfg.steps} steps" + (f" (the config's steps={given_steps} is not used)" if given_steps is not None else ""))
        # DP-SGD (flaxen.privacy): noise multiplier, sampling rate, delta and batch rows, decided once
        private = privacy.plan(cfg, task_data.num_examples("train"), sharding.batch_divisor(mesh) * jax.process_count())
        _check_private_resume(cfg, run)
        run.start(task_data)
        if private is not None and private.sampling == "poisson":
            train_loader = task_data.poisson_loader("train", rate=private.sampling_rate, max_rows=private.max_rows,
                                                    seed=cfg.seed, process_index=jax.process_index(),
                                                    process_count=jax.process_count())
        else:
            train_loader = task_data.loader("train", cfg.batch_size // jax.process_count(), seed=cfg.seed, train=True,
                                            process_index=jax.process_index(), process_count=jax.process_count())
        baselines = task.baselines(task_data)
        if "unigram_entropy" in baselines:
            log(f"train split unigram entropy: {baselines['unigram_entropy']:.4f} nats/token "
                "(a context-free model's loss)")

        # ---- model and sharded state ----
        model, spec = modeling.build(cfg, task_data, log=log)
        run.write_spec(spec)
        trainable_filter = peft.trainable_filter(model) if trainable_filter is None else trainable_filter
        counts = peft.parameter_counts(model, trainable_filter)
        setup = state.from_config(cfg, model, mesh=mesh, trainable_filter=trainable_filter, privacy=private)
        rows_per_step = cfg.batch_size if private is None else private.max_rows  # Poisson: rows incl. padding
        del model
        log(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable "
            f"({counts['trainable_percent']:.2f}%, peft={spec.peft['name']}); mesh {dict(mesh.shape)}; "
            f"batch {rows_per_step} = {setup.accum_steps} x {rows_per_step // setup.accum_steps}")
        if private is not None:
            log(private.describe())

        # ---- checkpoint (resume) ----
        ckpt = checkpointing.Checkpointer(os.path.join(run.path, "checkpoints"), keep=cfg.keep_checkpoints,
                                          best_metric=(metric_name, metric_mode) if evaluating else None)
        current = _start_state(cfg, setup, ckpt, train_loader, log)
        step = int(current.meta["step"])
        if step >= cfg.steps and run.finished():
            ckpt.close()
            return run.finished_results(step)
        run.open_metrics(step)  # drops what an earlier start logged after `step`

        # ---- loop ----
        bar = run_logging.ProgressBar(cfg.steps, initial=step, enabled=run.is_main and cfg.progress_bar)
        interval = _Interval(ckpt)
        status, last_eval, last_eval_step, first_step = "completed", None, None, step + 1
        wall_start = time.perf_counter()
        with _StopRequest() as stop_request:
            try:
                while step < cfg.steps:
                    batch = next(train_loader)
                    if private is not None and getattr(train_loader, "last_drawn", 0) > private.max_rows:
                        log(f"step {step + 1}: the Poisson sample drew {train_loader.last_drawn} examples, more "
                            f"than the batch's {private.max_rows} rows; a random {private.max_rows} of them train")
                    current.params, current.opt_state, step_metrics = setup.train_step(
                        current.params, current.opt_state, current.rest, setup.put_batch(batch), np.int32(step),
                        current.rng)
                    step += 1
                    interval.add(step, step_metrics, batch, first=step == first_step, log=log)
                    bar.update(step)
                    last = step == cfg.steps
                    stopping = stop_request.requested or (should_stop is not None and should_stop(step))
                    do_eval = evaluating and (is_time(step, cfg.eval_every) or last)
                    do_save = is_time(step, cfg.checkpoint_every) or last or stopping
                    if is_time(step, cfg.log_every) or do_eval or do_save:
                        row = interval.flush(step, current.meta)
                        if private is not None:
                            row["epsilon"] = private.epsilon(step)
                        run.writer.write(step, row)
                        bar.update(step, loss=row["loss"], lr=row["learning_rate"], tokens_per_s=row["tokens_per_s"])
                    with interval.paused():
                        new_best = None
                        if do_eval:
                            last_eval = _evaluate(cfg, setup, current, task_data, run.writer, step)
                            last_eval_step = step
                            bar.write(f"step {step}: " + ", ".join(
                                f"{cfg.eval_split}/{k} {v:.4g}" for k, v in last_eval.items() if isinstance(v, float)))
                            if _record_eval(current.meta, last_eval, step, metric_name, metric_mode):
                                do_save, new_best = True, last_eval
                            elif _patience_exhausted(cfg, current.meta):
                                status, stopping, do_save = "early_stopping", True, True
                                bar.write(f"early stopping: {metric_name} has not improved in "
                                          f"{cfg.early_stopping_patience} evaluations")
                        if do_save:
                            _save(ckpt, step, current, train_loader, metric_name, new_best)
                    if stopping:
                        status = "early_stopping" if status == "early_stopping" else "interrupted"
                        break
            finally:
                bar.close()
                run.writer.close()

        # ---- end ----
        if status == "interrupted":
            ckpt.close()
            log(f"stopped at step {step}; checkpoint saved in {ckpt.directory}. Run the same command to resume.")
            return _interrupted(step, stop_request.signal)
        if evaluating and last_eval_step != step:
            last_eval = _evaluate(cfg, setup, current, task_data, None, step)
        results = _results(cfg, status, step, current, last_eval, (metric_name, metric_mode), evaluating,
                           time.perf_counter() - wall_start, counts, spec, baselines, ckpt)
        if private is not None:
            results["privacy"] = private.record(step, truncated_batches=getattr(train_loader, "truncated_batches", 0),
                                                dropped_rows=getattr(train_loader, "dropped_rows", 0))
        results["train_length"] = config_lib.train_length(cfg, epoch_examples)
        if hasattr(task_data, "train_summary"):
            results["train_data"] = task_data.train_summary()
        pruned = pruning.record(cfg, current.params)  # gradual pruning: the final sparsity
        if pruned is not None:
            results["prune"] = pruned
        ckpt.close()
        run.write_results(results)
        return results


# ---------------------------------------------------------------------- helpers of train()


class RunDirectory:
    """The run directory's bookkeeping (see the module docstring), in the order train() uses it:

    - `RunDirectory(cfg)` (a context manager): takes the lock and compares this start's config with
      the saved config.yaml (`kind`: new | restart | resume; a resume's unsafe changes raise
      ConfigError). Nothing is written but the lock file.
    - `start(task_data)`, once the start-up checks passed: config.yaml / config.json on the first
      start only, a commands.jsonl line, the tokenizer.
    - `open_metrics(step)` at the restored step: trims metrics.jsonl / TensorBoard, opens `writer`.
    - `write_spec`, `finished`, `finished_results`, `write_results`.
    - `close()` on every way out: closes the writer, releases the lock and removes the directory
      again when this start created it and left nothing in it.
    Only process 0 locks and writes; the other processes stop with it when it refuses to start."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.path = os.path.abspath(os.path.expanduser(cfg.run_dir))
        self.data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
        self.is_main = jax.process_index() == 0
        self.log = print if self.is_main else (lambda *a, **k: None)
        self.writer = None
        self.lock = runlock.RunLock(self.path, log=self.log)
        self.created = self.is_main and not os.path.exists(self.path)
        self.kind, self.changes, self.write_config = "new", {}, True
        try:
            self._on_process_0(self._lock_and_compare)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_process_0(self, work: Callable[[], None]) -> None:
        """Runs `work` in process 0 only; when it fails there, every process raises (a
        multi-process run stops together instead of waiting for process 0 at a collective)."""
        failure = None
        if self.is_main:
            try:
                work()
            except Exception as error:
                failure = error
        if not _process_0_succeeded(failure is None) and failure is None:
            failure = FlaxenError(f"process 0 could not start the run in {self.path} (see its error)")
        if failure is not None:
            raise failure

    def _lock_and_compare(self) -> None:
        self.lock.acquire()
        self._compare_config()

    def _compare_config(self) -> None:
        """Sets `kind`, `changes` ({key: (saved, new)}) and `write_config`; refuses a resume whose
        config differs outside SAFE_ON_RESUME."""
        saved = os.path.join(self.path, "config.yaml")
        checkpoints = os.path.join(self.path, "checkpoints")
        resumable = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
        if not os.path.isfile(saved):
            self.kind = "resume" if resumable else "new"
            if resumable:
                self.log(f"warning: {self.path} has checkpoints but no config.yaml; recording this command's config")
            return
        try:
            self.changes = _config_changes(config_lib.load_saved(saved), self.cfg)
        except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
            raise ConfigError(f"{saved} cannot be read ({error}); it records the run in {self.path}: restore it, "
                              "or train in another run directory (hydra.run.dir=PATH)") from error
        if not resumable:
            self.kind = "restart"
            if self.changes:
                self.log(f"{self.path} holds no checkpoint: this start replaces its config.yaml")
            return
        self.kind, self.write_config = "resume", False
        refused = {key: change for key, change in self.changes.items() if not _safe_on_resume(key)}
        if refused:
            listed = "".join(f"  {_format_change(key, *change)}\n" for key, change in refused.items())
            safe = ", ".join("distributed.*" if key == "distributed" else key for key in SAFE_ON_RESUME)
            raise ConfigError(
                f"{self.path} holds a run started with a different config; resuming it with this command would "
                f"change:\n{listed}Only {safe} may change on resume. To start a new run, give it another run "
                f"directory (hydra.run.dir=PATH; run_dir=PATH from Python) or delete {self.path}; to resume it, "
                f"use its own config ({saved}).")

    def use_config(self, cfg: Any) -> None:
        """Takes `cfg` with its steps resolved from `epochs` (config.resolve_epochs): config.yaml
        records them, and a resume's `steps` change is between the saved and the resolved count."""
        if cfg is self.cfg:
            return
        self.cfg = cfg
        if "steps" in self.changes:
            saved = self.changes.pop("steps")[0]
            if saved != cfg.steps:
                self.changes["steps"] = (saved, cfg.steps)

    def start(self, task_data: Any) -> None:
        """Records this start (after the start-up checks passed): config.yaml and config.json when
        the directory has no run to resume, a line in commands.jsonl, the tokenizer when the run has
        none yet. A resume first checks that the data has the labels and vocabulary of model.json."""
        self._on_process_0(lambda: self._record_start(task_data))

    def _record_start(self, task_data: Any) -> None:
        if self.kind == "resume":
            self._check_resumed_data(task_data)
        if self.write_config:
            run_logging.write_json(os.path.join(self.path, "config.json"), config_lib.to_container(self.cfg))
            run_logging.write_text(os.path.join(self.path, "config.yaml"), OmegaConf.to_yaml(self.cfg, resolve=True))
        me = runlock.holder_record()
        run_logging.append_jsonl(os.path.join(self.path, "commands.jsonl"), {
            "time": me["started"], "host": me["host"], "pid": me["pid"], "argv": list(sys.argv), "start": self.kind,
            "changed": {key: list(change) for key, change in self.changes.items()}})
        if "steps" in self.changes and self.kind == "resume" and self.cfg.schedule.name != "constant":
            self.log(f"steps: {self.changes['steps'][0]} -> {self.cfg.steps}: the {self.cfg.schedule.name} learning-"
                     f"rate schedule now ends at step {self.cfg.steps}, so it differs from the saved run's from here")
        tokenizer = getattr(task_data, "tokenizer", None)
        saved_tokenizer = os.path.join(self.path, modeling.TOKENIZER_DIR, "tokenizer.json")
        if tokenizer is not None and (self.kind != "resume" or not os.path.isfile(saved_tokenizer)):
            modeling.write_tokenizer(self.path, tokenizer)

    def _check_resumed_data(self, task_data: Any) -> None:
        path = os.path.join(self.path, modeling.MODEL_FILE)
        if not os.path.isfile(path):
            return
        spec = modeling.read_spec(self.path)
        labels = getattr(task_data, "label_names", None)
        if spec.label_names is not None and labels is not None and list(labels) != list(spec.label_names):
            raise DataError(f"the data's labels ({', '.join(map(str, labels))}) are not the labels the run in "
                            f"{self.path} was trained with ({', '.join(map(str, spec.label_names))}, {path}): "
                            "its data files changed. Train on the changed data in another run directory "
                            "(hydra.run.dir=PATH)")
        tokenizer = getattr(task_data, "tokenizer", None)
        if self.cfg.model.pretrained is None and tokenizer is not None and \
                tokenizer.vocab_size != spec.config.vocab_size:
            raise DataError(f"the data's tokenizer has {tokenizer.vocab_size} ids but the run in {self.path} was "
                            f"trained with {spec.config.vocab_size} ({path}): its data or tokenizer changed. Train "
                            "on them in another run directory (hydra.run.dir=PATH)")

    def open_metrics(self, step: int) -> None:
        """Opens `writer` (metrics.jsonl, cfg.loggers) after dropping what was logged past `step`."""
        if self.is_main:
            dropped, moved = run_logging.truncate_metrics(self.path, step)
            if dropped or moved:
                self.log(f"resuming at step {step}: dropped {dropped} metrics.jsonl rows logged after it"
                         + (f"; moved {moved} TensorBoard event files to tensorboard/superseded/" if moved else ""))
        self.writer = run_logging.MetricsWriter(self.path, loggers=self.cfg.loggers, enabled=self.is_main,
                                                config=self.cfg, start_step=step)

    def write_spec(self, spec: modeling.ModelSpec) -> None:
        if self.is_main:
            modeling.write_spec(self.path, spec)

    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "results.json"))

    def finished_results(self, step: int) -> dict:
        self.log(f"{self.path} already finished {step} steps; its results.json is kept (delete the directory to "
                 "retrain)")
        with open(os.path.join(self.path, "results.json")) as f:
            return json.load(f)

    def write_results(self, results: dict) -> None:
        path = os.path.join(self.path, "results.json")
        if self.is_main:
            run_logging.write_json(path, results)
        self.log(f"done: {results['steps']} steps; results in {path}")
        self.log(f"evaluate with: python eval.py {config_lib.shell_override('run_dir', self.path)} "
                 f"split={self.cfg.eval_split or 'validation'}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.lock.release()
        if self.created and os.path.isdir(self.path) and not os.listdir(self.path):
            os.rmdir(self.path)


def _process_0_succeeded(ok: bool) -> bool:
    """Process 0's `ok`, in every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _check_data(cfg: Any, task: Any, task_data: Any, metric_name: str | None) -> None:
    """What would otherwise fail mid-run, checked before the first step: the train split and
    eval_split exist and are not empty, `metric_name` (the best metric, None without evaluation)
    is one the task's evaluation gives, and task.num_labels matches the data's label set."""
    splits = getattr(task_data, "splits", None)
    if splits is not None:
        if "train" not in splits:
            raise ConfigError(f"data '{cfg.data.name}' has no train split (its splits: {', '.join(splits)})")
        if cfg.eval_split and cfg.eval_split not in splits:
            raise ConfigError(f"eval_split={cfg.eval_split!r}: the data has splits {', '.join(splits)}")
    for key, split in (("data", "train"), ("eval_split", cfg.eval_split)):
        if split and task_data.num_examples(split) == 0:
            raise DataError(f"{key}: the {split} split of data '{cfg.data.name}' has no {task.name} examples")
    labels = getattr(task_data, "label_names", None)
    if task.labelled and cfg.task.num_labels is not None and labels is not None and \
            cfg.task.num_labels != len(labels):
        raise ConfigError(f"task.num_labels={cfg.task.num_labels}: the data has {len(labels)} labels "
                          f"({', '.join(map(str, labels))})")
    if metric_name is not None:
        produced = task.metric_names(cfg, task_data)
        if metric_name not in produced:
            key = "best_metric" if cfg.best_metric is not None else f"best_metric (task {task.name}'s default)"
            raise ConfigError(f"{key}={metric_name!r}: evaluating {task.name} on this data gives "
                              f"{', '.join(produced)}")


def _epoch_examples(task_data: Any) -> int:
    """Rows of one training epoch (TaskData.epoch_examples; data without it: the train split's rows)."""
    count = getattr(task_data, "epoch_examples", None) or task_data.num_examples
    return int(count("train"))


def _check_private_resume(cfg: Any, run: "RunDirectory") -> None:
    """A resume of a run whose noise multiplier a target epsilon chose for its step budget must
    keep that budget: the same target for other steps is another noise multiplier."""
    if not privacy.enabled(cfg) or cfg.privacy.target_epsilon is None or run.kind != "resume" or \
            "steps" not in run.changes:
        return
    before, after = run.changes["steps"]
    raise ConfigError(f"steps: {before} -> {after}: privacy.target_epsilon={cfg.privacy.target_epsilon} chose the run's "
                      f"noise multiplier for {before} steps, and the steps done used it: keep steps={before} to resume; "
                      "for another budget start a new run (hydra.run.dir=PATH), e.g. with privacy.noise_multiplier "
                      "set and privacy.target_epsilon=null")


def _interrupted(step: int, signum: int | None) -> dict:
    """The results of a run stopped at `step` (by `signum`, or by should_stop when None)."""
    results = {"status": "interrupted", "steps": step}
    if signum is not None:
        results["signal"] = signal.Signals(signum).name
    return results


def _check_batch_sizes(cfg: Any, mesh) -> None:
    micro_batch = cfg.micro_batch_size or cfg.batch_size
    for key, size in (("batch_size", cfg.batch_size), ("micro_batch_size", micro_batch),
                      ("eval_batch_size", cfg.eval_batch_size)):
        if size % (sharding.batch_divisor(mesh) * jax.process_count()):
            raise ConfigError(f"{key}={size} is not divisible by the {sharding.batch_divisor(mesh)} batch shards "
                              f"of the mesh (data x fsdp) times {jax.process_count()} processes")


@dataclasses.dataclass
class _State:
    """What a checkpoint holds besides the data position: parameters, optimizer state, frozen
    variables, the dropout key and `meta` (step, best value and step, counters, init_from record)."""
    params: Any
    opt_state: Any
    rest: Any
    rng: Any
    meta: dict


def _start_state(cfg: Any, setup: state.TrainSetup, ckpt, train_loader, log) -> _State:
    """The latest checkpoint's state (resume, data position included), else the fresh state
    (with `init_from`'s parameters when set)."""
    current = _State(setup.params, setup.opt_state, setup.rest, jax.random.key(cfg.seed, impl=RNG_IMPL),
                     {"step": 0, "best_value": None, "best_step": None, "evals_without_improvement": 0,
                      "tokens": 0, "train_seconds": 0.0, "best_eval": None})
    # the newest intact checkpoint: damaged newer ones are moved aside with a message (flaxen.checkpoint)
    found = ckpt.restore_latest_good(params=modeling.abstract_like(current.params, setup.param_shardings),
                                     opt_state=modeling.abstract_like(current.opt_state, setup.opt_shardings),
                                     rest=modeling.abstract_like(current.rest, setup.rest_shardings), log=log)
    if found is not None:
        start, restored = found
        current.params, current.opt_state = restored["params"], restored["opt_state"]
        current.rest = restored.get("rest", current.rest)
        current.meta.update(restored["meta"])
        current.rng = jax.random.wrap_key_data(np.asarray(current.meta["rng"], np.uint32), impl=RNG_IMPL)
        if "data" in restored:
            train_loader.set_state(restored["data"])
        log(f"resumed from {ckpt.directory}/{start} (step {current.meta['step']})")
    elif cfg.init_from is not None:
        current.params, current.rest, current.meta["init_from"] = _init_from(cfg.init_from, current.params,
                                                                             current.rest, log)
    return current


def _save(ckpt, step: int, current: _State, train_loader, metric_name: str, eval_metrics: dict | None) -> None:
    """Checkpoints `step`; `eval_metrics` only for a new best, so the best checkpoint (the best of
    those saved with metrics) is the first step that reached the best value."""
    if step in ckpt.all_steps():
        return
    current.meta.update(step=step, rng=np.asarray(jax.random.key_data(current.rng)).tolist())
    ckpt.save(step, params=current.params, opt_state=current.opt_state, rest=current.rest, meta=dict(current.meta),
              data=train_loader.get_state(),
              metrics=None if eval_metrics is None else {metric_name: eval_metrics[metric_name]})


def _evaluate(cfg: Any, setup: state.TrainSetup, current: _State, task_data: Any, writer, step: int) -> dict:
    """Metrics of cfg.eval_split at `step`, written to metrics.jsonl and the loggers when `writer` is given."""
    result = evaluation.evaluate(setup.eval_step, current.params, current.rest, task_data, setup.task,
                                 cfg.eval_split, batch_size=cfg.eval_batch_size, batch_sharding=setup.batch_sharding,
                                 max_batches=cfg.eval_batches, task_cfg=cfg.task, graphdef=setup.graphdef,
                                 training=True)
    if writer is not None:
        writer.write(step, evaluation.scalar_metrics(result, cfg.eval_split))
    return result


def _record_eval(meta: dict, result: dict, step: int, metric_name: str, mode: str) -> bool:
    """Updates the best value / step / evaluation in `meta`; True when `result` is a new best."""
    value = result[metric_name]
    if _improved(value, meta["best_value"], mode):
        meta.update(best_value=value, best_step=step, evals_without_improvement=0,
                    best_eval={k: v for k, v in result.items() if k != "report"})
        return True
    meta["evals_without_improvement"] += 1
    return False


def _patience_exhausted(cfg: Any, meta: dict) -> bool:
    patience = cfg.early_stopping_patience
    return patience is not None and meta["evals_without_improvement"] >= patience


class _Interval:
    """Step metrics since the last log row: their mean loss, the tokens and time they took, and
    the NaN guard (a non-finite loss or gradient norm stops the run before anything is saved).
    Time spent evaluating and saving (`paused()`) does not count as training time; the first
    step (compilation) counts neither tokens nor time."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.pending, self.tokens, self.tick = [], 0, time.perf_counter()

    def add(self, step: int, step_metrics: dict, batch: dict, *, first: bool, log) -> None:
        self.pending.append(step_metrics)
        if first:
            jax.block_until_ready(step_metrics)
            log(f"step {step}: compiled and ran the first step in {time.perf_counter() - self.tick:.1f}s")
            self.tick = time.perf_counter()
        else:
            self.tokens += int(np.asarray(batch["input_ids"]).size) * jax.process_count()

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.tick += time.perf_counter() - start

    def flush(self, step: int, meta: dict) -> dict:
        """The log row of the steps up to `step`; adds their tokens and time to `meta`."""
        rows = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.tick
        losses = np.array([r["loss"] for r in rows])
        norms = np.array([r["grad_norm"] for r in rows])
        bad = ~(np.isfinite(losses) & np.isfinite(norms))
        if bad.any():
            first = step - len(rows) + int(np.argmax(bad)) + 1
            good = self.ckpt.latest_step()
            raise NonFiniteLossError(
                f"loss {losses[bad][0]} / grad norm {norms[bad][0]} at step {first} "
                f"(learning rate {rows[int(np.argmax(bad))]['learning_rate']:.3g}); the last good checkpoint is "
                f"{f'step {good} in {self.ckpt.directory}' if good is not None else 'none (nothing was saved)'}. "
                "Lower optimizer.lr, raise schedule.warmup_steps or set optimizer.clip_norm.")
        meta["tokens"] += self.tokens
        meta["train_seconds"] += elapsed
        row = {"loss": float(losses.mean()), "learning_rate": float(rows[-1]["learning_rate"]),
               "grad_norm": float(norms[-1]), "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0}
        for key in PRIVATE_STEP_METRICS:  # DP-SGD steps: means over the interval
            if key in rows[-1]:
                row[key] = float(np.mean([r[key] for r in rows]))
        self.pending, self.tokens, self.tick = [], 0, time.perf_counter()
        return row


def _results(cfg, status, step, current: _State, last_eval, best_metric, evaluating, wall_seconds, counts, spec,
             baselines, ckpt) -> dict:
    meta = current.meta
    return {
        "experiment": cfg.experiment_name, "status": status, "steps": step,
        "final_eval": last_eval,
        "best_eval": {"step": meta["best_step"], **(meta["best_eval"] or {})} if evaluating else None,
        "best_metric": {"name": best_metric[0], "mode": best_metric[1]},
        "wall_seconds": wall_seconds, "train_seconds": meta["train_seconds"],
        "tokens": meta["tokens"],
        "tokens_per_s": meta["tokens"] / meta["train_seconds"] if meta["train_seconds"] else None,
        "parameters": counts, "peft": spec.peft, **baselines,
        "init_from": meta.get("init_from"),
        "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(current.opt_state))),
        "peak_memory": run_logging.peak_memory(),
        "checkpoints": {"directory": ckpt.directory, "steps": ckpt.all_steps(), "best_step": ckpt.best_step()},
    }


def _init_from(source: str, params, rest, log):
    """`params` and `rest` with every tensor that `source`'s best checkpoint (or the step its path
    names) holds at the same path, and a record of what was loaded, kept in the checkpoints' meta and
    results.json: the source run and step, whether the step was its best or given, tensors copied,
    parameters restored, and the fresh parameters (paths and count).

    Frozen tensors (`rest`: a PEFT model's base weights) must all come from the source: they
    never train, so one left at its random initialisation is a mistake, not a fresh head."""
    directory, step = checkpointing.find_checkpoint_dir(source)
    source_ckpt = checkpointing.Checkpointer(directory, read_only=True,
                                             best_metric=_best_metric_of_run(os.path.dirname(directory)))
    chosen = step is None
    step = source_ckpt.best_step() if step is None else step
    if step is None:
        raise checkpointing.CheckpointError(f"init_from={source}: no checkpoint in {directory}")
    try:
        arrays = source_ckpt.restore_arrays(step, items=("params", "rest"))
    except checkpointing.CorruptCheckpointError as error:  # read-only: report, move nothing
        others = [s for s in source_ckpt.all_steps() if s != step]
        raise checkpointing.CheckpointError(
            f"init_from={source}: {'its best step, ' if chosen else ''}checkpoint {directory}/{step}, is corrupt: "
            f"{error.cause}. " + (f"Start from another step with init_from={directory}/N (saved steps: "
                                  f"{', '.join(map(str, others))})" if others else "The run has no other checkpoint")
        ) from error
    finally:
        source_ckpt.close()
    params, copied, fresh = modeling.transfer(arrays, params, source)
    rest, copied_frozen, fresh_frozen = modeling.transfer(arrays, rest, source)
    if not copied + copied_frozen:
        raise checkpointing.CheckpointError(f"init_from={source}: no parameter of {directory}/{step} matches this model")
    if fresh_frozen:
        raise checkpointing.CheckpointError(
            f"init_from={source}: frozen parameters {', '.join(fresh_frozen)} are not in {directory}/{step}; "
            "they would never train from their random initialisation. Start from a checkpoint of the same "
            "base model, or train them (e.g. peft.modules_to_save)")
    fresh_count = _count_at(params, fresh)
    total = modeling.count_parameters(params) + modeling.count_parameters(rest)
    log(f"init_from {directory}/{step} ({'its best step' if chosen else 'the step given'}): copied "
        f"{copied + copied_frozen} tensors ({total - fresh_count:,} parameters); "
        f"fresh: {', '.join(fresh) if fresh else 'none'}")
    return params, rest, {"run": os.path.dirname(directory), "step": int(step),
                          "chosen": "best" if chosen else "given", "checkpoint": os.path.join(directory, str(step)),
                          "copied": copied + copied_frozen, "parameters_restored": int(total - fresh_count),
                          "fresh": fresh, "parameters_fresh": int(fresh_count)}


def _count_at(tree, paths: list[str]) -> int:
    """Number of values in the leaves of `tree` whose dotted variable path is in `paths`."""
    wanted = set(paths)
    return int(sum(np.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
                   if ".".join(checkpointing.variable_path(path)) in wanted))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _config_changes(old, new) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} for every resolved key that differs between two configs.

    A key the saved config lacks but whose new value is the schema's default is no change: a
    later flaxen may add config keys (with defaults that keep the earlier behaviour), and a run
    saved before them must still resume."""
    before = _flatten(OmegaConf.to_container(old, resolve=True))
    after = _flatten(config_lib.to_container(new))
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(config_lib.TrainConfig), resolve=False,
                                               throw_on_missing=False))
    defaults.update(_peft_defaults(after.get("peft.name")))
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
            and not (key not in before and key in defaults and after.get(key) == defaults[key])}


def _peft_defaults(name) -> dict[str, Any]:
    """{'peft.<key>': default} of PEFT method `name`: a key a later flaxen adds to a method (such as
    LoRA's base_quantization), at its default, is no change to a run saved before it."""
    cls = peft.config.CONFIG_CLASSES.get(name)
    return {} if cls is None else {f"peft.{key}": value for key, value in peft.to_dict(cls()).items()}


def _format_change(key: str, old, new) -> str:
    return f"{key}: {old!r} -> {new!r}"


def _safe_on_resume(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_ON_RESUME)


def _best_metric_of_run(run_dir: str):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    return config_lib.best_metric(OmegaConf.load(path))
