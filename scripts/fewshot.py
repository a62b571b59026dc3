"""Few-shot SST-2: dev accuracy against K labelled examples per class, for a public checkpoint,
flaxen's own pretrained bert_mini and the same bert_mini from random weights.

Why: pretraining matters most when labels are few. For each model and each K in {16, 64, 256}
this draws 5 training subsets (data.train_examples_per_class=K, data.train_subset_seed=0..4: K
rows of each label, drawn from the subset seed alone, so every model sees the same subsets),
fine-tunes on each and reports the model at the end of its step budget on the whole SST-2
validation split (872 sentences): no checkpoint is chosen on the evaluated split.

    python scripts/fewshot.py                                 # every model, K and subset below
    python scripts/fewshot.py --models minilm_sst2 --ks 16 --subsets 0 1
    python scripts/fewshot.py --plot                          # only redraw the figure from the JSON

Models are fine-tuning presets: minilm_sst2 (all-MiniLM-L6-v2), bert_mini_pretrained_sst2
(init_from=runs/bert_mini_mlm: run `python scripts/reproduce.py bert_mini_mlm` first) and
bert_mini_scratch_sst2 (its tokenizer, random weights). Each keeps its preset's model, optimizer,
learning rate and batch grouping; the budget changes with K (`budget`): batches of 16,
max(50, 10 epochs) steps, 10 % of them warmup, one evaluation and one checkpoint, at the end.
Runs live in runs/fewshot_sst2/<model>/K=<K>/subset=<S> and a finished one is reused (train.py
resumes it and stops at once).
Writes results/fewshot_sst2.json (per model and K: the 5 accuracies, mean and sample std, each
run's command, steps, training rows and wall time; machine, date, git commit) and results/fewshot_sst2.png
(mean ± std against K, log scale, one line per model).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce import (ROOT, _read_json, _run, _write_json, completed_results, curve, git_commit,  # noqa: E402
                       machine, override, shell_command, spread)

MODELS = {"minilm_sst2": "all-MiniLM-L6-v2 (public checkpoint)",
          "bert_mini_pretrained_sst2": "bert_mini, flaxen-pretrained (bert_mini_mlm)",
          "bert_mini_scratch_sst2": "bert_mini, random weights"}
KS = (16, 64, 256)
SUBSETS = (0, 1, 2, 3, 4)
BATCH = 16
CLASSES = 2
OUT = os.path.join(ROOT, "results", "fewshot_sst2.json")


def budget(k: int) -> dict:
    """The fine-tuning budget for K examples per class: batches of BATCH, max(50, 10 epochs) steps
    (10 epochs of 2K rows), a linear warmup over the first 10 % of them."""
    steps = max(50, math.ceil(10 * CLASSES * k / BATCH))
    return {"steps": steps, "batch_size": BATCH, "warmup_steps": max(1, steps // 10)}


def run_dir_of(model: str, k: int, subset: int) -> str:
    return os.path.join(ROOT, "runs", "fewshot_sst2", model, f"K={k}", f"subset={subset}")


def train_command(model: str, k: int, subset: int) -> list[str]:
    b = budget(k)
    return ["python", "train.py", f"experiment={model}", f"data.train_examples_per_class={k}",
            f"data.train_subset_seed={subset}", f"steps={b['steps']}", f"batch_size={b['batch_size']}",
            f"schedule.warmup_steps={b['warmup_steps']}", "eval_every=0", "checkpoint_every=0",
            override("hydra.run.dir", os.path.relpath(run_dir_of(model, k, subset), ROOT))]


def final_accuracy(run_dir: str, steps: int) -> float:
    """Validation accuracy of the model at the last step: train.py's one evaluation (eval_every=0
    evaluates only at the end), as the run's metrics.jsonl logged it."""
    found = [value for step, value in curve(run_dir, "validation/accuracy") if step == steps]
    if not found:
        raise SystemExit(f"{os.path.join(run_dir, 'metrics.jsonl')}: no validation accuracy at the last step {steps}")
    return found[-1]


def run_one(model: str, k: int, subset: int) -> dict:
    """Train (or reuse) one run: its record, with the validation accuracy at its last step."""
    run_dir = run_dir_of(model, k, subset)
    command = train_command(model, k, subset)
    start = time.perf_counter()
    _run(command, [])
    results = completed_results(run_dir)
    accuracy = final_accuracy(run_dir, results["steps"])
    print(f"[fewshot] {model} K={k} subset={subset}: accuracy {accuracy:.4f}", flush=True)
    return {"subset": subset, "accuracy": accuracy, "steps": results["steps"],
            "train_examples": results.get("train_length", {}).get("epoch_examples"),
            "wall_seconds": results["wall_seconds"], "command_seconds": time.perf_counter() - start,
            "run_dir": os.path.relpath(run_dir, ROOT), "command": shell_command(command)}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for model, by_k in report["models"].items():
        ks = sorted(int(k) for k in by_k)
        means = [100 * by_k[str(k)]["summary"]["mean"] for k in ks]
        stds = [100 * by_k[str(k)]["summary"]["std"] for k in ks]
        axis.errorbar(ks, means, yerr=stds, marker="o", capsize=4, label=MODELS.get(model, model))
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(KS), [str(k) for k in KS])
    axis.set_xlabel("labelled examples per class (K)")
    axis.set_ylabel("SST-2 dev accuracy (%)")
    axis.axhline(50, linestyle=":", color="tab:gray", label="chance")
    axis.legend(fontsize="small", loc="lower right")
    axis.set_title(f"Few-shot SST-2: mean ± std over {len(SUBSETS)} training subsets", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    parser.add_argument("--subsets", nargs="+", type=int, default=list(SUBSETS))
    parser.add_argument("--plot", action="store_true", help="only redraw results/fewshot_sst2.png from the JSON")
    args = parser.parse_args(argv)
    figure = OUT.replace(".json", ".png")
    if args.plot:
        plot(_read_json(OUT), figure)
        print(f"wrote {os.path.relpath(figure, ROOT)}")
        return 0
    if "bert_mini_pretrained_sst2" in args.models or "bert_mini_scratch_sst2" in args.models:
        if not os.path.isfile(os.path.join(ROOT, "runs", "bert_mini_mlm", "results.json")):
            raise SystemExit("the bert_mini models need runs/bert_mini_mlm (its weights and tokenizer): "
                             "run `python scripts/reproduce.py bert_mini_mlm` first")
    report = _read_json(OUT) if os.path.isfile(OUT) else {"models": {}}
    for model in args.models:
        for k in args.ks:
            runs = [run_one(model, k, subset) for subset in args.subsets]
            entry = report["models"].setdefault(model, {}).setdefault(str(k), {"runs": []})
            kept = [r for r in entry["runs"] if r["subset"] not in args.subsets]
            entry["runs"] = sorted(kept + runs, key=lambda r: r["subset"])
            entry["summary"] = {**spread([r["accuracy"] for r in entry["runs"]]),
                                "subsets": [r["subset"] for r in entry["runs"]]}
            entry["budget"] = budget(k)
            report.update(task="SST-2 validation accuracy, few-shot training subsets", labels=MODELS,
                          machine=machine(), date=datetime.date.today().isoformat(), git_commit=git_commit())
            _write_json(OUT, report)
            print(f"[fewshot] {model} K={k}: {100 * entry['summary']['mean']:.2f} ± "
                  f"{100 * entry['summary']['std']:.2f}", flush=True)
    plot(report, figure)
    print(f"wrote {os.path.relpath(OUT, ROOT)} and {os.path.relpath(figure, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
