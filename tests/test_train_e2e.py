"""train.py and eval.py through their entry functions on the generated quickstart data: pretrain a
few steps, fine-tune from it (init_from), evaluate the best checkpoint, a chosen step, and reject
bad eval requests by name."""
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
         "progress_bar=false", "tensorboard=true"]


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
