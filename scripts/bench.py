"""Benchmarks of flaxen's train step: one JSON line per case.

    python scripts/bench.py [--cases peak,minilm,gpt_nano] [--steps 10] [--warmup 3] [--torch]
    python scripts/bench.py --cases peak,minilm,gpt_nano,gpt2_small --dtype bfloat16 --attention cudnn
                                                           # on a GPU: >> results/bench_gpu.jsonl
    python scripts/bench.py --cases compile_cache,e2e_sst2  # whole runs (see below)

First the host's f32 matmul peak (2048 x 2048 x 2048 under jax.jit, median of 10 after warm-up),
then, with the same train step flaxen.loop runs (nnx split once, jit with shardings on a 1-device
mesh, donated state, dropout keys folded from the step):
  minilm    all-MiniLM-L6-v2 (real weights when installed) + 2-class head, full fine-tuning with
            AdamW, batch 32 x 128 tokens, dropout on (as Hugging Face's model.train());
  gpt_nano  nanoGPT's CPU model (4 layers, 4 heads, 128 wide, 65 symbols, no biases) + causal LM,
            batch 12 x 64, AdamW (beta2 0.99, weight decay 0.1), clip 1.0, dropout 0;
  gpt2_small GPT-2 small (124M) causal LM, batch 8 x 1024, AdamW, clip 1.0: the accelerator case;
  bert_mini_mlm  the bert_mini_mlm preset's masked-LM step (bert_mini, 8,000-id vocabulary, batch
            16 x 128, 15 % masked), the MLM head at the masked positions only, beside the same step
            with the head at every position (row bert_mini_mlm_full_projection), steps alternating;
            the first row's speedup_over_full_projection = full step time / gathered step time.
--dtype bfloat16 computes in bf16 (parameters and optimizer state stay f32); --attention cudnn uses
jax.nn.dot_product_attention's cuDNN kernel (NVIDIA GPUs). On an accelerator MFU is against the
device's nominal dense peak for the dtype (ACCELERATOR_PEAK_TFLOPS, or --peak-tflops), on CPU
against the matmul peak measured in this process.
Each case reports step time (median and mean over --steps timed steps), tokens/s and MFU: model
FLOPs per step = 6 x non-embedding parameters x tokens + 12 x layers x batch x seq^2 x width,
divided by step time and by the peak measured in this process.
Every line also records what it was measured on and with: `cpu` (model and core count, as
scripts/reproduce.py's host()), `git_commit`, `load_avg` (os.getloadavg() when the line was
written: 1, 5 and 15 min; other processes' load slows the steps) and `data` (source, batch, seq,
length_grouping: the train step cases run on one fixed batch of random token ids).
Whole runs, as users start them (each a `python train.py ...` process; --cases as below):
  compile_cache  the first step's time (compilation included) of experiment=quickstart and
                 experiment=minilm_sst2 with an empty persistent compilation cache, then warm;
  e2e_sst2       `python train.py experiment=minilm_sst2` (800 steps, evaluations and checkpoints
                 every 200) with an empty and with a filled compilation cache, beside the same run
                 in Hugging Face's Trainer (scripts/hf_trainer_sst2.py): process wall time and
                 final validation accuracy of each, flaxen's speed-up = Trainer wall / flaxen wall.
`--torch` also times the PyTorch peers in this process (torch needed; transformers for minilm):
Hugging Face's BertForSequenceClassification on the minilm case and nanoGPT's recipe
(scripts/nanogpt_torch.py) on the gpt_nano case, alternating one flaxen step and one PyTorch step
so both see the same machine load, and reports flaxen's speed-up over each (> 1: flaxen is faster);
`--torch --alone` times all of flaxen's steps, then all of PyTorch's. Each step line says which
(`timing`: interleaved | alone).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import models  # noqa: E402
from flaxen import modeling, sharding, state  # noqa: E402
from flaxen.config import MeshConfig, OptimizerConfig  # noqa: E402
from flaxen.state import RNG_IMPL  # noqa: E402
from reproduce import git_commit, host  # noqa: E402  (scripts/ is on sys.path when this runs as a script)

GIT_COMMIT = git_commit()


def emit(row: dict) -> None:
    """Prints `row` as one JSON line with the machine, code and load it was measured with."""
    recorded = {"cpu": host(), "git_commit": GIT_COMMIT, "load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({**row, **recorded}), flush=True)


def data_settings(source: str, batch: int | None = None, seq: int | None = None) -> dict:
    """A line's `data`: what the step ran on. Fixed batches are never grouped by length."""
    return {"source": source, "batch": batch, "seq": seq, "length_grouping": 0 if batch else None}


RANDOM_IDS = "one fixed batch of random token ids"


# dense (no sparsity) peak TFLOP/s by device kind, from the vendors' data sheets: MFU's denominator
ACCELERATOR_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},  # SXM; float32 = TF32 tensor cores
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
}


def matmul_peak(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """GFLOP/s of a jitted size^3 matmul in `dtype` (median of `repeats` after warm-up)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_flops(config: models.ModelConfig, non_embedding_params: int, batch: int, seq: int) -> float:
    tokens = batch * seq
    return 6 * non_embedding_params * tokens + 12 * config.num_layers * batch * seq**2 * config.hidden_size


def non_embedding_parameters(params) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if "embedding" not in jax.tree_util.keystr(path):
            total += int(np.prod(leaf.shape))
    return total


def prepare_train_step(model, task: str, optimizer_cfg, batch: dict, warmup: int, *, hlo: bool = False):
    """flaxen's train step on `batch` (flaxen.state.build, as flaxen.loop), compiled and warmed up.

    Returns (run_one, info): run_one() runs one step to completion; info holds compile time,
    non-embedding parameter count and the last loss (and with `hlo` the compiled program's text)."""
    setup = state.build(model, task, sharding.make_mesh(MeshConfig()), {}, optimizer_cfg=optimizer_cfg,
                        schedule=optax.constant_schedule(optimizer_cfg.lr))
    params, opt_state, rest, train_step = setup.params, setup.opt_state, setup.rest, setup.train_step
    batch_sharding = setup.batch_sharding
    rng = jax.random.key(0, impl=RNG_IMPL)
    # the compiled program's text, taken before the first step donates params and opt_state
    program = train_step.lower(params, opt_state, rest, sharding.put_batch(batch, batch_sharding), np.int32(0),
                               rng).compile().as_text() if hlo else None
    start = time.perf_counter()
    params, opt_state, metrics = train_step(params, opt_state, rest, sharding.put_batch(batch, batch_sharding),
                                            np.int32(0), rng)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for step in range(1, warmup):
        params, opt_state, metrics = train_step(params, opt_state, rest, sharding.put_batch(batch, batch_sharding),
                                                np.int32(step), rng)
    jax.block_until_ready(metrics)
    current = {"params": params, "opt_state": opt_state, "step": warmup, "metrics": metrics}
    info = {"compile_s": compile_seconds, "non_embedding_params": non_embedding_parameters(params)}
    if hlo:
        info["hlo"] = program

    def run_one():
        current["params"], current["opt_state"], current["metrics"] = train_step(
            current["params"], current["opt_state"], rest, sharding.put_batch(batch, batch_sharding),
            np.int32(current["step"]), rng)
        jax.block_until_ready(current["metrics"])
        current["step"] += 1
        info["loss"] = float(current["metrics"]["loss"])

    return run_one, info


def timed(run_one, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - start)
    return times


# model settings the command line chooses (--dtype, --attention): compute dtype and
# jax.nn.dot_product_attention's implementation
SETTINGS = {"dtype": "float32", "attention_implementation": None}


def minilm_setup(seq: int = 128):
    batch_size = 32
    try:
        path = models.minilm_path()
        model = models.load_pretrained(path, head="seq_cls", num_labels=2, **SETTINGS)
        weights = "all-MiniLM-L6-v2"
    except Exception:
        config = models.ModelConfig(family="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                                    intermediate_size=1536, **SETTINGS)
        model = modeling.ModelSpec(config, "seq_cls", 2).build(0)
        weights = "random (all-MiniLM-L6-v2 not installed)"
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 30000, (batch_size, seq)).astype(np.int32),
             "attention_mask": np.ones((batch_size, seq), np.int32),
             "token_type_ids": np.zeros((batch_size, seq), np.int32),
             "labels": rng.integers(0, 2, batch_size).astype(np.int32)}
    optimizer_cfg = OptimizerConfig(name="adamw", lr=2e-5, weight_decay=0.01, clip_norm=0.0)
    return model, weights, batch, optimizer_cfg


def interleaved(run_one, torch_step, count: int, alone: bool = False) -> tuple[list[float], list[float]]:
    """Step times of flaxen and (if given) PyTorch, one step of each in turn, so that load from
    other processes hits both alike; with `alone`, all of flaxen's steps first, then PyTorch's."""
    if alone:
        return timed(run_one, count), (timed(torch_step, count) if torch_step is not None else [])
    ours, theirs = [], []
    for _ in range(count):
        ours += timed(run_one, 1)
        if torch_step is not None:
            theirs += timed(torch_step, 1)
    return ours, theirs


def case_rows(args, peak: float, case: str, model, weights: str, task: str, optimizer_cfg, batch: dict,
              torch_case: str, torch_step=None, torch_info=None) -> tuple[dict, dict | None]:
    """flaxen's row for `case`; with `torch_step` (the PyTorch peer's step) timed interleaved, also
    the peer's row `torch_case` with flaxen's speed-up over it."""
    batch_size, seq = batch["input_ids"].shape
    run_one, info = prepare_train_step(model, task, optimizer_cfg, batch, args.warmup)
    ours, theirs = interleaved(run_one, torch_step, args.steps, alone=args.alone)
    timing = {"median_s": statistics.median(ours), "mean_s": statistics.fmean(ours), **info}
    row = _row(case, model.config, weights, batch_size, seq, timing, peak)
    if torch_step is None:
        row["timing"] = "alone"
        return row, None
    median = statistics.median(theirs)
    row["timing"] = "alone" if args.alone or torch_step is None else "interleaved"
    return row, {"case": torch_case, "timing": row["timing"], "interleaved_with": None if args.alone else case,
                 "step_ms": round(median * 1000, 1),
                 "mean_step_ms": round(statistics.fmean(theirs) * 1000, 1),
                 "tokens_per_s": round(batch_size * seq / median, 1),
                 "flaxen_speedup": round(median / timing["median_s"], 3), **torch_info,
                 "data": data_settings(RANDOM_IDS, torch_info["batch"], torch_info["seq"])}


def minilm_case(args, peak: float, torch_step=None, torch_info=None) -> tuple[dict, dict | None]:
    """flaxen's minilm row; with `torch_step` (a Hugging Face step function) also its row."""
    model, weights, batch, optimizer_cfg = minilm_setup(args.seq)
    return case_rows(args, peak, "minilm_seq_cls", model, weights, "seq_cls", optimizer_cfg, batch,
                     "minilm_seq_cls_hf_torch", torch_step, torch_info)


NANO = {"batch": 12, "seq": 64, "vocab": 65, "layers": 4, "heads": 4, "width": 128}


def gpt_nano_setup():
    """The shakespeare_char_cpu preset's model (no biases, as nanoGPT), one random batch and its
    optimizer settings."""
    batch_size, seq = NANO["batch"], NANO["seq"]
    config = models.ModelConfig(family="gpt2", vocab_size=NANO["vocab"], hidden_size=NANO["width"],
                                num_layers=NANO["layers"], num_heads=NANO["heads"], intermediate_size=4 * NANO["width"],
                                max_position_embeddings=seq, layer_norm_eps=1e-5, hidden_dropout=0.0,
                                attention_dropout=0.0, use_bias=False, **SETTINGS)
    model = modeling.ModelSpec(config, "causal_lm", 2).build(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, NANO["vocab"], (batch_size, seq + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "attention_mask": np.ones((batch_size, seq), np.int32), "labels": ids[:, 1:]}
    optimizer_cfg = OptimizerConfig(name="adamw", lr=1e-3, b2=0.99, weight_decay=0.1, clip_norm=1.0)
    return model, batch, optimizer_cfg


def gpt_nano_case(args, peak: float, torch_step=None, torch_info=None) -> tuple[dict, dict | None]:
    """The shakespeare_char_cpu preset's step; with `torch_step` (nanoGPT's recipe in PyTorch,
    scripts/nanogpt_torch.py) also its row."""
    model, batch, optimizer_cfg = gpt_nano_setup()
    return case_rows(args, peak, "gpt_nano_clm", model, "random", "clm", optimizer_cfg, batch,
                     "gpt_nano_clm_nanogpt_torch", torch_step, torch_info)


GPT2_SMALL = {"batch": 8, "seq": 1024}


def gpt2_small_case(args, peak: float) -> dict:
    """GPT-2 small (124M; configs/model/gpt2_small.yaml) causal LM on batch 8 x 1024 random tokens,
    AdamW with clipping, dropout 0.1 as GPT-2's config: the accelerator case (bf16 compute and the
    cuDNN attention kernel with --dtype bfloat16 --attention cudnn)."""
    batch_size, seq = GPT2_SMALL["batch"], GPT2_SMALL["seq"]
    config = models.ModelConfig(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                                intermediate_size=3072, max_position_embeddings=1024, layer_norm_eps=1e-5,
                                hidden_dropout=0.1, attention_dropout=0.0, **SETTINGS)
    model = modeling.ModelSpec(config, "causal_lm", 2).build(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (batch_size, seq + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "attention_mask": np.ones((batch_size, seq), np.int32), "labels": ids[:, 1:]}
    optimizer_cfg = OptimizerConfig(name="adamw", lr=6e-4, b2=0.95, weight_decay=0.1, clip_norm=1.0)
    row, _ = case_rows(args, peak, "gpt2_small_clm", model, "random", "clm", optimizer_cfg, batch, "")
    return row


def bert_mini_mlm_setup(max_predictions_per_row):
    """configs/experiment/bert_mini_mlm.yaml's model (bert_mini with its 8,000-id WordPiece
    vocabulary, dropout 0), task, optimizer and batch (16 x 128) with `task.max_predictions_per_row`
    overridden when not None (0: the head at every position). The batch: random content ids between
    [CLS] and [SEP], each content token masked with data.mlm_probability, capped at the preset's
    derived max_predictions_per_row as flaxen's masking caps it (the same batch whatever the override)."""
    from omegaconf import OmegaConf

    from flaxen import tasks
    from flaxen.config import compose
    from flaxen.data import encoding
    from flaxen.tasks.mlm import default_max_predictions

    overrides = [] if max_predictions_per_row is None else [f"task.max_predictions_per_row={max_predictions_per_row}"]
    cfg = compose(["experiment=bert_mini_mlm", *overrides])
    values = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in ("name", "pretrained")}
    values.update(vocab_size=int(cfg.data.tokenizer.vocab_size), **SETTINGS)
    model = modeling.ModelSpec(models.ModelConfig.from_dict(values), "mlm", 2).build(cfg.seed)
    batch_size, seq = int(cfg.batch_size), int(cfg.data.window_length)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, values["vocab_size"], (batch_size, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
    labels = np.full((batch_size, seq), -100, np.int32)
    inputs = ids.copy()
    cap = default_max_predictions(seq, float(cfg.data.mlm_probability))
    for row in range(batch_size):
        chosen = np.flatnonzero(rng.random(seq - 2) < cfg.data.mlm_probability) + 1
        labels[row, chosen], inputs[row, chosen] = ids[row, chosen], 4  # [MASK]
        encoding.cap_predictions(ids[row], inputs[row], labels[row], cap, rng)
    batch = {"input_ids": inputs, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": labels}
    optimizer_cfg = OptimizerConfig(**OmegaConf.to_container(cfg.optimizer))
    return model, tasks.for_run(cfg), batch, optimizer_cfg


def bert_mini_mlm_rows(args, peak: float) -> list[dict]:
    """The bert_mini_mlm preset's masked-LM train step with the MLM head at the masked positions
    only (flaxen's default: task.max_predictions_per_row derived, 41 of 128) and, as the ablation,
    at every position (task.max_predictions_per_row=0: the full vocabulary projection), on the same
    batch from the same initial weights, one step of each in turn so load hits both alike (with
    --alone: all gathered steps, then all full ones). `model_gflop_per_step` counts the same
    Transformer FLOPs for both (the tied vocabulary projection is not in it): compare step_ms."""
    rows = []
    prepared = []
    for override in (None, 0):
        model, task, batch, optimizer_cfg = bert_mini_mlm_setup(override)
        run_one, info = prepare_train_step(model, task, optimizer_cfg, batch, args.warmup)
        prepared.append((model, task, batch, run_one, info))
    gathered, full = interleaved(prepared[0][3], prepared[1][3], args.steps, alone=args.alone)
    for (model, task, batch, _, info), times, case in zip(prepared, (gathered, full),
                                                          ("bert_mini_mlm", "bert_mini_mlm_full_projection")):
        batch_size, seq = batch["input_ids"].shape
        row = _row(case, model.config, "random", batch_size, seq,
                   {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), **info}, peak)
        row["mlm_head_positions_per_row"] = task.gather_size(seq) or seq
        row["timing"] = "alone" if args.alone else "interleaved"
        rows.append(row)
    rows[0]["speedup_over_full_projection"] = round(rows[1]["step_ms"] / rows[0]["step_ms"], 3)
    return rows


def _row(case, config, weights, batch_size, seq, timing, peak) -> dict:
    flops = model_flops(config, timing["non_embedding_params"], batch_size, seq)
    step = timing["median_s"]
    return {"case": case, "weights": weights, "batch": batch_size, "seq": seq,
            "step_ms": round(step * 1000, 1), "mean_step_ms": round(timing["mean_s"] * 1000, 1),
            "tokens_per_s": round(batch_size * seq / step, 1), "model_gflop_per_step": round(flops / 1e9, 2),
            "mfu": round(flops / step / (peak * 1e9), 4), "compile_s": round(timing["compile_s"], 1),
            "loss": round(timing["loss"], 4), "dtype": config.dtype,
            "attention_implementation": config.attention_implementation,
            "data": data_settings(RANDOM_IDS, batch_size, seq)}


def torch_minilm_step(args):
    """Hugging Face PyTorch on the minilm case (the work of ../shared/bench/hf_torch_minilm_step.py),
    warmed up; returns (step function, description)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(models.minilm_path(), num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    b, t = 32, args.seq
    x = torch.randint(1000, 30000, (b, t))
    y = torch.randint(0, 2, (b,))
    mask = torch.ones(b, t, dtype=torch.long)

    def step():
        out = model(input_ids=x, attention_mask=mask, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(args.warmup):
        step()
    return step, {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": b, "seq": t}


def torch_nano_step(args):
    """nanoGPT's recipe in PyTorch on the gpt_nano case (scripts/nanogpt_torch.py: the same model,
    AdamW and global-norm clipping as its train.py), warmed up; returns (step function, description)."""
    import torch
    from nanogpt_torch import build, make_optimizer, train_step

    torch.manual_seed(0)
    model = build(NANO["vocab"], NANO["layers"], NANO["heads"], NANO["width"], NANO["seq"])
    opt = make_optimizer(model, 1e-3, 0.1)
    ids = torch.randint(0, NANO["vocab"], (NANO["batch"], NANO["seq"] + 1))

    def step():
        train_step(model, opt, ids[:, :-1], ids[:, 1:], clip=1.0)

    for _ in range(args.warmup):
        step()
    return step, {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": NANO["batch"],
                  "seq": NANO["seq"]}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(r"compiled and ran the first step in ([0-9.]+)s")


def train_process(overrides: list[str], log_path: str, env: dict | None = None) -> tuple[float, str]:
    """Runs `python train.py OVERRIDES` as a user would (progress bar off); returns (wall seconds of
    the whole process, its output). Exits with the log's tail when the run fails."""
    command = [sys.executable, "train.py", "progress_bar=false", *overrides]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - start
    with open(log_path) as f:
        output = f.read()
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed (exit {done.returncode}):\n{output[-2000:]}")
    return wall, output


# JAX_LOG_COMPILES lines: "Finished tracing NAME for jit in 0.5 sec", "Finished jaxpr to MLIR module
# conversion jit(NAME) in 0.2 sec", "Finished XLA compilation of jit(NAME) in 4.1 sec" (compiling, or
# loading the program from the persistent cache)
PHASES = {"trace_s": re.compile(r"Finished tracing .* for jit in ([0-9.e-]+) sec"),
          "lower_s": re.compile(r"Finished jaxpr to MLIR module conversion .* in ([0-9.e-]+) sec"),
          "compile_s": re.compile(r"Finished XLA compilation of .* in ([0-9.e-]+) sec")}


def compile_cache_rows(work: str) -> list[dict]:
    """For the quickstart and MiniLM SST-2 presets: the first step's time (as the loop logs it:
    from the loop's start, so the first batch, tracing, compiling or loading the compiled program,
    and the step itself) with an empty persistent compilation cache, then again in a new run
    directory with the cache the first run filled; and, from JAX's own log (JAX_LOG_COMPILES), the
    seconds the whole 2-step process spent tracing, lowering and compiling (a program loaded from
    the cache counts no compilation)."""
    rows = []
    for experiment, extra in (("quickstart", []), ("minilm_sst2", [])):
        cache = os.path.join(work, f"cache_{experiment}")
        times = {}
        for state_of_cache in ("cold", "warm"):
            run_dir = os.path.join(work, f"{experiment}_{state_of_cache}")
            _, output = train_process([f"experiment={experiment}", f"hydra.run.dir={run_dir}", "steps=2",
                                       "schedule.warmup_steps=1", "eval_split=null",
                                       f"compilation_cache_dir={cache}", *extra],
                                      os.path.join(work, f"{experiment}_{state_of_cache}.log"),
                                      env={"JAX_LOG_COMPILES": "1"})
            found = FIRST_STEP.search(output)
            if not found:
                sys.exit(f"bench: no first-step time in the log of experiment={experiment}")
            times[state_of_cache] = {"first_step_s": float(found.group(1)),
                                     **{phase: round(sum(float(x) for x in pattern.findall(output)), 2)
                                        for phase, pattern in PHASES.items()}}
        cold, warm = times["cold"], times["warm"]
        rows.append({"case": f"compile_cache_{experiment}", "cold": cold, "warm": warm,
                     "first_step_warm_over_cold": round(warm["first_step_s"] / cold["first_step_s"], 3),
                     "compile_warm_over_cold": round(warm["compile_s"] / max(cold["compile_s"], 1e-9), 3),
                     "data": data_settings(f"experiment={experiment}, steps=2")})
    return rows


def end_to_end_rows(work: str, steps: int | None = None) -> list[dict]:
    """`python train.py experiment=minilm_sst2` (with an empty compilation cache, then again in a
    new run directory with the filled cache) and its Hugging Face Trainer peer
    (scripts/hf_trainer_sst2.py), one after the other: wall time of the whole process (training,
    evaluations, checkpoints) and final validation accuracy of each."""
    budget = [f"steps={steps}", f"schedule.warmup_steps={steps // 8}"] if steps else []
    cache = os.path.join(work, "cache_e2e")
    rows = []
    for state_of_cache in ("cold", "warm"):
        run_dir = os.path.join(work, f"e2e_minilm_sst2_{state_of_cache}")
        wall, _ = train_process(["experiment=minilm_sst2", f"hydra.run.dir={run_dir}",
                                 f"compilation_cache_dir={cache}", *budget],
                                os.path.join(work, f"e2e_minilm_sst2_{state_of_cache}.log"))
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f)
        rows.append({"case": f"sst2_end_to_end_flaxen_{state_of_cache}_cache", "wall_s": round(wall, 1),
                     "train_s": round(results["train_seconds"], 1), "steps": results["steps"],
                     "validation_accuracy": results["final_eval"]["accuracy"],
                     "data": data_settings("SST-2 train.tsv, length-grouped buckets 16/32/64", 32, 64)})
    out = os.path.join(work, "hf.json")
    command = [sys.executable, os.path.join(ROOT, "scripts", "hf_trainer_sst2.py"), "--output-dir",
               os.path.join(work, "hf_trainer"), "--out", out,
               *([f"--steps={steps}", f"--warmup-steps={steps // 8}"] if steps else [])]
    start = time.perf_counter()
    with open(os.path.join(work, "hf_trainer.log"), "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed (exit {done.returncode}); see {log.name}")
    with open(out) as f:
        peer = json.load(f)
    rows.append({**peer, "wall_s": round(wall, 1), "script_wall_s": peer["wall_s"],
                 "data": data_settings("SST-2 train.tsv, dynamic padding, group_by_length", 32, 64)})
    for row in rows[:2]:
        row["flaxen_speedup"] = round(wall / row["wall_s"], 3)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="peak,minilm,gpt_nano")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch peers: Hugging Face (minilm) and nanoGPT's recipe (gpt_nano)")
    parser.add_argument("--seq", type=int, default=128,
                        help="minilm: tokens per row (SST-2's length-grouped batches are mostly 16 or 32)")
    parser.add_argument("--alone", action="store_true",
                        help="with --torch: time all of flaxen's steps, then all of PyTorch's (each alone), "
                             "instead of alternating them")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the step cases (parameters stay float32)")
    parser.add_argument("--attention", choices=("default", "xla", "cudnn"), default="default",
                        help="jax.nn.dot_product_attention's implementation (cudnn: NVIDIA GPUs, with --dtype bfloat16)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the accelerator's dense peak for --dtype, TFLOP/s, for MFU (default: the table "
                             "ACCELERATOR_PEAK_TFLOPS by device kind; on CPU the matmul peak measured here)")
    parser.add_argument("--e2e-steps", type=int, default=None,
                        help="e2e_sst2: train this many steps instead of the preset's 800 (a quick check)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if "compile_cache" in cases or "e2e_sst2" in cases:
        work = tempfile.mkdtemp(prefix="flaxen_bench_")
        if "compile_cache" in cases:
            for row in compile_cache_rows(work):
                emit(row)
        if "e2e_sst2" in cases:
            for row in end_to_end_rows(work, args.e2e_steps):
                emit(row)
        if not {"peak", "minilm", "gpt_nano", "bert_mini_mlm"} & set(cases):
            return
    SETTINGS["dtype"] = args.dtype
    SETTINGS["attention_implementation"] = None if args.attention == "default" else args.attention
    accelerator = jax.devices()[0].platform != "cpu"
    dtype = jnp.dtype(args.dtype)
    measured = matmul_peak(8192 if accelerator else 2048, dtype=dtype)
    peak = measured
    if accelerator:
        kind = jax.devices()[0].device_kind
        nominal = args.peak_tflops or next((v[args.dtype] for k, v in ACCELERATOR_PEAK_TFLOPS.items() if k in kind),
                                           None)
        peak = nominal * 1000 if nominal else measured
    elif args.peak_tflops:
        peak = args.peak_tflops * 1000
    emit({"case": "host_f32_matmul_peak" if args.dtype == "float32" else "host_bf16_matmul_peak", "gflops": round(measured, 1), "mfu_peak_gflops": round(peak, 1),
          "devices": str(jax.devices()), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "data": data_settings(f"two random normal square {args.dtype} matrices")})
    if "minilm" in cases:
        row, reference = minilm_case(args, peak, *(torch_minilm_step(args) if args.torch else (None, None)))
        emit(row)
        if reference is not None:
            emit(reference)
    if "gpt_nano" in cases:
        row, reference = gpt_nano_case(args, peak, *(torch_nano_step(args) if args.torch else (None, None)))
        emit(row)
        if reference is not None:
            emit(reference)
    if "gpt2_small" in cases:
        emit(gpt2_small_case(args, peak))
    if "bert_mini_mlm" in cases:
        for row in bert_mini_mlm_rows(args, peak):
            emit(row)


if __name__ == "__main__":
    main()
