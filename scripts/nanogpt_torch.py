"""PyTorch peer of `python train.py experiment=shakespeare_char_cpu`: nanoGPT's CPU run, written out.

Why: the preset's target (validation loss <= 1.88) comes from one nanoGPT run whose final loss is
an estimate from 20 random validation batches (240 windows, 15,360 characters). This script runs
the same recipe as nanoGPT's train.py and model.py (PyTorch, float32, CPU) on the same files, so
flaxen's loss and speed can be set beside a PyTorch run on the same machine, evaluated both ways:

- nanoGPT's estimate: the mean loss of `eval_iters` random batches of the validation split;
- the full validation split in consecutive windows, token-weighted, as `flaxen.evaluate` does.

The recipe (nanoGPT, bias=False, its README's CPU command line): characters sorted into a
65-symbol vocabulary, first 90 % train, last 10 % validation; GPT with 4 layers, 4 heads, width 128,
block 64, tied input/output embeddings, exact GELU, pre-LayerNorm without biases; weights N(0, 0.02),
residual projections N(0, 0.02 / sqrt(2 * layers)); batch 12 of random windows; AdamW (0.9, 0.99),
weight decay 0.1 on every tensor with 2+ dimensions, global-norm clip 1.0; lr 1e-3 * (it + 1) / 101
for 100 warm-up iterations, then cosine to 1e-4 at iteration 2000; torch.manual_seed(1337 + seed).
The loss is read after 2000 updates, where nanoGPT prints its iteration-2000 evaluation.

    python scripts/nanogpt_torch.py                       # seed 0 -> results/shakespeare_char_cpu_torch.json
    python scripts/nanogpt_torch.py --seeds 0 1 2         # one record per seed in the same file
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np

from flaxen.data.config import default_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_text(data_dir: str) -> tuple[np.ndarray, np.ndarray, int]:
    path = os.path.join(data_dir, "tinyshakespeare", "input.txt")
    if not os.path.isfile(path):
        sys.exit(f"nanogpt_torch: {path} not found; set FLAXEN_DATA_DIR (or --data-dir) to the folder that "
                 "holds tinyshakespeare/input.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:], len(chars)


def build(vocab: int, layers: int = 4, heads: int = 4, width: int = 128, block: int = 64):
    """nanoGPT's GPT (bias=False, dropout 0) in PyTorch; forward(idx, targets) -> cross-entropy."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class LayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return F.layer_norm(x, (width,), self.weight, None, 1e-5)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(width, 3 * width, bias=False)
            self.c_proj = nn.Linear(width, width, bias=False)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in self.c_attn(x).split(width, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = LayerNorm(), Attention(), LayerNorm()
            self.c_fc = nn.Linear(width, 4 * width, bias=False)
            self.c_proj = nn.Linear(4 * width, width, bias=False)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(block, width)
            self.h = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = LayerNorm()
            self.lm_head = nn.Linear(width, vocab, bias=False)
            self.wte.weight = self.lm_head.weight
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

        def forward(self, idx, targets, reduction="mean"):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for blk in self.h:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=reduction)

    return GPT()


def full_split_loss(model, ids: np.ndarray, block: int, batch: int = 120) -> float:
    """Token-weighted mean loss over consecutive windows of the whole split (flaxen.evaluate's loss):
    windows start every `block` tokens, each scores the next token at each position, the last is shorter."""
    import torch

    was_training = model.training
    model.eval()
    total, count, d = 0.0, 0, torch.from_numpy(ids)
    starts = list(range(0, len(ids) - 1, block))
    full, last = [s for s in starts if s + block < len(ids)], [s for s in starts if s + block >= len(ids)]
    with torch.no_grad():
        for i in range(0, len(full), batch):
            x = torch.stack([d[s:s + block] for s in full[i:i + batch]])
            y = torch.stack([d[s + 1:s + 1 + block] for s in full[i:i + batch]])
            total, count = total + model(x, y, reduction="sum").item(), count + y.numel()
        for s in last:
            y = d[s + 1:]
            total, count = total + model(d[s:s + len(y)][None], y[None], reduction="sum").item(), count + len(y)
    model.train(was_training)
    return total / count


def make_optimizer(model, lr: float, weight_decay: float):
    """nanoGPT's AdamW: betas (0.9, 0.99), weight decay on every tensor with 2+ dimensions."""
    import torch

    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def train_step(model, optimizer, x, y, clip: float) -> None:
    """One update as nanoGPT's train.py makes it: loss, backward, global-norm clip, AdamW step."""
    import torch

    model(x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(seed: int, train: np.ndarray, val: np.ndarray, vocab: int, args) -> dict:
    import torch

    torch.manual_seed(1337 + seed)
    model = build(vocab, args.layers, args.heads, args.width, args.block)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    data = {"train": torch.from_numpy(train), "val": torch.from_numpy(val)}

    def get_batch(split):
        d = data[split]
        ix = torch.randint(len(d) - args.block, (args.batch,))
        return (torch.stack([d[i:i + args.block] for i in ix]), torch.stack([d[i + 1:i + 1 + args.block] for i in ix]))

    def lr_at(it):
        if it < args.warmup:
            return args.lr * (it + 1) / (args.warmup + 1)
        ratio = min((it - args.warmup) / (args.iters - args.warmup), 1.0)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)

    @torch.no_grad()
    def estimate(split):
        model.eval()
        losses = [model(*get_batch(split)).item() for _ in range(args.eval_iters)]
        model.train()
        return float(np.mean(losses))

    history = []
    x, y = get_batch("train")
    step_times = []
    start = time.perf_counter()
    eval_seconds = 0.0
    for it in range(args.iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        if it % args.eval_interval == 0:
            t0 = time.perf_counter()
            history.append({"iter": it, "train_estimate": estimate("train"), "val_estimate": estimate("val")})
            eval_seconds += time.perf_counter() - t0
            print(f"seed {seed} iter {it}: train {history[-1]['train_estimate']:.4f} "
                  f"val {history[-1]['val_estimate']:.4f}", flush=True)
        if it == args.iters:
            break
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, args.clip)
        x, y = get_batch("train")  # nanoGPT draws the next batch within the iteration, as here
        step_times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    full = full_split_loss(model, val, args.block)
    return {
        "seed": seed,
        "val_loss_estimate": history[-1]["val_estimate"],
        "train_loss_estimate": history[-1]["train_estimate"],
        "val_loss_full_split": full,
        "val_tokens_full_split": len(val) - 1,
        "ms_per_iter": 1000 * float(np.median(step_times)),
        "wall_seconds": wall,
        "eval_seconds": eval_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", default=default_data_dir(), help="default: FLAXEN_DATA_DIR, else ~/flaxen_data")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "shakespeare_char_cpu_torch.json"))
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--eval-iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0)
    args = parser.parse_args(argv)

    import torch
    from reproduce import host

    train, val, vocab = load_text(args.data_dir)
    runs = [run(seed, train, val, vocab, args) for seed in args.seeds]
    for r in runs:
        print(f"seed {r['seed']}: val estimate {r['val_loss_estimate']:.4f}, full split {r['val_loss_full_split']:.4f}, "
              f"{r['ms_per_iter']:.1f} ms/iter, {r['wall_seconds']:.0f} s", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "data_dir", "out")}
    report = {"peer": "nanoGPT recipe in PyTorch (scripts/nanogpt_torch.py)", "settings": settings,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": host(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python scripts/nanogpt_torch.py --seeds " + " ".join(map(str, args.seeds)), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
