"""Where a train step's time goes: flaxen (XLA's profiler) beside PyTorch (torch.profiler).

    python scripts/profile_step.py [--cases minilm,gpt_nano] [--steps 5] [--out results/profile_cpu.json]
    python scripts/profile_step.py --ablations --steps 8 [--out results/step_ablations_cpu.json]

The same two cases as scripts/bench.py (MiniLM seq_cls 32 x 128 with dropout, AdamW; gpt_nano
causal LM 12 x 64, AdamW + clipping) and the same PyTorch peers (Hugging Face
BertForSequenceClassification; nanoGPT's recipe). Each side runs --steps profiled steps after
warm-up; every op's time is summed and put into one of these categories:

  matmul          the projections and the MLP's dots (with the bias or GELU XLA fuses into them)
  attention       q·kᵀ, softmax and p·v, forward and backward (and their masking)
  norm/activation layer norm and GELU outside a dot's fusion
  dropout         the dropout masks and their application
  layout          copies, transposes, concatenations, slices (data movement only)
  optimizer       the global gradient norm, clipping and the AdamW update
  loss            the task's loss (cross-entropy over the labels or the vocabulary)
  other           the remaining elementwise work: residual adds, embedding lookups and their
                  gradients, bias gradients
  host            step wall time not covered by any op (dispatch, Python, waiting)

flaxen's ops are classified from the compiled program: flaxen names its parts with jax.named_scope
(models.layers: norm, dropout, activation; models.attention: attention; flaxen.steps: loss,
optimizer), XLA keeps the scope in each op's metadata, and a fusion holding a dot outside the
attention scope is a matmul. PyTorch's ops are classified by aten name (mm/addmm matmul; bmm,
softmax and scaled_dot_product attention; bernoulli/dropout; layer_norm/gelu; copies and views
layout) and by the record scope Optimizer.step. Times are per step (the sum over the profiled steps
divided by their number); shares are of that total. Profiling adds a per-op cost that weighs most
on small ops (gpt_nano). Run it on a quiet machine: other load inflates the host share.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench  # noqa: E402

CATEGORIES = ("matmul", "attention", "norm/activation", "dropout", "layout", "optimizer", "loss", "other", "host")


# ----------------------------------------------------------------------------- flaxen (XLA)


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an optimized HLO module's text."""
    found, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name, lines = header.group(1), []
            found[name] = lines
        elif name is not None and line.strip() and line.strip() != "}":
            lines.append(line.strip())
    return found


def _instruction(line: str) -> tuple[str, str, str]:
    """(name, opcode, shape) of one HLO instruction line."""
    match = re.match(r"^(?:ROOT )?%?([\w.\-]+) = ([^ ]+(?: [^ ]+)*?) ([a-z][\w\-]*)\(", line)
    if not match:
        return "", "", ""
    return match.group(1), match.group(3), match.group(2)


LAYOUT_OPS = {"copy", "transpose", "bitcast", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice",
              "reshape", "broadcast", "parameter", "tuple", "get-tuple-element", "constant", "pad", "copy-start",
              "copy-done", "iota", "fusion"}
# named scopes flaxen puts around its parts (models.layers, models.attention, flaxen.steps), as they
# appear in an op's metadata op_name, e.g. "jit(train_step)/transpose(jvp(attention))/dot_general"
SCOPES = (("optimizer", "optimizer"), ("loss", "loss"), ("dropout", "dropout"), ("attention", "attention"),
          ("norm", "norm/activation"), ("activation", "norm/activation"))


def _scope_category(op_name: str) -> str | None:
    parts = set(re.split(r"[/()]", op_name))
    return next((category for scope, category in SCOPES if scope in parts), None)


def classify_hlo(hlo_text: str) -> dict[str, str]:
    """{instruction name: category} for the instructions of a compiled train step: the named scope
    in its op_name first (optimizer, loss, dropout, attention, norm / activation); otherwise dots
    are matmuls, data movement is layout, and the remaining elementwise work (residual adds,
    embedding gathers, bias gradients) is "other"."""
    computations = _computations(hlo_text)

    def kinds(computation: str, seen: set) -> set[str]:
        if computation in seen or computation not in computations:
            return set()
        seen.add(computation)
        out = set()
        for line in computations[computation]:
            _, opcode, _ = _instruction(line)
            if opcode:
                out.add(opcode)
            for target in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                out |= kinds(target, seen)
        return out

    categories = {}
    for lines in computations.values():
        for line in lines:
            name, opcode, _ = _instruction(line)
            if not name:
                continue
            target = re.search(r"calls=%?([\w.\-]+)", line)
            ops = {opcode} | (kinds(target.group(1), set()) if target else set())
            op_name = re.search(r'op_name="([^"]*)"', line)
            scoped = _scope_category(op_name.group(1)) if op_name else None
            if scoped in ("attention", "optimizer", "loss", "dropout"):
                categories[name] = scoped
            elif "dot" in ops or "convolution" in ops:
                categories[name] = "matmul"
            elif scoped is not None:
                categories[name] = scoped
            elif ops <= LAYOUT_OPS:
                categories[name] = "layout"
            else:
                categories[name] = "other"
    return categories


def profile_flaxen(run_one, train_step_hlo: str, steps: int) -> dict:
    """{category: seconds per step} of `steps` flaxen steps under jax.profiler, and the wall time."""
    categories = classify_hlo(train_step_hlo)
    directory = tempfile.mkdtemp(prefix="flaxen_profile_")
    walls = []
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            start = time.perf_counter()
            run_one()
            walls.append(time.perf_counter() - start)
    trace = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(trace) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    ops = collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if name not in categories:
            continue
        category = categories[name]
        totals[category] += event.get("dur", 0) / 1e6
        ops[name] += event.get("dur", 0) / 1e6
    return _summary(totals, walls, steps, ops)


def _summary(totals: collections.Counter, walls: list[float], steps: int, ops: collections.Counter) -> dict:
    wall = sum(walls)
    per_step = {c: totals.get(c, 0.0) / steps for c in CATEGORIES if c != "host"}
    # op times can overlap (two threads): the host share is what the ops leave of the wall time
    per_step["host"] = max(0.0, wall / steps - sum(per_step.values()))
    total = sum(per_step.values())
    return {"step_s": statistics.median(walls), "per_step_s": {c: round(v, 5) for c, v in per_step.items()},
            "share": {c: round(v / total, 4) for c, v in per_step.items()},
            "top_ops": [[name, round(t / steps * 1000, 2)] for name, t in ops.most_common(15)]}


# ----------------------------------------------------------------------------- PyTorch


TORCH_CATEGORIES = [
    ("optimizer", re.compile(r"^(Optimizer\.|aten::_foreach|aten::_fused_adam|aten::addcdiv|aten::lerp|"
                             r"torch\.nn\.utils\.clip|aten::linalg_vector_norm|aten::norm$)")),
    ("dropout", re.compile(r"(dropout|bernoulli|native_dropout)")),
    ("attention", re.compile(r"(aten::bmm|aten::baddbmm|softmax|scaled_dot_product|_flash_attention|"
                             r"_efficient_attention|aten::masked_fill)")),
    ("matmul", re.compile(r"^aten::(addmm|mm|matmul|linear)$")),
    ("norm/activation", re.compile(r"(layer_norm|gelu|tanh)")),
    ("loss", re.compile(r"(cross_entropy|nll_loss|log_softmax)")),
    ("layout", re.compile(r"^aten::(copy_|contiguous|clone|transpose|permute|view|reshape|t|cat|slice|select|"
                          r"expand|_unsafe_view|as_strided|unsqueeze|squeeze|split|chunk|empty|zeros|zero_|"
                          r"fill_|empty_like|zeros_like|detach|index_select|embedding)$")),
]


def profile_torch(step, steps: int) -> dict:
    """{category: seconds per step} of `steps` PyTorch steps under torch.profiler (self CPU time
    of each aten op; the optimizer by its record scope)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
    del torch
    totals, ops = collections.Counter(), collections.Counter()
    # optimizer scope: every op inside Optimizer.step counts as optimizer
    events = prof.events()
    scopes = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.step")]
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        inside = any(s <= event.time_range.start and event.time_range.end <= e for s, e in scopes)
        category = "optimizer" if inside else next(
            (name for name, pattern in TORCH_CATEGORIES if pattern.search(event.name)), "other")
        totals[category] += seconds
        ops[event.name] += seconds
    return _summary(totals, walls, steps, ops)


# ----------------------------------------------------------------------------- ablations


def _variant_steps(case: str, variants: dict, warmup: int) -> dict:
    """{variant: run_one} of the case's flaxen step built under each variant's patches (a list of
    (object, attribute, value) set while the step is built and compiled)."""
    steps = {}
    for name, patches in variants.items():
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        try:
            steps[name], _ = _flaxen_step(case, warmup)
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)
    return steps


def _flaxen_step(case: str, warmup: int, hlo: bool = False):
    """(run_one, info) of bench.py's flaxen step for `case` (minilm | gpt_nano)."""
    if case == "minilm":
        model, _, batch, optimizer_cfg = bench.minilm_setup()
        return bench.prepare_train_step(model, "seq_cls", optimizer_cfg, batch, warmup, hlo=hlo)
    model, batch, optimizer_cfg = bench.gpt_nano_setup()
    return bench.prepare_train_step(model, "clm", optimizer_cfg, batch, warmup, hlo=hlo)


def ablations(args) -> list[dict]:
    """Each of flaxen's step changes turned off in turn, timed interleaved with the code as it is
    (one process, one step of each variant in turn, median of --steps)."""
    from flaxen import tasks

    seq_cls = type(tasks.get("seq_cls"))
    inputs = seq_cls.model_inputs

    def all_positions(self, batch):
        return {k: v for k, v in inputs(self, batch).items() if k != "head_positions_only"}

    cases = {
        "minilm": {"as is": [],
                   "last block at every position": [(seq_cls, "model_inputs", all_positions)]},
        "gpt_nano": {"as is": [],
                     "attention by jax.nn.dot_product_attention": [
                         (bench, "SETTINGS", {**bench.SETTINGS, "attention_implementation": "xla"})]},
    }
    rows = []
    for case in args.cases.split(","):
        steps = _variant_steps(case, cases[case], args.warmup)
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, run_one in steps.items():
                start = time.perf_counter()
                run_one()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["as is"])
        for name, values in times.items():
            row = {"case": case, "variant": name, "step_ms": round(statistics.median(values) * 1000, 1),
                   "vs_as_is": round(statistics.median(values) / base, 3), "cpu": bench.host(),
                   "git_commit": bench.GIT_COMMIT, "load_avg": [round(x, 2) for x in os.getloadavg()],
                   "date": datetime.datetime.now().isoformat(timespec="seconds")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="minilm,gpt_nano")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--ablations", action="store_true",
                        help="instead of profiles: each step change turned off in turn, timed interleaved")
    args = parser.parse_args()
    if args.ablations:
        rows = ablations(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
                f.write("\n")
        return
    rows = []
    for case in args.cases.split(","):
        run_one, info = _flaxen_step(case, args.warmup, hlo=True)
        flaxen_profile = profile_flaxen(run_one, info["hlo"], args.steps)
        del run_one
        torch_step, torch_info = (bench.torch_minilm_step if case == "minilm" else bench.torch_nano_step)(args)
        torch_profile = profile_torch(torch_step, args.steps)
        row = {"case": case, "flaxen": flaxen_profile, "torch": torch_profile, "torch_info": torch_info,
               "cpu": bench.host(), "git_commit": bench.GIT_COMMIT,
               "load_avg": [round(x, 2) for x in os.getloadavg()],
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """A markdown table: per category, ms per step and share, flaxen beside PyTorch."""
    out = []
    for row in rows:
        f, t = row["flaxen"], row["torch"]
        out.append(f"\n{row['case']}: flaxen {f['step_s'] * 1000:.1f} ms/step, PyTorch {t['step_s'] * 1000:.1f} ms/step "
                   "(profiled steps)\n")
        out.append("| category | flaxen ms | share | PyTorch ms | share |")
        out.append("|---|---|---|---|---|")
        for c in CATEGORIES:
            out.append(f"| {c} | {f['per_step_s'][c] * 1000:.1f} | {f['share'][c]:.0%} | "
                       f"{t['per_step_s'][c] * 1000:.1f} | {t['share'][c]:.0%} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
