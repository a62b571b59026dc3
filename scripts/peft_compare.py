"""SST-2 with all-MiniLM-L6-v2: full fine-tuning against LoRA r=8, adapters, prefix tuning and BitFit.

Why: the claim that a few percent of trained weights come close to full fine-tuning is only as
good as a like-for-like run. Every method trains with `python train.py experiment=minilm_sst2`
(the same data, model, schedule, batch size and number of steps), with only `peft=...`, its
settings and the learning rate changed. Each method runs in its own process, so its peak memory
is its own. PEFT methods also train BERT's pooler with the classifier (the role of RoBERTa's
classification head in the LoRA paper's GLUE runs); it is listed in `peft`. LoRA runs without
LoRA dropout: on this budget (0.38 epoch) it only slowed learning (results/peft_sst2_lora_all.json
against results/peft_sst2_lora_selection.json, which also holds the other settings tried).

    python scripts/peft_compare.py                         # every method below, the preset's step budget
    python scripts/peft_compare.py --methods full lora --steps 300 -- data_dir=/data
    python scripts/peft_compare.py --table                 # the README table of an existing results file
    python scripts/peft_compare.py --collect runs/sweep/* --out results/peft_sst2_lora_selection.json
                                                           # records of finished runs (e.g. a sweep), no training

Full fine-tuning with the preset's own budget is the results table's minilm_sst2 run (seed 0,
runs/minilm_sst2): whichever of this script and scripts/reproduce.py runs it first, the other
reuses it. PEFT runs live in runs/peft_sst2/<method>; a finished run is reused, not retrained.
Writes results/peft_sst2.json: one record per method with trainable and total parameters, dev
(validation) accuracy at the end of the step budget and the best periodic evaluation, seconds per
training step (compilation and evaluation excluded), optimizer-state bytes and peak memory (the
accelerator's peak bytes in use where the backend reports it, else the process's peak resident
memory; results.json's `peak_memory`), plus the run directory and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "minilm_sst2"
PEFT_EXTRA = ["peft.modules_to_save=[pooler]"]
METHODS = {
    "full": {"overrides": [], "lr": None},
    "lora": {"overrides": ["peft=lora", "peft.rank=8", "peft.alpha=16", "peft.dropout=0", *PEFT_EXTRA], "lr": 1e-3},
    "lora_all": {"overrides": ["peft=lora", "peft.rank=4", "peft.alpha=8", "peft.dropout=0",
                               "peft.target_modules=[attention.*,intermediate,output]", *PEFT_EXTRA], "lr": 2e-3},
    "adapter": {"overrides": ["peft=adapter", "peft.size=64", *PEFT_EXTRA], "lr": 1e-3},
    "prefix": {"overrides": ["peft=prefix", "peft.length=20", *PEFT_EXTRA], "lr": 5e-3},
    "bitfit": {"overrides": ["peft=bitfit", *PEFT_EXTRA], "lr": 2e-3},
}
LABELS = {"full": "full fine-tuning", "lora": "LoRA r=8 (query, value)", "lora_all": "LoRA r=4 (every linear layer)",
          "adapter": "Houlsby adapters (64)", "prefix": "prefix tuning (20)", "bitfit": "BitFit"}


def overrides_for(method: str, experiment: str, steps: int | None, extra: list[str]) -> list[str]:
    spec = METHODS[method]
    overrides = [f"experiment={experiment}", *spec["overrides"]]
    if spec["lr"] is not None:
        overrides.append(f"optimizer.lr={spec['lr']}")
    if steps is not None:
        overrides.append(f"steps={steps}")
    return overrides + list(extra)


def run_dir_for(method: str, experiment: str, overrides: list[str], runs: str) -> str:
    """The preset's own run directory for plain full fine-tuning (shared with reproduce.py), else runs/<method>."""
    if overrides == [f"experiment={experiment}"]:
        return os.path.join(ROOT, "runs", experiment)
    return os.path.join(os.path.abspath(runs), method)


def method_of(overrides: list[str]) -> str:
    """The METHODS entry a command's `peft=` override names (full fine-tuning without one)."""
    peft = next((o.split("=", 1)[1] for o in overrides if o.startswith("peft=")), "none")
    if peft == "none":
        return "full"
    return "lora_all" if peft == "lora" and any("intermediate" in o for o in overrides) else peft


def record(method: str, run_dir: str, overrides: list[str]) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    memory = results["peak_memory"]
    params = results["parameters"]
    steps = results["steps"]
    final, best = results.get("final_eval") or {}, results.get("best_eval") or {}
    return {
        "method": method,
        "label": LABELS[method],
        "command": "python train.py " + " ".join(overrides),
        "trainable_parameters": params["trainable"],
        "total_parameters": params["total"],
        "trainable_percent": 100.0 * params["trainable"] / params["total"],
        "dev_accuracy": final.get("accuracy"),
        "best_dev_accuracy": best.get("accuracy"),
        "best_step": best.get("step"),
        "steps": steps,
        "seconds_per_step": results["train_seconds"] / max(steps - 1, 1),
        "optimizer_state_bytes": results["optimizer_state_bytes"],
        "peak_memory_bytes": memory["bytes"],
        "peak_memory_kind": memory["kind"],
        "status": results["status"],
        "run_dir": os.path.relpath(run_dir, ROOT),
    }


def table(report: dict) -> str:
    """The README table (markdown) of a results file."""
    rows = [
        "| method | trainable | dev accuracy | s / step | optimizer state | peak memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["methods"]:
        accuracy = "n/a" if r["dev_accuracy"] is None else f"{100 * r['dev_accuracy']:.2f}"
        rows.append(
            f"| {r['label']} | {r['trainable_percent']:.2f}% ({r['trainable_parameters']:,}) | {accuracy} | "
            f"{r['seconds_per_step']:.3f} | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB |"
        )
    kinds = sorted({r["peak_memory_kind"] for r in report["methods"]})
    rows.append("")
    rows.append(f"experiment={report['experiment']} (validation split), {report['steps']} steps for every method; "
                f"peak memory: {', '.join(kinds)}; device: {report['device']}"
                + (f" ({report['machine']}, {report['date']})" if "date" in report else "") + ".")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="training steps for every method (default: the preset's)")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"Hydra experiment (default {EXPERIMENT})")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "peft_sst2.json"))
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "peft_sst2"), help="parent of the PEFT run directories")
    parser.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    parser.add_argument("--collect", nargs="+", metavar="RUN_DIR",
                        help="write --out from these finished train.py runs (their own overrides), no training")
    parser.add_argument("extra", nargs="*", help="further Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)

    if args.table:
        with open(args.out) as f:
            print(table(json.load(f)))
        return 0

    if args.collect:
        return collect(args.collect, args.out)

    records = []
    for method in args.methods:
        overrides = overrides_for(method, args.experiment, args.steps, args.extra)
        run_dir = run_dir_for(method, args.experiment, overrides, args.runs)
        command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
        print(f"[{method}] python train.py {' '.join(overrides)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT)
        if result.returncode != 0:
            print(f"[{method}] failed with exit status {result.returncode}; see the output above", file=sys.stderr)
            return result.returncode
        records.append(record(method, run_dir, overrides))
        print(f"[{method}] done in {time.perf_counter() - start:.0f}s: dev accuracy {records[-1]['dev_accuracy']}",
              flush=True)

    write_report(args.experiment, records, args.out)
    return 0


def collect(run_dirs: list[str], out: str) -> int:
    """Records of finished runs, each labelled with its own overrides (as Hydra saved them)."""
    import yaml

    records, experiments = [], set()
    for run_dir in run_dirs:
        overrides_file = os.path.join(run_dir, ".hydra", "overrides.yaml")
        if not os.path.isfile(os.path.join(run_dir, "results.json")) or not os.path.isfile(overrides_file):
            print(f"{run_dir}: not a finished train.py run (results.json and .hydra/overrides.yaml expected)",
                  file=sys.stderr)
            return 2
        with open(overrides_file) as f:
            overrides = [o for o in yaml.safe_load(f) if not o.startswith("hydra.")]
        experiments.update(o.split("=", 1)[1] for o in overrides if o.startswith("experiment="))
        entry = record(method_of(overrides), os.path.abspath(run_dir), overrides)
        entry["label"] = " ".join(o for o in overrides if not o.startswith(("experiment=", "peft.modules_to_save")))
        records.append(entry)
    write_report(",".join(sorted(experiments)), records, out)
    return 0


def write_report(experiment: str, records: list[dict], out: str) -> None:
    import jax
    from reproduce import git_commit, machine

    with open(os.path.join(ROOT, records[0]["run_dir"], "results.json")) as f:
        steps = json.load(f)["steps"]
    report = {"experiment": experiment, "steps": steps,
              "device": f"{jax.devices()[0].device_kind} x {jax.device_count()}", "machine": machine(),
              "date": datetime.date.today().isoformat(), "git_commit": git_commit(), "methods": records}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(table(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
