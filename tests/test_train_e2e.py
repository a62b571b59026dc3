"""train.py and eval.py through their entry functions on the generated quickstart data: pretrain a
few steps, fine-tune from it (init_from), evaluate the best checkpoint, a chosen step, and reject
bad eval requests by name. eval.py's choice of checkpoint on a run whose best step is not its
last: no step (the best), step=N, checkpoint=PATH and model.pretrained=PATH, each against the
validation metrics the loop logged at that step."""
import importlib.util
import json
import os

import pytest
from omegaconf import OmegaConf

from flaxen import checkpoint, config, loop
from flaxen.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=1",
         "data.synthetic.num_train=300", "data.synthetic.num_validation=40", "batch_size=8", "eval_batch_size=16",
         "progress_bar=false", "loggers=[tensorboard]"]


def _entry(name):
    spec = importlib.util.spec_from_file_location(f"flaxen_entry_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data_dir = str(base / "data")
    os.makedirs(data_dir)  # a data_dir that does not exist is refused
    train = _entry("train")
    pretrain_dir = str(base / "pretrain")
    pretrain_cfg = config.compose(["experiment=quickstart", *SMALL, "steps=4", "eval_every=2", "checkpoint_every=2",
                                   "log_every=1", "schedule.warmup_steps=1", f"data_dir={data_dir}",
                                   f"run_dir={pretrain_dir}"])
    pretrain = train.run(pretrain_cfg)
    resumed_dir = str(base / "resumed")
    resumed_cfg = pretrain_cfg.copy()
    resumed_cfg.run_dir = resumed_dir
    stopped = loop.train(resumed_cfg, should_stop=lambda step: step == 1)
    resumed = loop.train(resumed_cfg)
    finetune_dir = str(base / "finetune")
    finetune_cfg = config.compose(["experiment=quickstart_finetune", *SMALL, "steps=3", "eval_every=3",
                                   "schedule.warmup_steps=1", f"init_from={pretrain_dir}", f"data_dir={data_dir}",
                                   f"run_dir={finetune_dir}"])
    finetune = train.run(finetune_cfg)
    return {"data_dir": data_dir, "pretrain_dir": pretrain_dir, "pretrain": pretrain, "stopped": stopped,
            "resumed_dir": resumed_dir, "resumed": resumed,
            "finetune_dir": finetune_dir, "finetune": finetune, "eval": _entry("eval")}


def test_pretraining_run_writes_its_outputs(runs):
    run_dir, results = runs["pretrain_dir"], runs["pretrain"]
    assert results["status"] == "completed" and results["steps"] == 4
    for name in ("config.yaml", "metrics.jsonl", "results.json", "model.json"):
        assert os.path.isfile(os.path.join(run_dir, name))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tensorboard")))
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit()) == [2, 4]
    final = results["final_eval"]
    assert final["perplexity"] == pytest.approx(2.718281828459045 ** final["loss"], rel=1e-6)
    assert results["unigram_entropy"] > 0


def test_resume_on_the_grain_loader_is_bitwise(runs):
    assert runs["stopped"] == {"status": "interrupted", "steps": 1}
    assert runs["resumed"]["steps"] == 4
    arrays = []
    for run_dir in (runs["pretrain_dir"], runs["resumed_dir"]):
        saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
        arrays.append(saved.restore_arrays(4))
        saved.close()
    assert arrays[0].keys() == arrays[1].keys()
    for key in arrays[0]:
        assert (arrays[0][key] == arrays[1][key]).all(), key
    assert runs["resumed"]["final_eval"]["loss"] == runs["pretrain"]["final_eval"]["loss"]


def test_finetuning_starts_from_the_pretrained_parameters(runs):
    results = runs["finetune"]
    assert results["status"] == "completed"
    origin = results["init_from"]
    assert origin["checkpoint"] == os.path.join(runs["pretrain_dir"], "checkpoints", "4")
    assert origin["fresh"] == ["head.dense.kernel"] and origin["copied"] > 10
    assert set(results["final_eval"]) >= {"accuracy", "macro_f1", "report"}
    assert set(results["final_eval"]["report"]) == {"animal", "person", "machine", "food"}


def test_eval_best_checkpoint_and_a_chosen_step(runs):
    evaluate = runs["eval"]
    run_dir, data_dir = runs["finetune_dir"], runs["data_dir"]
    cfg = config.compose([f"run_dir={run_dir}", "split=validation", f"data_dir={data_dir}"], config_name="eval")
    report = evaluate.run(cfg, [f"run_dir={run_dir}", "split=validation", f"data_dir={data_dir}"])
    saved = json.load(open(os.path.join(run_dir, "eval_validation.json")))
    assert saved["step"] == runs["finetune"]["best_eval"]["step"] == 3
    assert saved["metrics"]["accuracy"] == pytest.approx(runs["finetune"]["final_eval"]["accuracy"])
    assert report["metrics"]["num_examples"] == 40

    pre_dir = runs["pretrain_dir"]
    overrides = [f"run_dir={pre_dir}", "step=2", f"data_dir={data_dir}", "eval_batches=1"]
    report = evaluate.run(config.compose(overrides, config_name="eval"), overrides)
    assert report["step"] == 2 and report["task"] == "clm"
    assert 0 < report["metrics"]["num_examples"] <= 16
    assert report["metrics"]["loss"] != pytest.approx(runs["pretrain"]["final_eval"]["loss"])


def test_eval_rejects_bad_requests_by_name(runs):
    evaluate = runs["eval"]
    run_dir = runs["pretrain_dir"]
    with pytest.raises(CheckpointError, match="available steps: \\[2, 4\\]"):
        overrides = [f"run_dir={run_dir}", "step=3", f"data_dir={runs['data_dir']}"]
        evaluate.run(config.compose(overrides, config_name="eval"), overrides)
    with pytest.raises(ConfigError, match="data=sst2"):
        overrides = [f"run_dir={run_dir}", "data=sst2"]
        evaluate.run(config.compose(overrides, config_name="eval"), overrides)
    with pytest.raises(ConfigError, match="split='dev'"):
        overrides = [f"run_dir={run_dir}", "split=dev", f"data_dir={runs['data_dir']}"]
        evaluate.run(config.compose(overrides, config_name="eval"), overrides)
    with pytest.raises(CheckpointError, match="does not exist"):
        overrides = ["run_dir=/no/such/run"]
        evaluate.run(config.compose(overrides, config_name="eval"), overrides)


def test_runs_keep_their_tokenizer_and_init_from_reads_it(runs):
    from flaxen import modeling
    from flaxen.data import tokenizers

    saved = os.path.join(runs["pretrain_dir"], "tokenizer")
    assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
    finetune_cfg = config.compose(["experiment=quickstart_finetune", f"init_from={runs['pretrain_dir']}"])
    assert modeling.tokenizer_path(finetune_cfg) == saved
    pretrain, finetune = (tokenizers.load_tokenizer(os.path.join(d, "tokenizer"))
                          for d in (runs["pretrain_dir"], runs["finetune_dir"]))
    sentence = "the small dog sees a robot ."
    assert pretrain.encode(sentence) == finetune.encode(sentence)


def test_a_finished_run_is_returned_not_retrained(runs):
    path = os.path.join(runs["pretrain_dir"], "results.json")
    before = (os.path.getmtime(path), open(path).read())
    cfg = OmegaConf.load(os.path.join(runs["pretrain_dir"], "config.yaml"))
    again = loop.train(config.compose(["experiment=quickstart", *SMALL, "steps=4", "eval_every=2",
                                       "checkpoint_every=2", "log_every=1", "schedule.warmup_steps=1",
                                       f"data_dir={runs['data_dir']}", f"run_dir={runs['pretrain_dir']}"]))
    assert cfg.steps == 4
    assert again == json.load(open(path))
    assert (os.path.getmtime(path), open(path).read()) == before


# ---------------------------------------------------------------------- eval.py's choice of checkpoint


@pytest.fixture(scope="module")
def early_best(runs, tmp_path_factory):
    """A run whose best checkpoint is not its last: best_metric=loss with best_mode=max makes the
    highest validation loss the best, and training lowers the loss, so step 2 beats step 4. Its
    metrics.jsonl holds what the loop evaluated at each step (the references for eval.py)."""
    run_dir = str(tmp_path_factory.mktemp("early_best") / "run")
    results = loop.train(config.compose(["experiment=quickstart", *SMALL, "steps=4", "eval_every=2",
                                         "checkpoint_every=2", "log_every=1", "schedule.warmup_steps=1",
                                         "best_metric=loss", "best_mode=max", f"data_dir={runs['data_dir']}",
                                         f"run_dir={run_dir}"]))
    logged = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        scores = {key.split("/", 1)[1]: value for key, value in row.items() if key.startswith("validation/")}
        if scores:
            logged[row["step"]] = scores
    return {"run_dir": run_dir, "results": results, "logged": logged, "data_dir": runs["data_dir"],
            "eval": runs["eval"]}


def _evaluate(early_best, *overrides):
    # the run's eval batch size (SMALL): the batches fix the float32 summation order of the loss
    # (with 64-row batches the loss agrees to ~2e-7, so perplexity = exp(loss) only to ~1e-6)
    overrides = [*overrides, "split=validation", "eval_batch_size=16", f"data_dir={early_best['data_dir']}"]
    return early_best["eval"].run(config.compose(overrides, config_name="eval"), overrides)


def _assert_logged_at(report, early_best, step):
    """eval.py's metrics over the whole validation split equal what the loop logged at `step`."""
    logged = early_best["logged"][step]
    assert set(logged) >= {"loss", "perplexity", "num_examples"}
    for name, value in logged.items():
        assert report["metrics"][name] == pytest.approx(value, rel=1e-6, abs=0), name


def test_the_runs_best_step_is_not_its_last(early_best):
    results, logged = early_best["results"], early_best["logged"]
    assert results["status"] == "completed" and results["steps"] == 4
    assert sorted(logged) == [2, 4] and logged[2]["loss"] > logged[4]["loss"]
    assert results["best_eval"]["step"] == results["checkpoints"]["best_step"] == 2
    assert results["checkpoints"]["steps"] == [2, 4]


def test_eval_without_step_takes_the_best_checkpoint_and_step_n_takes_n(early_best):
    run_dir = early_best["run_dir"]
    best = _evaluate(early_best, f"run_dir={run_dir}")
    assert best["step"] == 2 and best["checkpoint"] == os.path.join(run_dir, "checkpoints", "2")
    _assert_logged_at(best, early_best, 2)
    assert json.load(open(os.path.join(run_dir, "eval_validation.json")))["step"] == 2
    last = _evaluate(early_best, f"run_dir={run_dir}", "step=4")
    assert last["step"] == 4 and last["checkpoint"] == os.path.join(run_dir, "checkpoints", "4")
    _assert_logged_at(last, early_best, 4)
    chosen = _evaluate(early_best, f"run_dir={run_dir}", "step=2")
    assert chosen["step"] == 2
    _assert_logged_at(chosen, early_best, 2)


def test_eval_of_a_checkpoint_path(early_best):
    """checkpoint=PATH: a step directory is that step; a checkpoints directory its best step."""
    checkpoints = os.path.join(early_best["run_dir"], "checkpoints")
    report = _evaluate(early_best, f"checkpoint={os.path.join(checkpoints, '4')}")
    assert report["step"] == 4 and report["run_dir"] == early_best["run_dir"]
    _assert_logged_at(report, early_best, 4)
    report = _evaluate(early_best, f"checkpoint={checkpoints}")
    assert report["step"] == 2
    _assert_logged_at(report, early_best, 2)


def test_eval_of_a_pretrained_directory(early_best, tmp_path):
    """model.pretrained=PATH: step 4's weights written as a Hugging Face directory
    (models.save_pretrained, with the run's tokenizer beside them) evaluate to what the loop
    logged at step 4, through models.load_pretrained instead of the checkpoint restore."""
    import shutil

    from flax import nnx

    import models
    from flaxen import modeling

    run_dir = early_best["run_dir"]
    graphdef, variables = nnx.split(modeling.read_spec(run_dir).build_abstract())
    saved = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    model = nnx.merge(graphdef, modeling.fill(variables, saved.restore_arrays(4), "step 4"))
    saved.close()
    pretrained = models.save_pretrained(model, str(tmp_path / "hf"))
    shutil.copytree(os.path.join(run_dir, "tokenizer"), pretrained, dirs_exist_ok=True)
    assert os.path.isfile(os.path.join(pretrained, "config.json"))
    report = _evaluate(early_best, "experiment=quickstart", "data.synthetic.num_train=300",
                       "data.synthetic.num_validation=40", f"model.pretrained={pretrained}",
                       f"output_dir={tmp_path / 'out'}")
    assert report["pretrained"] == pretrained and "step" not in report
    _assert_logged_at(report, early_best, 4)
    assert os.path.isfile(tmp_path / "out" / "eval_validation.json")
