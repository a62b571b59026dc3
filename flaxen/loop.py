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
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from flaxen import checkpoint as checkpointing
from flaxen import config as config_lib
from flaxen import distributed
from flaxen import evaluate as evaluation
from flaxen import logging as run_logging
from flaxen import modeling, optim, sharding, steps
from flaxen.errors import ConfigError, FlaxenError
from models import peft


# Dropout keys: XLA's RngBitGenerator ("rbg") compiles to one op, where threefry unrolls into
# many (it doubled the train step's compile time of a small BERT on CPU).
RNG_IMPL = "rbg"


class NonFiniteLossError(FlaxenError):
    """The training loss or gradient norm became NaN or Inf."""


def is_time(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again aborts)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Any, *, trainable_filter: Any = None, should_stop: Callable[[int], bool] | None = None,
          task_data: Any = None) -> dict:
    config_lib.validate(cfg)
    distributed.initialize(cfg.get("distributed"))
    run_dir = os.path.abspath(os.path.expanduser(cfg.run_dir))
    is_main = jax.process_index() == 0
    writer = run_logging.MetricsWriter(run_dir, tensorboard=cfg.tensorboard, enabled=is_main)
    log = print if is_main else (lambda *a, **k: None)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        previous = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(previous) and os.path.isdir(os.path.join(run_dir, "checkpoints")):
            changes = _config_changes(OmegaConf.load(previous), cfg)
            if changes:
                log("this run directory was started with a different config: " + "; ".join(changes))
        run_logging.write_json(os.path.join(run_dir, "config.json"), config_lib.to_container(cfg))
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))

    # ---- mesh ----
    mesh = sharding.make_mesh(cfg.mesh)
    rules = dict(cfg.mesh.logical_axis_rules)
    micro_batch = cfg.micro_batch_size or cfg.batch_size
    accum_steps = cfg.batch_size // micro_batch
    for key, size in (("batch_size", cfg.batch_size), ("micro_batch_size", micro_batch),
                      ("eval_batch_size", cfg.eval_batch_size)):
        if size % (sharding.batch_divisor(mesh) * jax.process_count()):
            raise ConfigError(f"{key}={size} is not divisible by the {sharding.batch_divisor(mesh)} batch shards "
                              f"of the mesh (data x fsdp) times {jax.process_count()} processes")
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    # ---- data ----
    data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if task_data is None:
        from flaxen.data import load_task_data

        task_data = load_task_data(cfg.data, cfg.task.name, data_dir, tokenizer_path=modeling.tokenizer_path(cfg))
    if is_main and getattr(task_data, "tokenizer", None) is not None:
        modeling.write_tokenizer(run_dir, task_data.tokenizer)
    train_loader = task_data.loader("train", cfg.batch_size // jax.process_count(), seed=cfg.seed, train=True,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    baseline = {}
    if cfg.task.name in ("mlm", "clm") and hasattr(task_data, "unigram_entropy"):
        baseline["unigram_entropy"] = float(task_data.unigram_entropy("train"))
        log(f"train split unigram entropy: {baseline['unigram_entropy']:.4f} nats/token (a context-free model's loss)")

    # ---- model ----
    model, spec = modeling.build(cfg, task_data, log=log)
    if is_main:
        modeling.write_spec(run_dir, spec)
    if trainable_filter is None:
        trainable_filter = peft.trainable_filter(model)
    counts = peft.parameter_counts(model, trainable_filter)
    graphdef, params, rest = nnx.split(model, trainable_filter, ...)
    decay_mask = optim.decay_mask(model, params)
    del model

    # ---- state ----
    param_shardings = sharding.state_shardings(mesh, params, rules)
    rest_shardings = sharding.state_shardings(mesh, rest, rules)
    params = jax.device_put(params, param_shardings)
    rest = jax.device_put(rest, rest_shardings)
    schedule = optim.make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, schedule, decay_mask)
    opt_shardings = sharding.optimizer_state_shardings(mesh, jax.eval_shape(optimizer.init, params), params,
                                                       param_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    rng = jax.random.key(cfg.seed, impl=RNG_IMPL)
    log(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable "
        f"({counts['trainable_percent']:.2f}%, peft={spec.peft['name']}); mesh {dict(mesh.shape)}; "
        f"batch {cfg.batch_size} = {accum_steps} x {micro_batch}")

    # ---- step ----
    activations = sharding.activation_sharding(mesh, rules)
    train_step = steps.make_train_step(
        graphdef, cfg.task.name, optimizer, schedule=schedule, accum_steps=accum_steps, param_shardings=param_shardings,
        opt_shardings=opt_shardings, rest_shardings=rest_shardings, batch_sharding=batch_sharding,
        replicated=replicated, activation_sharding=activations)
    eval_step = steps.make_eval_step(graphdef, cfg.task.name, param_shardings=param_shardings,
                                     rest_shardings=rest_shardings, batch_sharding=batch_sharding,
                                     replicated=replicated, activation_sharding=activations)

    def run_eval(step):
        result = evaluation.evaluate(eval_step, params, rest, task_data, cfg.task.name, cfg.eval_split,
                                     batch_size=cfg.eval_batch_size, batch_sharding=batch_sharding,
                                     max_batches=cfg.eval_batches)
        writer.write(step, evaluation.scalar_metrics(result, cfg.eval_split))
        return result

    # ---- checkpoint (resume) ----
    metric_name, metric_mode = config_lib.best_metric(cfg)
    evaluating = bool(cfg.eval_split)
    ckpt = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                                      best_metric=(metric_name, metric_mode) if evaluating else None)
    meta = {"step": 0, "best_value": None, "best_step": None, "evals_without_improvement": 0,
            "tokens": 0, "train_seconds": 0.0, "best_eval": None}
    start = ckpt.latest_step()
    if start is not None:
        restored = ckpt.restore(start, params=modeling.abstract_like(params, param_shardings),
                                opt_state=modeling.abstract_like(opt_state, opt_shardings),
                                rest=modeling.abstract_like(rest, rest_shardings))
        params, opt_state = restored["params"], restored["opt_state"]
        rest = restored.get("rest", rest)
        meta.update(restored["meta"])
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32), impl=RNG_IMPL)
        if "data" in restored:
            train_loader.set_state(restored["data"])
        log(f"resumed from {ckpt.directory}/{start} (step {meta['step']})")
    elif cfg.init_from is not None:
        params, rest, meta["init_from"] = _init_from(cfg.init_from, params, rest, log)

    def save(step, eval_metrics=None):
        """Checkpoints `step`; `eval_metrics` only for a new best, so the best checkpoint (the
        best of those saved with metrics) is the first step that reached the best value."""
        if step in ckpt.all_steps():
            return
        meta.update(step=step, rng=np.asarray(jax.random.key_data(rng)).tolist())
        ckpt.save(step, params=params, opt_state=opt_state, rest=rest, meta=dict(meta), data=train_loader.get_state(),
                  metrics=None if eval_metrics is None else {metric_name: eval_metrics[metric_name]})

    # ---- loop ----
    step = int(meta["step"])
    finished = os.path.join(run_dir, "results.json")
    if step >= cfg.steps and os.path.isfile(finished):
        ckpt.close()
        writer.close()
        log(f"{run_dir} already finished {step} steps; its results.json is kept (delete the directory to retrain)")
        with open(finished) as f:
            return json.load(f)
    first_step = step + 1
    bar = run_logging.ProgressBar(cfg.steps, initial=step, enabled=is_main and cfg.progress_bar)
    pending, interval_tokens, status = [], 0, "completed"
    last_eval, last_eval_step = None, None
    wall_start = tick = time.perf_counter()

    def flush(step):
        nonlocal pending, interval_tokens, tick
        rows = jax.device_get(pending)
        elapsed = time.perf_counter() - tick
        losses = np.array([r["loss"] for r in rows])
        norms = np.array([r["grad_norm"] for r in rows])
        bad = ~(np.isfinite(losses) & np.isfinite(norms))
        if bad.any():
            first = step - len(rows) + int(np.argmax(bad)) + 1
            good = ckpt.latest_step()
            raise NonFiniteLossError(
                f"loss {losses[bad][0]} / grad norm {norms[bad][0]} at step {first} "
                f"(learning rate {rows[int(np.argmax(bad))]['learning_rate']:.3g}); the last good checkpoint is "
                f"{f'step {good} in {ckpt.directory}' if good is not None else 'none (nothing was saved)'}. "
                "Lower optimizer.lr, raise schedule.warmup_steps or set optimizer.clip_norm.")
        meta["tokens"] += interval_tokens
        meta["train_seconds"] += elapsed
        row = {"loss": float(losses.mean()), "learning_rate": float(rows[-1]["learning_rate"]),
               "grad_norm": float(norms[-1]), "tokens_per_s": interval_tokens / elapsed if elapsed > 0 else 0.0}
        pending, interval_tokens, tick = [], 0, time.perf_counter()
        return row

    with _StopRequest() as stop_request:
        try:
            while step < cfg.steps:
                batch = next(train_loader)
                params, opt_state, step_metrics = train_step(
                    params, opt_state, rest, sharding.put_batch(batch, batch_sharding), np.int32(step), rng)
                step += 1
                pending.append(step_metrics)
                bar.update(step)
                if step == first_step:
                    jax.block_until_ready(step_metrics)
                    log(f"step {step}: compiled and ran the first step in {time.perf_counter() - tick:.1f}s")
                    tick = time.perf_counter()
                else:
                    interval_tokens += int(np.asarray(batch["input_ids"]).size) * jax.process_count()
                last = step == cfg.steps
                stopping = stop_request.requested or (should_stop is not None and should_stop(step))
                do_eval = evaluating and (is_time(step, cfg.eval_every) or last)
                do_save = is_time(step, cfg.checkpoint_every) or last or stopping
                if is_time(step, cfg.log_every) or do_eval or do_save:
                    row = flush(step)
                    writer.write(step, row)
                    bar.update(step, loss=row["loss"], lr=row["learning_rate"], tokens_per_s=row["tokens_per_s"])
                paused = time.perf_counter()
                new_best = None
                if do_eval:
                    eval_metrics = last_eval = run_eval(step)
                    last_eval_step = step
                    value = eval_metrics[metric_name]
                    if _improved(value, meta["best_value"], metric_mode):
                        meta.update(best_value=value, best_step=step, evals_without_improvement=0,
                                    best_eval={k: v for k, v in eval_metrics.items() if k != "report"})
                        do_save, new_best = True, eval_metrics
                    else:
                        meta["evals_without_improvement"] += 1
                    bar.write(f"step {step}: " + ", ".join(
                        f"{cfg.eval_split}/{k} {v:.4g}" for k, v in eval_metrics.items() if isinstance(v, float)))
                    patience = cfg.early_stopping_patience
                    if patience is not None and meta["evals_without_improvement"] >= patience:
                        status, stopping, do_save = "early_stopping", True, True
                        bar.write(f"early stopping: {metric_name} has not improved in {patience} evaluations")
                if do_save:
                    save(step, new_best)
                tick += time.perf_counter() - paused
                if stopping:
                    status = "early_stopping" if status == "early_stopping" else "interrupted"
                    break
        finally:
            bar.close()
            writer.close()

    # ---- end ----
    if status == "interrupted":
        ckpt.close()
        log(f"stopped at step {step}; checkpoint saved in {ckpt.directory}. Run the same command to resume.")
        return {"status": status, "steps": step}
    if evaluating and last_eval_step != step:
        last_eval = run_eval(step)
    results = {
        "experiment": cfg.experiment_name, "status": status, "steps": step,
        "final_eval": last_eval,
        "best_eval": {"step": meta["best_step"], **(meta["best_eval"] or {})} if evaluating else None,
        "best_metric": {"name": metric_name, "mode": metric_mode},
        "wall_seconds": time.perf_counter() - wall_start, "train_seconds": meta["train_seconds"],
        "tokens": meta["tokens"],
        "tokens_per_s": meta["tokens"] / meta["train_seconds"] if meta["train_seconds"] else None,
        "parameters": counts, "peft": spec.peft, **baseline,
        "init_from": meta.get("init_from"),
        "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(opt_state))),
        "peak_memory": run_logging.peak_memory(),
        "checkpoints": {"directory": ckpt.directory, "steps": ckpt.all_steps(), "best_step": ckpt.best_step()},
    }
    ckpt.close()
    if is_main:
        run_logging.write_json(os.path.join(run_dir, "results.json"), results)
    log(f"done: {step} steps; results in {os.path.join(run_dir, 'results.json')}")
    log(f"evaluate with: python eval.py {config_lib.shell_override('run_dir', run_dir)} "
        f"split={cfg.eval_split or 'validation'}")
    return results


def _init_from(source: str, params, rest, log):
    """`params` and `rest` with every tensor that `source`'s best checkpoint holds at the same
    path, and a record of what was copied (kept in the checkpoints' meta and results.json).

    Frozen tensors (`rest`: a PEFT model's base weights) must all come from the source: they
    never train, so one left at its random initialisation is a mistake, not a fresh head."""
    directory, step = checkpointing.find_checkpoint_dir(source)
    source_ckpt = checkpointing.Checkpointer(directory, read_only=True,
                                             best_metric=_best_metric_of_run(os.path.dirname(directory)))
    step = source_ckpt.best_step() if step is None else step
    if step is None:
        raise checkpointing.CheckpointError(f"init_from={source}: no checkpoint in {directory}")
    arrays = source_ckpt.restore_arrays(step, items=("params", "rest"))
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
    log(f"init_from {directory}/{step}: copied {copied + copied_frozen} tensors; "
        f"fresh: {', '.join(fresh) if fresh else 'none'}")
    return params, rest, {"checkpoint": os.path.join(directory, str(step)), "copied": copied + copied_frozen,
                          "fresh": fresh}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _config_changes(old, new) -> list[str]:
    """'key: old -> new' for every resolved key that differs between two configs."""
    before = _flatten(OmegaConf.to_container(old, resolve=True))
    after = _flatten(config_lib.to_container(new))
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _best_metric_of_run(run_dir: str):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    return config_lib.best_metric(OmegaConf.load(path))
