"""The results table: pretrain -> fine-tune on SST-2, CoNLL-2003, SQuAD and Multi30k, one command per row.

Why: the claim flaxen exists to test (pretraining then fine-tuning beats training from scratch,
and a public checkpoint fine-tuned here reaches published-quality numbers) is only as good as a
table anyone can regenerate. Each row is an experiment preset; this script runs exactly the
commands a user would type, then writes results/<row>.json from the files those runs wrote and
rebuilds the README's results table from results/*.json only.

    python scripts/reproduce.py minilm_sst2          # one row (all its seeds)
    python scripts/reproduce.py all                  # every row, in dependency order
    python scripts/reproduce.py --table              # only rebuild the README table and figure
    python scripts/reproduce.py minilm_sst2 --seeds 0   # fewer seeds (the file says which ran)
    python scripts/reproduce.py --search multirun/minilm_sst2/DATE_TIME   # record a finished search

Per seed K of a row: `python train.py experiment=ROW` (K = 0; run directory runs/ROW) or
`python train.py experiment=ROW seed=K` (runs/ROW/seed=K), then `python eval.py run_dir=RUN
split=S step=LAST` for each reported split: the model at the end of the step budget, with no
checkpoint chosen on the evaluated split. A finished run is not retrained (train.py resumes it and
stops at once); delete its directory to start over. Each run directory gets loss_curve.png.

results/<row>.json: metric, splits, per-seed values, mean and standard deviation, wall time, steps,
tokens/s, parameter count, seed, machine, date, git commit, commands; CoNLL rows add the per-type
entity table, translation rows the sacreBLEU signature of each split (`recorded`). The README table sits between the `results:begin` / `results:end` markers;
results/summary.png shows the same numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from flaxen.config import override, shell_word
from flaxen.logging import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def row(task, metric, splits, seeds=(0,), target=None, needs=(), label="", scale=100.0, metric_label=None,
        also=(), note=None, record=()):
    """One row. `scale`: the factor that shows a metric in the table (100 for fractions; 1 for
    metrics already in percent, as SQuAD's and BLEU); `also`: further metrics recorded from the eval
    files: names of entries of their `metrics`, or a dict {name: path} where a path is the keys that
    lead to a nested value (("report", "1", "recall"): label "1"'s recall in seq_cls's per-label
    report); `note`: what a reader of results/<row>.json must know about the data (kept in the file);
    `record`: non-numeric entries of the eval files kept per split (BLEU's sacreBLEU signature)."""
    metric_label = metric_label or {"accuracy": "accuracy (%)", "f1": "entity F1 (%)", "loss": "MLM loss"}[metric]
    also = {name: tuple(path) for name, path in also.items()} if isinstance(also, dict) else {n: (n,) for n in also}
    return {"task": task, "metric": metric, "splits": list(splits), "seeds": list(seeds), "target": target,
            "needs": list(needs), "label": label, "scale": scale, "metric_label": metric_label, "also": also,
            "note": note, "record": list(record)}


# SST-2 with 10 % of its positive train rows: macro-F1, plus accuracy and each label's recall (labels "0", "1")
IMBALANCE_ALSO = {"accuracy": ("accuracy",), "recall_negative": ("report", "0", "recall"),
                  "recall_positive": ("report", "1", "recall")}
IMBALANCE_NOTE = ("Train split: every negative SST-2 row (29,780) and 10 % of the positive ones (3,757 of 37,569; "
                  "data.train_examples_per_class={\"1\": 3757}, data.train_subset_seed=0), 11.2 % positive; "
                  "validation is the usual dev set (428 negative, 444 positive). 400 steps of 32 rows, as minilm_sst2 "
                  "otherwise. macro_f1: the unweighted mean of the two labels' F1; recall_negative / "
                  "recall_positive: the recall of label 0 / 1.")


# target: (split, minimum) the row must reach, or None (minimum in the metric's own unit)
ROWS = {
    "minilm_sst2": row("SST-2", "accuracy", ["validation"], (0, 1, 2), ("validation", 0.88),
                       label="all-MiniLM-L6-v2, fine-tuned"),
    "minilm_sst2_tuned": row("SST-2", "accuracy", ["validation"], (0, 1, 2), ("validation", 0.90),
                             label="all-MiniLM-L6-v2, fine-tuned with searched settings",
                             note="Learning rate, warmup, weight decay and epochs chosen by the Optuna search of "
                                  "results/minilm_sst2_search.json (hparams_search=finetune on minilm_sst2, seed 0, "
                                  "objective: best periodic validation accuracy); reported here at the last step "
                                  "for seeds 0, 1 and 2."),
    "minilm_conll2003": row("CoNLL-2003", "f1", ["validation", "test"], (0, 1, 2), ("test", 0.85),
                            label="all-MiniLM-L6-v2, fine-tuned"),
    "minilm_squad": row("SQuAD v1.1, 38 / 10 dev articles", "f1", ["validation"], target=("validation", 60.0),
                        label="all-MiniLM-L6-v2, fine-tuned (not the standard split)", scale=1.0,
                        metric_label="F1 (%)", also=("exact_match",),
                        note="Not the standard SQuAD split: only dev-v1.1.json is available here, so the `squad` "
                             "data preset splits it by whole article (data.holdout_key=title, holdout_groups=10, "
                             "holdout_seed=0): 38 articles (7,302 questions) train, 10 articles (3,268 questions) "
                             "validation; exact_match and f1 in percent with the official v1.1 normalisation."),
    "bert_mini_mlm": row("pretraining text", "loss", ["validation"],
                         label="bert_mini, masked-LM pretraining by flaxen"),
    "bert_mini_pretrained_sst2": row("SST-2", "accuracy", ["validation"], (0, 1, 2), needs=["bert_mini_mlm"],
                                     label="bert_mini, flaxen-pretrained, fine-tuned"),
    "bert_mini_scratch_sst2": row("SST-2", "accuracy", ["validation"], (0, 1, 2), needs=["bert_mini_mlm"],
                                  label="bert_mini, from scratch"),
    "bert_mini_pretrained_conll2003": row("CoNLL-2003", "f1", ["validation", "test"], (0, 1, 2), needs=["bert_mini_mlm"],
                                          label="bert_mini, flaxen-pretrained, fine-tuned"),
    "bert_mini_scratch_conll2003": row("CoNLL-2003", "f1", ["validation", "test"], (0, 1, 2), needs=["bert_mini_mlm"],
                                       label="bert_mini, from scratch"),
    "minilm_sst2_dapt_mlm": row("SST-2 train text", "loss", ["validation"],
                                label="all-MiniLM-L6-v2, continued masked-LM pretraining by flaxen"),
    "minilm_sst2_dapt": row("SST-2", "accuracy", ["validation"], (0, 1, 2), needs=["minilm_sst2_dapt_mlm"],
                            label="all-MiniLM-L6-v2, continued pretraining, fine-tuned"),
    "minilm_sst2_dp": row("SST-2", "accuracy", ["validation"],
                          label="all-MiniLM-L6-v2 + BitFit, DP-SGD (ε = 8, δ = 1/n)",
                          note="Differentially private fine-tuning (flaxen/privacy.py) of the Dense biases and the "
                               "head (BitFit): Poisson sampling q = 512/67,349, per-example clipping to norm 1.5, the "
                               "noise multiplier chosen by the RDP accountant for epsilon <= 8 at delta = 1/n after "
                               "200 steps (1.5 epochs); one seed. `privacy` holds the accountant's epsilon, delta, "
                               "noise multiplier, q and steps."),
    "minilm_sst2_dp_baseline": row("SST-2", "accuracy", ["validation"],
                                   label="all-MiniLM-L6-v2 + BitFit, non-private peer of minilm_sst2_dp",
                                   note="The same model, BitFit, steps, batch size, schedule, optimizer and data as "
                                        "minilm_sst2_dp without clipping or noise (shuffled, length-grouped batches); "
                                        "one seed."),
    "t5_multi30k": row("Multi30k en→de", "bleu", ["test"], target=("test", 25.0), label="t5_tiny, from scratch",
                       scale=1.0, metric_label="BLEU", also=("rougeL",), record=("bleu_signature",),
                       note="test = test_2016_flickr (1,000 captions); sacreBLEU corpus BLEU on detokenised text "
                            "(signature in `recorded`), beam search with 4 beams; rougeL: rouge_score F-measure "
                            "with stemming, in percent."),
    "t5_multi30k_span_pretrain": row("Multi30k en+de train text", "loss", ["validation"],
                                     label="t5_tiny, span-corruption pretraining by flaxen",
                                     metric_label="span-corruption loss"),
    "t5_multi30k_span": row("Multi30k en→de", "bleu", ["test"], needs=["t5_multi30k_span_pretrain"],
                            label="t5_tiny, flaxen span-corruption pretrained, fine-tuned", scale=1.0,
                            metric_label="BLEU", also=("rougeL",), record=("bleu_signature",),
                            note="As t5_multi30k, starting from t5_multi30k_span_pretrain's best checkpoint."),
    "minilm_sst2_imbalanced": row("SST-2, 10 % of positives", "macro_f1", ["validation"], (0, 1, 2),
                                  label="all-MiniLM-L6-v2, fine-tuned, no remedy", metric_label="macro-F1 (%)",
                                  also=IMBALANCE_ALSO, note=IMBALANCE_NOTE),
    "minilm_sst2_imbalanced_weighted": row("SST-2, 10 % of positives", "macro_f1", ["validation"], (0, 1, 2),
                                           label="all-MiniLM-L6-v2, fine-tuned, balanced class weights",
                                           metric_label="macro-F1 (%)", also=IMBALANCE_ALSO,
                                           note=IMBALANCE_NOTE + " task.class_weights=balanced: negative 0.563, "
                                                                 "positive 4.463 (n / (2 n_c))."),
    "minilm_sst2_imbalanced_resampled": row("SST-2, 10 % of positives", "macro_f1", ["validation"], (0, 1, 2),
                                            label="all-MiniLM-L6-v2, fine-tuned, balanced resampling",
                                            metric_label="macro-F1 (%)", also=IMBALANCE_ALSO,
                                            note=IMBALANCE_NOTE + " data.resample=balanced: each epoch draws "
                                                                  "both labels 29,780 times."),
}
# row -> (the row it must beat, what that row is, as the table says it)
COMPARISONS = {"bert_mini_pretrained_sst2": ("bert_mini_scratch_sst2", "scratch"),
               "bert_mini_pretrained_conll2003": ("bert_mini_scratch_conll2003", "scratch"),
               "t5_multi30k_span": ("t5_multi30k", "scratch"),
               "minilm_sst2_dapt": ("minilm_sst2", "direct fine-tuning"),
               "minilm_sst2_tuned": ("minilm_sst2", "the 800-step preset")}
# private row -> its non-private peer on the same budget
PRIVATE_PEERS = {"minilm_sst2_dp": "minilm_sst2_dp_baseline"}


def run_dir_of(name: str, seed: int) -> str:
    return os.path.join(ROOT, "runs", name) if seed == 0 else os.path.join(ROOT, "runs", name, f"seed={seed}")


def train_command(name: str, seed: int) -> list[str]:
    return ["python", "train.py", f"experiment={name}"] + ([f"seed={seed}"] if seed else [])


def eval_command(run_dir: str, split: str, step: int) -> list[str]:
    return ["python", "eval.py", override("run_dir", os.path.relpath(run_dir, ROOT)), f"split={split}", f"step={step}"]


def shell_command(command: list[str]) -> str:
    """A command as one line a shell runs (a quoted run_dir override stays one word)."""
    return " ".join(shell_word(word) for word in command)


def _run(command: list[str], extra: list[str]) -> None:
    print("$ " + shell_command(command + extra), flush=True)
    result = subprocess.run([sys.executable] + command[1:] + extra, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit status {result.returncode}")


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_rows(run_dir: str) -> list[dict]:
    """The lines of run_dir/metrics.jsonl (training logs and periodic evaluations), in order."""
    return _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def completed_results(run_dir: str) -> dict:
    """run_dir/results.json of a run that completed; SystemExit naming the run otherwise."""
    results = _read_json(os.path.join(run_dir, "results.json"))
    if results.get("status") != "completed":
        raise SystemExit(f"{run_dir}: the run did not complete (status {results.get('status')!r})")
    return results


def curve(run_dir: str, key: str) -> list[list]:
    """[[step, value], ...] of one key of the run's metrics.jsonl ("loss": the logged training loss,
    "validation/<metric>": the periodic evaluations)."""
    return [[r["step"], r[key]] for r in metrics_rows(run_dir) if key in r]


def host() -> str:
    """The CPU model and core count, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def machine() -> str:
    """host() plus JAX's accelerator, if any."""
    import jax

    device = jax.devices()[0]
    accelerator = "" if device.platform == "cpu" else f", {device.device_kind} x {jax.device_count()}"
    return host() + accelerator


def plot_loss_curve(run_dir: str, title: str) -> str:
    """run_dir/loss_curve.png: training loss and every logged validation metric against step, and the
    train split's unigram entropy where the run recorded one (masked and causal LM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_rows(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith("validation/") and key != "validation/num_examples":
                evals.setdefault(key, []).append((r["step"], value))
    figure, loss_axis = plt.subplots(figsize=(6.4, 4.0))
    if train:
        loss_axis.plot(*zip(*train), label="train loss", color="tab:blue")
    if "validation/loss" in evals:
        loss_axis.plot(*zip(*evals.pop("validation/loss")), "o-", label="validation loss", color="tab:orange")
    results_path = os.path.join(run_dir, "results.json")
    entropy = _read_json(results_path).get("unigram_entropy") if os.path.exists(results_path) else None
    if entropy is not None:  # a language model's context-free floor: the train split's unigram entropy
        loss_axis.axhline(entropy, linestyle=":", color="tab:gray", label=f"unigram entropy {entropy:.2f}")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    handles, labels = loss_axis.get_legend_handles_labels()
    wanted = [k for k in ("validation/accuracy", "validation/f1") if k in evals]
    if wanted:
        metric_axis = loss_axis.twinx()
        for key in wanted:
            metric_axis.plot(*zip(*evals[key]), "s--", label=key, color="tab:green")
        metric_axis.set_ylabel(", ".join(k.split("/")[1] for k in wanted))
        more_handles, more_labels = metric_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    loss_axis.legend(handles, labels, loc="upper right", fontsize="small")
    loss_axis.set_title(title, fontsize="medium")
    figure.tight_layout()
    path = os.path.join(run_dir, "loss_curve.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def seed_record(name: str, seed: int) -> dict:
    """What one finished seed of a row measured, from the files its runs wrote."""
    spec = ROWS[name]
    run_dir = run_dir_of(name, seed)
    results = completed_results(run_dir)
    record = {"seed": seed, "run_dir": os.path.relpath(run_dir, ROOT), "steps": results["steps"],
              "wall_seconds": results["wall_seconds"], "tokens_per_s": results["tokens_per_s"],
              "parameters": results["parameters"]["total"], "values": {}, "eval_files": {}}
    # the curves the run logged: what a reader of results/<row>.json can check a loss-curve claim against
    record["curve"] = {key: curve(run_dir, key) for key in ("loss", f"validation/{spec['metric']}")}
    if results.get("unigram_entropy") is not None:
        record["unigram_entropy"] = results["unigram_entropy"]
    if results.get("init_from") is not None:  # what a fine-tuning row started from (run, step, counts)
        record["init_from"] = results["init_from"]
    if results.get("privacy") is not None:  # DP-SGD: epsilon, delta, noise multiplier, q, steps, accountant
        record["privacy"] = results["privacy"]
    for split in spec["splits"]:
        path = os.path.join(run_dir, f"eval_{split}.json")
        report = _read_json(path)
        if report.get("step") != results["steps"]:
            raise SystemExit(f"{path} evaluated step {report.get('step')}, not the run's last step {results['steps']}")
        record["values"][split] = report["metrics"][spec["metric"]]
        for metric, keys in spec["also"].items():
            value = report["metrics"]
            for key in keys:
                if not isinstance(value, dict) or key not in value:
                    raise SystemExit(f"{path}: metrics has no {'/'.join(keys)} (row {name}'s `also` {metric})")
                value = value[key]
            record.setdefault("also", {}).setdefault(metric, {})[split] = value
        for key in spec.get("record", []):
            record.setdefault("recorded", {}).setdefault(key, {})[split] = report["metrics"][key]
        record["eval_files"][split] = os.path.relpath(path, ROOT)
        if "report" in report["metrics"] and spec["metric"] == "f1":
            record.setdefault("per_type", {})[split] = report["metrics"]["report"]
    return record


def row_record(name: str, seeds: list[dict], commands: list[str]) -> dict:
    spec = ROWS[name]
    summary = {}
    for split in spec["splits"]:
        values = [s["values"][split] for s in seeds]
        summary[split] = spread(values)
    target = None
    if spec["target"] is not None:
        split, minimum = spec["target"]
        mean = summary[split]["mean"]
        target = {"split": split, "minimum": minimum, "met": mean >= minimum, "margin": mean - minimum}
    also = {}
    for metric in spec.get("also", []):
        for split in spec["splits"]:
            values = [s["also"][metric][split] for s in seeds]
            also.setdefault(metric, {})[split] = spread(values)
    return {"row": name, "task": spec["task"], "label": spec["label"], "note": spec.get("note"), "metric": spec["metric"],
            "splits": spec["splits"], "summary": summary, "also": also, "target": target,
            "seeds": [s["seed"] for s in seeds], "runs": seeds, "commands": commands,
            "privacy": seeds[0].get("privacy"), "recorded": seeds[0].get("recorded"),
            "wall_seconds_max": max(s["wall_seconds"] for s in seeds), "machine": machine(),
            "date": datetime.date.today().isoformat(), "git_commit": git_commit()}


def search_record(sweep_dir: str) -> dict:
    """What results/<experiment>_search.json holds for a finished hyperparameter search
    (`python train.py -m hparams_search=... experiment=...`; flaxen/sweep.py): the sweep's command
    (its first trial's argv), every trial of sweep_dir/trials.jsonl (params, value, status, run
    directory) with the steps and wall time its results.json gives, the best completed trial, and
    machine, date and git commit. SystemExit naming the file when sweep_dir holds no trials."""
    path = os.path.join(sweep_dir, "trials.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; --search takes the directory of an Optuna sweep "
                         "(multirun/<experiment_name>/<date_time>), where train.py -m writes trials.jsonl")
    trials = _read_jsonl(path)
    completed = [t for t in trials if t["status"] == "completed"]
    if not completed:
        raise SystemExit(f"{path}: no trial completed ({len(trials)} recorded)")
    argv = _read_jsonl(os.path.join(trials[0]["run_dir"], "commands.jsonl"))[0]["argv"]
    for trial in trials:
        results_path = os.path.join(trial["run_dir"], "results.json")
        results = _read_json(results_path) if os.path.isfile(results_path) else {}
        trial["steps"], trial["wall_seconds"] = results.get("steps"), results.get("wall_seconds")
        trial["run_dir"] = os.path.relpath(trial["run_dir"], ROOT)
    direction = completed[0]["direction"]
    best = (max if direction == "maximize" else min)(completed, key=lambda t: t["value"])
    return {"sweep_dir": os.path.relpath(os.path.abspath(sweep_dir), ROOT), "command": shell_command(["python"] + argv),
            "metric": completed[0]["metric"], "direction": direction,
            "best": {key: best[key] for key in ("trial", "value", "params", "steps", "run_dir")},
            "trials": trials, "wall_seconds_total": sum(t["wall_seconds"] or 0.0 for t in trials),
            "machine": machine(), "date": datetime.date.today().isoformat(), "git_commit": git_commit()}


def reproduce(name: str, seeds: list[int], extra: list[str]) -> dict:
    spec = ROWS[name]
    for needed in spec["needs"]:
        if not os.path.isfile(os.path.join(run_dir_of(needed, 0), "results.json")):
            print(f"[{name}] needs row {needed} first", flush=True)
            reproduce(needed, ROWS[needed]["seeds"], extra)
    records, commands = [], []
    for seed in seeds:
        run_dir = run_dir_of(name, seed)
        command = train_command(name, seed)
        start = time.perf_counter()
        _run(command, extra)
        steps = _read_json(os.path.join(run_dir, "results.json"))["steps"]
        commands.append(shell_command(command + extra))
        for split in spec["splits"]:
            evaluation = eval_command(run_dir, split, steps)
            _run(evaluation, [])
            commands.append(shell_command(evaluation))
        plot_loss_curve(run_dir, f"{name} (seed {seed})")
        records.append(seed_record(name, seed))
        records[-1]["command_seconds"] = time.perf_counter() - start  # training and every eval.py of the seed
        print(f"[{name}] seed {seed}: {records[-1]['values']} in {records[-1]['command_seconds']:.0f}s", flush=True)
    report = row_record(name, records, commands)
    _write_json(os.path.join(RESULTS, f"{name}.json"), report)
    print(f"wrote results/{name}.json", flush=True)
    return report


# ---------------------------------------------------------------- the README table

def _cell(summary: dict, metric: str, scale: float = 100.0) -> str:
    scale = 1.0 if metric == "loss" else scale
    text = f"{scale * summary['mean']:.2f}"
    if len(summary["values"]) > 1:
        text += f" ± {scale * summary['std']:.2f}"
    return text


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s"


def _gaps(report: dict, other: dict, scale: float = 100.0) -> str:
    """`report`'s mean minus `other`'s on each of its splits, in points: '+0.12 / -0.34'."""
    return " / ".join(f"{scale * (report['summary'][s]['mean'] - other['summary'][s]['mean']):+.2f}"
                      for s in report["splits"])


def load_reports(results_dir: str = RESULTS) -> dict:
    return {name: _read_json(os.path.join(results_dir, f"{name}.json")) for name in ROWS
            if os.path.isfile(os.path.join(results_dir, f"{name}.json"))}


def _comparison(name: str, reports: dict, scale: float) -> str:
    """'vs <what>: <gap> pts' for a row of COMPARISONS whose peer row has results; '' otherwise."""
    other, what = COMPARISONS.get(name, (None, None))
    return f"vs {what}: {_gaps(reports[name], reports[other], scale)} pts" if other in reports else ""


def table(reports: dict) -> str:
    lines = ["| row | task | model | metric | validation | test | seeds | wall / run | target |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for name in ROWS:
        report = reports.get(name)
        if report is None:
            lines.append(f"| `{name}` | {ROWS[name]['task']} | {ROWS[name]['label']} | | not run | | | | |")
            continue
        spec = ROWS[name]
        metric, scale = spec["metric_label"], spec["scale"]
        cells = {split: _cell(report["summary"][split], report["metric"], scale) for split in report["splits"]}
        for other, by_split in (report.get("also") or {}).items():
            for split, summary in by_split.items():
                cells[split] = f"{cells[split]} ({other.replace('_', ' ')} {_cell(summary, other, scale)})"
        target, comparison = report.get("target"), _comparison(name, reports, scale)
        if target is not None:
            verdict = "met" if target["met"] else f"missed by {scale * -target['margin']:.2f} pts"
            target_text = "; ".join(filter(None, [f"{target['split']} ≥ {scale * target['minimum']:.0f}: {verdict}",
                                                  comparison]))
        elif comparison:
            target_text = comparison
        elif report["runs"][0].get("privacy") is not None:
            private = report["runs"][0]["privacy"]
            target_text = (f"ε {private['epsilon']:.2f} at δ {private['delta']:.2g} (σ {private['noise_multiplier']:.3f}, "
                           f"{private['steps']} steps)")
            peer = reports.get(PRIVATE_PEERS.get(name))
            if peer is not None:
                target_text += f"; vs non-private: {_gaps(report, peer)} pts"
        elif report["metric"] == "loss" and report["runs"][0].get("unigram_entropy") is not None:
            target_text = f"unigram entropy {report['runs'][0]['unigram_entropy']:.2f}"
        else:
            target_text = ""
        lines.append(f"| `{name}` | {report['task']} | {report['label']} | {metric} | {cells.get('validation', '')} | "
                     f"{cells.get('test', '')} | {len(report['seeds'])} | {_duration(report['wall_seconds_max'])} | "
                     f"{target_text} |")
    dates = sorted({r["date"] for r in reports.values()})
    machines = sorted({r["machine"] for r in reports.values()})
    if reports:
        lines.append("")
        lines.append(f"From results/<row>.json ({', '.join(dates)}; {'; '.join(machines)}). Each row: "
                     "`python scripts/reproduce.py ROW`; the model at the end of the step budget, mean ± std over "
                     "seeds where more than one ran; figure: results/summary.png.")
    return "\n".join(lines)


def summary_figure(reports: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in reports and reports[n]["metric"] != "loss"]
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    positions, labels = [], []
    for index, name in enumerate(names):
        report = reports[name]
        split = "test" if "test" in report["splits"] else "validation"
        summary = report["summary"][split]
        scale = ROWS[name]["scale"]
        summary = {"mean": summary["mean"] * scale / 100, "std": summary["std"] * scale / 100}
        axis.bar(index, 100 * summary["mean"], yerr=100 * summary["std"], capsize=4,
                 color="tab:blue" if name.startswith("minilm") else
                 ("tab:green" if "pretrained" in name else "tab:gray"))
        axis.text(index, 100 * summary["mean"] + 1, f"{100 * summary['mean']:.1f}", ha="center", fontsize="small")
        positions.append(index)
        labels.append(f"{name}\n({split} {report['metric']})")
    axis.set_xticks(positions, labels, rotation=20, ha="right", fontsize="x-small")
    axis.set_ylabel("%")
    axis.set_ylim(0, 105)
    axis.set_title("flaxen: pretrain -> fine-tune (results/<row>.json)", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def update_readme(reports: dict, readme: str = README) -> None:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers for the results table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(reports)}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="*", help=f"rows to run: {', '.join(ROWS)} or all")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the row's)")
    parser.add_argument("--table", action="store_true", help="only rebuild the README table and results/summary.png")
    parser.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every training run")
    parser.add_argument("--search", metavar="SWEEP_DIR",
                        help="only record a finished hyperparameter search (multirun/<experiment>/<date_time>) "
                             "in results/<experiment>_search.json")
    args = parser.parse_args(argv)
    if args.search:
        record = search_record(args.search)
        experiment = os.path.basename(os.path.dirname(os.path.abspath(args.search)))
        _write_json(os.path.join(RESULTS, f"{experiment}_search.json"), record)
        print(json.dumps(record["best"], indent=2))
        return 0
    names = list(ROWS) if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in ROWS]
    if unknown or (not names and not args.table):
        parser.error(f"rows must be among {', '.join(ROWS)} or 'all' (got {', '.join(unknown) or 'none'})")
    for name in names:
        reproduce(name, args.seeds or ROWS[name]["seeds"], args.extra)
    reports = load_reports()
    update_readme(reports)
    if reports:
        summary_figure(reports, os.path.join(RESULTS, "summary.png"))
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
