"""Compression of a trained classifier: weight-only quantization, magnitude pruning and head pruning,
measured side by side on one validation split in one process.

    python scripts/compress.py run_dir=runs/minilm_sst2 [out=results/compress_sst2.json]
                               [gradual=RUN_DIR] [qlora=RUN_DIR] [split=validation] [repeats=30]
    python scripts/compress.py table=results/compress_sst2.json     # the table of an existing file

Rows (each built from run_dir's best checkpoint, no retraining unless a run is given):
    float32                  the trained model
    int8                     models.quant: block Dense kernels int8 per output channel
    int4                     block Dense kernels int4, groups of 128 inputs
    int8 + embeddings        ... and the word-embedding table int8 per row
    int4 + embeddings        ... and the word-embedding table int4, groups of 128 features
    50 % / 80 % sparsity     models.prune.magnitude_prune: one shot, global over the block kernels
    25 % of heads pruned     models.prune: head importance (Michel et al. 2019) on `importance_batches`
                             training batches, then the least important quarter of all heads removed
    gradual=RUN_DIR          a run trained with gradual magnitude pruning (prune=gradual), as it is
    qlora=RUN_DIR            a QLoRA run (peft=lora peft.base_quantization=nf4), as it is
Columns: the run's metric (its best_metric, e.g. accuracy) on `split`; size on disk of the row's saved
form (float32 and head-pruned models: safetensors of every parameter; quantized: models.quant's
checkpoint directory; sparse: safetensors of a bitmask per pruned kernel (1 bit per weight) and its
nonzero values, the other parameters as they are; QLoRA: safetensors of its codes, scales, LoRA
factors and float parameters); parameters (the weights the model has; quantized layers count the weights
their codes encode; sparse rows also the nonzero ones); latency of the jitted forward pass at batch 1
and batch 64 (median over `repeats` calls after two warm-up calls; the rows' calls interleaved, one
per row per round, so a change in the machine's load reaches every row alike) at the sequence length
of the split's most common bucket. Latency runs on this process's JAX device (CPU here); sparse
models run dense kernels (no sparse matmul), so their latency is the float model's; quantized
models dequantize their kernels in every call. The load average (1, 5, 15 minutes) before and
after timing is recorded, since other processes may share the machine.

Writes `out` (default results/compress_<data name>.json: rows, command, machine, date, git commit) and
prints a table.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from flaxen import cli  # noqa: E402
from flaxen.errors import ConfigError, FlaxenError  # noqa: E402

KEYS = ("run_dir", "out", "gradual", "qlora", "split", "repeats", "importance_batches", "step", "table")
# the README's Compression table sits between these markers (tests/test_readme.py checks it is table(report))
BEGIN, END = "<!-- compress:begin -->", "<!-- compress:end -->"
LATENCY_BATCHES = (1, 64)


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(this command's options, the run-config overrides) from key=value arguments."""
    options, overrides = cli.key_values(argv, KEYS, "run_dir=PATH")
    if options.get("table"):
        return options, overrides
    if not options.get("run_dir"):
        raise ConfigError("run_dir= is missing: python scripts/compress.py run_dir=PATH [out=FILE] [gradual=RUN_DIR] "
                          "[qlora=RUN_DIR]")
    for key, default in (("repeats", 30), ("importance_batches", 16)):
        cli.integer_option(options, key, default, positive=True)
    cli.integer_option(options, "step")
    options.setdefault("split", "validation")
    return options, overrides


# ---------------------------------------------------------------------- saved forms and counts


def _variables(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {".".join(map(str, path)): np.asarray(node[...]) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def _file_size(write) -> int:
    with tempfile.TemporaryDirectory() as directory:
        write(directory)
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def dense_size(model) -> int:
    """Bytes of a safetensors file holding every variable of `model` as it is."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in _variables(model).items()}
    return _file_size(lambda d: save_file(tensors, os.path.join(d, "model.safetensors")))


def sparse_size(model) -> int:
    """Bytes of a safetensors file with each pruned block kernel as a bitmask (np.packbits of w != 0)
    and its nonzero values, every other variable as it is."""
    from safetensors.numpy import save_file

    from models import prune

    kernels = {".".join(map(str, path)) for path in prune.block_kernels(model)}
    tensors = {}
    for name, value in _variables(model).items():
        if name in kernels:
            tensors[name + ".mask"] = np.packbits((value != 0).reshape(-1))
            tensors[name + ".nonzero"] = np.ascontiguousarray(value[value != 0])
        else:
            tensors[name] = np.ascontiguousarray(value)
    return _file_size(lambda d: save_file(tensors, os.path.join(d, "model.safetensors")))


def quantized_size(model) -> int:
    from models import quant

    return _file_size(lambda d: quant.save_quantized(model, os.path.join(d, "quantized")))


def parameter_count(model) -> int:
    """Weights of the model: nnx.Param values plus the weights quantized layers encode."""
    from flax import nnx

    from models import quant

    params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return params + quant.encoded_parameter_count(model)


def nonzero_count(model) -> int:
    from flax import nnx

    return sum(int(np.count_nonzero(np.asarray(v[...]))) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------- measurements


def typical_length(task_data, split: str) -> tuple[int, dict]:
    """The bucket length most rows of `split` are padded to, and the count per bucket."""
    counts: dict[int, int] = {}
    for batch in task_data.loader(split, 1, seed=0, train=False):
        if "valid" in batch and not np.asarray(batch["valid"]).any():
            continue
        length = int(np.asarray(batch["input_ids"]).shape[1])
        counts[length] = counts.get(length, 0) + 1
    return max(counts, key=lambda n: (counts[n], -n)), dict(sorted(counts.items()))


def latency_ms(models: list, batch: int, length: int, repeats: int, vocab: int) -> list[float]:
    """Median wall time (milliseconds) of each model's jitted forward pass (logits) on [batch,
    length] tokens. The calls are interleaved, one per model per round, so a change in the machine's
    load during the measurement reaches every model alike."""
    import jax
    from flax import nnx

    ids = jax.device_put(np.random.default_rng(0).integers(1, vocab, (batch, length), dtype=np.int32))
    mask = jax.device_put(np.ones((batch, length), np.int32))
    calls = []
    for model in models:
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, ids, mask, graphdef=graphdef: nnx.merge(graphdef, state)(
            ids, attention_mask=mask).logits)
        for _ in range(2):
            forward(state, ids, mask).block_until_ready()
        calls.append(lambda forward=forward, state=state: forward(state, ids, mask).block_until_ready())
    times = [[] for _ in models]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(spent) for spent in times]


def evaluate(model, cfg, task_data, split: str) -> dict:
    from flaxen import evaluate as evaluation
    from flaxen import sharding, state

    setup = state.from_config(cfg, model, mesh=sharding.make_mesh(cfg.mesh), with_optimizer=False)
    return evaluation.evaluate(setup.eval_step, setup.params, setup.rest, task_data, setup.task, split,
                               batch_size=cfg.eval_batch_size, batch_sharding=setup.batch_sharding,
                               task_cfg=cfg.task)


def head_importance(model, task, task_data, batches: int, batch_size: int):
    """Head importance (models.prune.head_importance) on the first `batches` training batches."""
    import jax.numpy as jnp

    from models import prune

    def loss_fn(m, batch):
        output = m(batch["input_ids"], **task.model_inputs(batch))
        loss_sum, _ = task.loss_terms(output, batch)
        return loss_sum / jnp.maximum(task.loss_weight(batch), 1.0)

    loader = task_data.loader("train", batch_size, seed=0, train=False)
    chosen = []
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        chosen.append({k: jnp.asarray(v) for k, v in batch.items()})
    return prune.head_importance(model, chosen, loss_fn)


# ---------------------------------------------------------------------- the table


def build_rows(run, task_data, options: dict, log=print) -> tuple[list[dict], dict]:
    from flaxen import config as config_lib
    from flaxen import inference
    from models import prune, quant

    cfg, split = run.cfg, options["split"]
    metric, _ = config_lib.best_metric(cfg)
    length, buckets = typical_length(task_data, split)
    vocab = run.model.config.vocab_size
    model = run.model
    variants = [
        ("float32", "f32", lambda: model),
        ("int8", "int8", lambda: quant.quantize(model, "int8")),
        ("int4 (groups of 128)", "int4", lambda: quant.quantize(model, "int4", 128)),
        ("int8 + word embeddings", "int8_embeddings", lambda: quant.quantize(model, "int8", embeddings=True)),
        ("int4 + word embeddings", "int4_embeddings", lambda: quant.quantize(model, "int4", 128, embeddings=True)),
        ("50 % sparsity (one shot)", "sparse50", lambda: prune.magnitude_prune(model, 0.5)),
        ("80 % sparsity (one shot)", "sparse80", lambda: prune.magnitude_prune(model, 0.8)),
        ("25 % of heads pruned", "heads25", lambda: prune.prune_fraction_of_heads(
            model, 0.25, head_importance(model, run.task, task_data, options["importance_batches"],
                                         cfg.batch_size))[0]),
    ]
    others = {}
    if options.get("gradual"):
        others["gradual"] = inference.load_run(options["gradual"], verb="Compress")
        variants.append((f"{prune.sparsity(others['gradual'].model):.0%} sparsity (gradual pruning run)",
                         "gradual", lambda: others["gradual"].model))
    if options.get("qlora"):
        others["qlora"] = inference.load_run(options["qlora"], verb="Compress")
        peft_cfg = others["qlora"].spec.peft
        variants.append((f"QLoRA ({peft_cfg.get('base_quantization')} base, LoRA r={peft_cfg.get('rank')})", "qlora",
                         lambda: others["qlora"].model))
    rows, built = [], []
    for label, kind, make in variants:
        log(f"{label}: building, evaluating")
        variant = make()
        other = others.get(kind)
        result = evaluate(variant, other.cfg if other is not None else cfg, task_data, split)
        if kind.startswith("int"):
            size = quantized_size(variant)
        elif kind.startswith("sparse") or kind == "gradual":
            size = sparse_size(variant)
        else:
            size = dense_size(variant)
        row = {"variant": label, "kind": kind, metric: result[metric],
               "metrics": {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
               "disk_bytes": size, "parameters": parameter_count(variant)}
        if kind.startswith("sparse") or kind == "gradual":
            row["nonzero_parameters"] = nonzero_count(variant)
            row["block_kernel_sparsity"] = prune.sparsity(variant)
        if kind == "heads25":
            row["heads_pruned"] = {str(k): list(v) for k, v in sorted(dict(variant.config.pruned_heads or {}).items())}
        if other is not None:
            row["run_dir"], row["checkpoint"] = other.run_dir, other.checkpoint
            row["run_command"] = _run_command(other.run_dir)
        rows.append(row)
        built.append(variant)
        log(f"  {metric} {row[metric]:.4f}, {size / 1e6:.1f} MB")
    load_before = os.getloadavg()
    for batch in LATENCY_BATCHES:
        log(f"timing every row at batch {batch}, sequence length {length}")
        for row, value in zip(rows, latency_ms(built, batch, length, options["repeats"], vocab)):
            row.setdefault("latency_ms", {})[f"batch_{batch}"] = value
    setting = {"metric": metric, "split": split, "sequence_length": length, "bucket_counts": buckets,
               "latency_batches": list(LATENCY_BATCHES), "repeats": options["repeats"],
               "load_average_before_and_after_timing": [round(x, 2) for x in (*load_before, *os.getloadavg())],
               "importance_batches": options["importance_batches"], "importance_batch_size": cfg.batch_size}
    return rows, setting


def _run_command(run_dir: str) -> str | None:
    path = os.path.join(run_dir, "commands.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return " ".join(lines[0]["argv"]) if lines and "argv" in lines[0] else None


def targets(rows: list[dict], metric: str) -> dict:
    """int8 within 0.5 points of float32, int4 within 2, QLoRA within 1.5 (points = 100 x metric)."""
    by_kind = {row["kind"]: row for row in rows}
    base = by_kind["f32"][metric]
    out = {}
    for kind, limit in (("int8", 0.5), ("int4", 2.0), ("qlora", 1.5)):
        if kind in by_kind:
            drop = 100 * (base - by_kind[kind][metric])
            out[kind] = {"max_drop_points": limit, "drop_points": round(drop, 2), "met": drop <= limit}
    return out


def table(report: dict) -> str:
    metric, setting = report["metric"], report
    base = report["rows"][0]
    lines = [f"| variant | {metric} | Δ (points) | size on disk | parameters | latency batch 1 | latency batch 64 |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        params = f"{row['parameters']:,}"
        if "nonzero_parameters" in row:
            params += f" ({row['nonzero_parameters']:,} nonzero)"
        lines.append(
            f"| {row['variant']} | {row[metric]:.4f} | {100 * (row[metric] - base[metric]):+.1f} "
            f"| {row['disk_bytes'] / 1e6:.1f} MB ({row['disk_bytes'] / base['disk_bytes']:.0%}) | {params} "
            f"| {row['latency_ms']['batch_1']:.1f} ms | {row['latency_ms']['batch_64']:.1f} ms |")
    lines.append("")
    load = setting["load_average_before_and_after_timing"]
    lines.append(f"{setting['split']} split ({base['metrics'].get('num_examples', '?')} examples); latency: median of "
                 f"{setting['repeats']} jitted forward calls per row, interleaved, at sequence length "
                 f"{setting['sequence_length']} (the most common bucket; rows per bucket length: "
                 f"{setting['bucket_counts']}); {report['device']}, {report['machine']}, 1-minute load average "
                 f"{load[0]} before and {load[3]} after timing; {report['date']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import jax

    from flaxen import inference
    from flaxen import logging as run_logging
    from flaxen.evaluation_run import _load_task_data

    argv = sys.argv[1:] if argv is None else argv
    try:
        options, overrides = parse(argv)
        if options.get("table"):
            with open(options["table"]) as f:
                print(table(json.load(f)))
            return 0
        run = inference.load_run(options["run_dir"], step=options.get("step"), overrides=overrides,
                                 ignore=inference.RUN_KEYS + KEYS, verb="Compress")
        task_data = _load_task_data(run.cfg, run.run_dir)
        splits = getattr(task_data, "splits", None)
        if splits is not None and options["split"] not in splits:
            raise ConfigError(f"split={options['split']!r}: the data has splits {', '.join(splits)}")
        rows, setting = build_rows(run, task_data, options)
    except FlaxenError as error:
        return cli.report(error)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reproduce import machine

    data_name = run.cfg.data.get("name") or "run"
    out = options.get("out") or os.path.join("results", f"compress_{data_name}.json")
    report = {"command": "python scripts/compress.py " + " ".join(argv), "run_dir": run.run_dir,
              "checkpoint": run.checkpoint, "run_command": _run_command(run.run_dir), **setting,
              "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})", "machine": machine(),
              "date": datetime.date.today().isoformat(), "git_commit": run_logging.git_commit(),
              "rows": rows, "targets": targets(rows, setting["metric"])}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    run_logging.write_json(out, report)
    print(table(report))
    for kind, target in report["targets"].items():
        print(f"target {kind}: drop {target['drop_points']:.2f} points (at most {target['max_drop_points']}): "
              + ("met" if target["met"] else "MISSED"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli.quiet_absl()
    sys.exit(main())
