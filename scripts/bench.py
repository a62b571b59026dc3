"""Benchmarks of flaxen's train step: one JSON line per case.

    python scripts/bench.py [--cases peak,minilm,gpt_nano] [--steps 10] [--warmup 3] [--torch]

First the host's f32 matmul peak (2048 x 2048 x 2048 under jax.jit, median of 10 after warm-up),
then, with the same train step flaxen.loop runs (nnx split once, jit with shardings on a 1-device
mesh, donated state, dropout keys folded from the step):
  minilm    all-MiniLM-L6-v2 (real weights when installed) + 2-class head, full fine-tuning with
            AdamW, batch 32 x 128 tokens, dropout on (as Hugging Face's model.train());
  gpt_nano  nanoGPT's CPU model (4 layers, 4 heads, 128 wide, 65 symbols, no biases) + causal LM,
            batch 12 x 64, AdamW (beta2 0.99, weight decay 0.1), clip 1.0, dropout 0.
Each case reports step time (median and mean over --steps timed steps), tokens/s and MFU: model
FLOPs per step = 6 x non-embedding parameters x tokens + 12 x layers x batch x seq^2 x width,
divided by step time and by the peak measured in this process.
Every line also records what it was measured on and with: `cpu` (model and core count, as
scripts/reproduce.py's host()), `git_commit`, `load_avg` (os.getloadavg() when the line was
written: 1, 5 and 15 min; other processes' load slows the steps) and `data` (source, batch, seq,
length_grouping: the train step cases run on one fixed batch of random token ids).
`--torch` also times the PyTorch peers in this process (torch needed; transformers for minilm):
Hugging Face's BertForSequenceClassification on the minilm case and nanoGPT's recipe
(scripts/nanogpt_torch.py) on the gpt_nano case, alternating one flaxen step and one PyTorch step
so both see the same machine load, and reports flaxen's speed-up over each (> 1: flaxen is faster).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
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


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """f32 GFLOP/s of a jitted size^3 matmul (median of `repeats` after warm-up)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
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


def prepare_train_step(model, task: str, optimizer_cfg, batch: dict, warmup: int):
    """flaxen's train step on `batch` (flaxen.state.build, as flaxen.loop), compiled and warmed up.

    Returns (run_one, info): run_one() runs one step to completion; info holds compile time,
    non-embedding parameter count and the last loss."""
    setup = state.build(model, task, sharding.make_mesh(MeshConfig()), {}, optimizer_cfg=optimizer_cfg,
                        schedule=optax.constant_schedule(optimizer_cfg.lr))
    params, opt_state, rest, train_step = setup.params, setup.opt_state, setup.rest, setup.train_step
    batch_sharding = setup.batch_sharding
    rng = jax.random.key(0, impl=RNG_IMPL)
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


def minilm_setup():
    batch_size, seq = 32, 128
    try:
        path = models.minilm_path()
        model = models.load_pretrained(path, head="seq_cls", num_labels=2)
        weights = "all-MiniLM-L6-v2"
    except Exception:
        config = models.ModelConfig(family="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                                    intermediate_size=1536)
        model = modeling.ModelSpec(config, "seq_cls", 2).build(0)
        weights = "random (all-MiniLM-L6-v2 not installed)"
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 30000, (batch_size, seq)).astype(np.int32),
             "attention_mask": np.ones((batch_size, seq), np.int32),
             "token_type_ids": np.zeros((batch_size, seq), np.int32),
             "labels": rng.integers(0, 2, batch_size).astype(np.int32)}
    optimizer_cfg = OptimizerConfig(name="adamw", lr=2e-5, weight_decay=0.01, clip_norm=0.0)
    return model, weights, batch, optimizer_cfg


def interleaved(run_one, torch_step, count: int) -> tuple[list[float], list[float]]:
    """Step times of flaxen and (if given) PyTorch, one step of each in turn, so that load from
    other processes hits both alike."""
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
    ours, theirs = interleaved(run_one, torch_step, args.steps)
    timing = {"median_s": statistics.median(ours), "mean_s": statistics.fmean(ours), **info}
    row = _row(case, model.config, weights, batch_size, seq, timing, peak)
    if torch_step is None:
        return row, None
    median = statistics.median(theirs)
    return row, {"case": torch_case, "interleaved_with": case, "step_ms": round(median * 1000, 1),
                 "mean_step_ms": round(statistics.fmean(theirs) * 1000, 1),
                 "tokens_per_s": round(batch_size * seq / median, 1),
                 "flaxen_speedup": round(median / timing["median_s"], 3), **torch_info,
                 "data": data_settings(RANDOM_IDS, torch_info["batch"], torch_info["seq"])}


def minilm_case(args, peak: float, torch_step=None, torch_info=None) -> tuple[dict, dict | None]:
    """flaxen's minilm row; with `torch_step` (a Hugging Face step function) also its row."""
    model, weights, batch, optimizer_cfg = minilm_setup()
    return case_rows(args, peak, "minilm_seq_cls", model, weights, "seq_cls", optimizer_cfg, batch,
                     "minilm_seq_cls_hf_torch", torch_step, torch_info)


NANO = {"batch": 12, "seq": 64, "vocab": 65, "layers": 4, "heads": 4, "width": 128}


def gpt_nano_case(args, peak: float, torch_step=None, torch_info=None) -> tuple[dict, dict | None]:
    """The shakespeare_char_cpu preset's step (no biases, as nanoGPT); with `torch_step` (nanoGPT's
    recipe in PyTorch, scripts/nanogpt_torch.py) also its row."""
    batch_size, seq = NANO["batch"], NANO["seq"]
    config = models.ModelConfig(family="gpt2", vocab_size=NANO["vocab"], hidden_size=NANO["width"],
                                num_layers=NANO["layers"], num_heads=NANO["heads"], intermediate_size=4 * NANO["width"],
                                max_position_embeddings=seq, layer_norm_eps=1e-5, hidden_dropout=0.0,
                                attention_dropout=0.0, use_bias=False)
    model = modeling.ModelSpec(config, "causal_lm", 2).build(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, NANO["vocab"], (batch_size, seq + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "attention_mask": np.ones((batch_size, seq), np.int32), "labels": ids[:, 1:]}
    optimizer_cfg = OptimizerConfig(name="adamw", lr=1e-3, b2=0.99, weight_decay=0.1, clip_norm=1.0)
    return case_rows(args, peak, "gpt_nano_clm", model, "random", "clm", optimizer_cfg, batch,
                     "gpt_nano_clm_nanogpt_torch", torch_step, torch_info)


def _row(case, config, weights, batch_size, seq, timing, peak) -> dict:
    flops = model_flops(config, timing["non_embedding_params"], batch_size, seq)
    step = timing["median_s"]
    return {"case": case, "weights": weights, "batch": batch_size, "seq": seq,
            "step_ms": round(step * 1000, 1), "mean_step_ms": round(timing["mean_s"] * 1000, 1),
            "tokens_per_s": round(batch_size * seq / step, 1), "model_gflop_per_step": round(flops / 1e9, 2),
            "mfu": round(flops / step / (peak * 1e9), 4), "compile_s": round(timing["compile_s"], 1),
            "loss": round(timing["loss"], 4), "dtype": config.dtype, "data": data_settings(RANDOM_IDS, batch_size, seq)}


def torch_minilm_step(args):
    """Hugging Face PyTorch on the minilm case (the work of ../shared/bench/hf_torch_minilm_step.py),
    warmed up; returns (step function, description)."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(models.minilm_path(), num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    b, t = 32, 128
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="peak,minilm,gpt_nano")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch peers: Hugging Face (minilm) and nanoGPT's recipe (gpt_nano)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    peak = matmul_peak()
    emit({"case": "host_f32_matmul_peak", "gflops": round(peak, 1), "devices": str(jax.devices()),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "data": data_settings("two random normal 2048 x 2048 float32 matrices")})
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


if __name__ == "__main__":
    main()
