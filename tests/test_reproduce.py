"""scripts/reproduce.py's bookkeeping on finished runs written here: per-seed records from
results.json and eval_<split>.json, mean and std over seeds, target verdicts, the pretrained vs
scratch gap, the README table between its markers, the loss-curve and summary figures."""
import importlib.util
import json
import os
import statistics

import pytest

from flaxen import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def reproduce(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("flaxen_reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    monkeypatch.setattr(module, "RESULTS", str(tmp_path / "results"))
    return module


def fake_run(module, name, seed, values, steps=100, report=None):
    run_dir = module.run_dir_of(name, seed)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"status": "completed", "steps": steps, "wall_seconds": 600.0 + seed, "tokens_per_s": 1000.0,
                   "parameters": {"total": 1234, "trainable": 1234}}, f)
    metric = module.ROWS[name]["metric"]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in (50, 100):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            f.write(json.dumps({"step": step, "validation/loss": 2.0 / step, f"validation/{metric}": 0.5}) + "\n")
    for split, value in values.items():
        metrics = {metric: value, **({"report": report} if report else {})}
        with open(os.path.join(run_dir, f"eval_{split}.json"), "w") as f:
            json.dump({"split": split, "step": steps, "metrics": metrics}, f)
    return run_dir


def test_rows_seeds_table_and_figures(reproduce, tmp_path):
    accuracies = [0.90, 0.89, 0.87]
    for seed, value in enumerate(accuracies):
        run_dir = fake_run(reproduce, "minilm_sst2", seed, {"validation": value})
        assert reproduce.plot_loss_curve(run_dir, "t").endswith("loss_curve.png")
        assert os.path.getsize(os.path.join(run_dir, "loss_curve.png")) > 1000
    assert reproduce.run_dir_of("minilm_sst2", 2) == str(tmp_path / "runs" / "minilm_sst2" / "seed=2")
    evaluation = reproduce.eval_command(reproduce.run_dir_of("minilm_sst2", 2), "validation", 800)
    assert config.compose([evaluation[2]], config_name="eval").run_dir == os.path.join("runs", "minilm_sst2", "seed=2")
    assert reproduce.shell_command(evaluation) == \
        "python eval.py \"run_dir='runs/minilm_sst2/seed=2'\" split=validation step=800"
    records = [reproduce.seed_record("minilm_sst2", seed) for seed in range(3)]
    assert records[0]["curve"] == {"loss": [[50, 1.0 / 50], [100, 1.0 / 100]],
                                   "validation/accuracy": [[50, 0.5], [100, 0.5]]}
    report = reproduce.row_record("minilm_sst2", records, ["python train.py experiment=minilm_sst2"])
    summary = report["summary"]["validation"]
    assert summary["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert summary["std"] == pytest.approx(statistics.stdev(accuracies))
    assert report["target"]["met"] and report["target"]["margin"] == pytest.approx(0.00666666, abs=1e-6)

    per_type = {"PER": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 10}}
    for name, value in (("bert_mini_pretrained_conll2003", 0.7), ("bert_mini_scratch_conll2003", 0.5)):
        fake_run(reproduce, name, 0, {"validation": value + 0.02, "test": value}, report=per_type)
    fake_run(reproduce, "minilm_sst2_tuned", 0, {"validation": 0.905})
    reports = {"minilm_sst2": report,
               "minilm_sst2_tuned": reproduce.row_record("minilm_sst2_tuned", [reproduce.seed_record("minilm_sst2_tuned", 0)], [])}
    for name in ("bert_mini_pretrained_conll2003", "bert_mini_scratch_conll2003"):
        reports[name] = reproduce.row_record(name, [reproduce.seed_record(name, 0)], [])
    assert reports["bert_mini_pretrained_conll2003"]["runs"][0]["per_type"]["test"] == per_type

    text = reproduce.table(reports)
    assert "| `minilm_sst2` | SST-2 |" in text and "88.67 ± 1.53" in text and "validation ≥ 88: met" in text
    assert "| validation ≥ 90: met; vs the 800-step preset: +1.83 pts |" in text  # a target and a comparison
    assert "vs scratch: +20.00 / +20.00 pts" in text and "| `minilm_conll2003` |" in text and "not run" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.BEGIN}\nold table\n{reproduce.END}\nafter\n")
    reproduce.update_readme(reports, str(readme))
    written = readme.read_text()
    assert "old table" not in written and written.startswith("intro\n") and written.endswith("after\n")
    assert text in written
    reproduce.summary_figure(reports, str(tmp_path / "summary.png"))
    assert os.path.getsize(tmp_path / "summary.png") > 1000


def test_a_run_evaluated_at_another_step_is_refused(reproduce):
    run_dir = fake_run(reproduce, "minilm_sst2", 0, {"validation": 0.9})
    path = os.path.join(run_dir, "eval_validation.json")
    report = json.load(open(path))
    report["step"] = 50
    json.dump(report, open(path, "w"))
    with pytest.raises(SystemExit, match="not the run's last step 100"):
        reproduce.seed_record("minilm_sst2", 0)


def test_peft_compare_collects_finished_runs(tmp_path, monkeypatch):
    """scripts/peft_compare.py --collect: one record per finished run, named by its own overrides;
    a directory that is not a finished run is refused without writing anything."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location("flaxen_peft_compare", os.path.join(ROOT, "scripts", "peft_compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    runs = {"a": ["experiment=minilm_sst2", "peft=lora", "peft.rank=4", "peft.target_modules=[attention.*,intermediate,output]",
                  "optimizer.lr=2e-3"],
            "b": ["experiment=minilm_sst2", "peft=bitfit", "optimizer.lr=1e-3"]}
    for name, overrides in runs.items():
        os.makedirs(tmp_path / name / ".hydra")
        with open(tmp_path / name / ".hydra" / "overrides.yaml", "w") as f:
            f.write("".join(f"- {o}\n" for o in overrides + ["hydra.run.dir=x"]))
        with open(tmp_path / name / "results.json", "w") as f:
            json.dump({"status": "completed", "steps": 800, "train_seconds": 799.0,
                       "final_eval": {"accuracy": 0.87}, "best_eval": {"accuracy": 0.875, "step": 600},
                       "parameters": {"trainable": 10, "total": 1000}, "optimizer_state_bytes": 80,
                       "peak_memory": {"bytes": 2**20, "kind": "host peak RSS"}}, f)
    out = str(tmp_path / "out.json")
    assert module.main(["--collect", str(tmp_path / "a"), str(tmp_path / "b"), "--out", out]) == 0
    with open(out) as f:
        report = json.load(f)
    assert [r["method"] for r in report["methods"]] == ["lora_all", "bitfit"]
    assert report["methods"][0]["command"] == "python train.py " + " ".join(runs["a"])
    assert report["methods"][1]["label"] == "peft=bitfit optimizer.lr=1e-3"
    assert report["methods"][0]["trainable_percent"] == 1.0 and report["methods"][0]["seconds_per_step"] == 1.0
    os.makedirs(tmp_path / "unfinished")
    assert module.main(["--collect", str(tmp_path / "unfinished"), "--out", str(tmp_path / "other.json")]) == 2
    assert not os.path.exists(tmp_path / "other.json")


def test_fewshot_curve_from_finished_runs(tmp_path, monkeypatch):
    """scripts/fewshot.py: the command of each (model, K, subset) composes to the few-shot config it
    names; per model and K the 5 subsets' last-step accuracies give mean and sample std; the JSON
    keeps every run and the figure is drawn."""
    spec = importlib.util.spec_from_file_location("flaxen_fewshot", os.path.join(ROOT, "scripts", "fewshot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    monkeypatch.setattr(module, "OUT", str(tmp_path / "results" / "fewshot_sst2.json"))
    assert [module.budget(k)["steps"] for k in (16, 64, 256)] == [50, 80, 320]

    command = module.train_command("minilm_sst2", 64, 3)
    assert command[-1] == "hydra.run.dir='runs/fewshot_sst2/minilm_sst2/K=64/subset=3'"
    cfg = config.compose(command[2:-1])
    assert (cfg.data.train_examples_per_class, cfg.data.train_subset_seed, cfg.steps, cfg.batch_size,
            cfg.schedule.warmup_steps, cfg.eval_every) == (64, 3, 80, 16, 8, 0)

    accuracy = {(k, s): 0.5 + 0.01 * s + k / 1000 for k in (16, 64) for s in range(5)}

    def fake_train(command, extra):
        overrides = dict(word.split("=", 1) for word in command[2:-1])
        k, subset = int(overrides["data.train_examples_per_class"]), int(overrides["data.train_subset_seed"])
        run_dir = module.run_dir_of("minilm_sst2", k, subset)
        os.makedirs(run_dir)
        steps = module.budget(k)["steps"]
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump({"status": "completed", "steps": steps, "wall_seconds": 30.0,
                       "train_length": {"epoch_examples": 2 * k}}, f)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": steps, "loss": 0.3}) + "\n")
            f.write(json.dumps({"step": steps, "validation/accuracy": accuracy[k, subset]}) + "\n")

    monkeypatch.setattr(module, "_run", fake_train)
    assert module.main(["--models", "minilm_sst2", "--ks", "16", "64"]) == 0
    report = json.load(open(tmp_path / "results" / "fewshot_sst2.json"))
    for k in (16, 64):
        entry = report["models"]["minilm_sst2"][str(k)]
        values = [accuracy[k, s] for s in range(5)]
        assert entry["summary"]["values"] == values and [r["train_examples"] for r in entry["runs"]] == [2 * k] * 5
        assert entry["summary"]["mean"] == pytest.approx(statistics.fmean(values))
        assert entry["summary"]["std"] == pytest.approx(statistics.stdev(values))
    assert os.path.getsize(tmp_path / "results" / "fewshot_sst2.png") > 1000
