"""Config composition: defaults, every preset, and bad keys / types / values rejected by name."""
import glob
import os
import subprocess
import sys

import pytest

from flaxen import config, tasks
from flaxen.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "experiment", "*.yaml")))


def test_default_is_the_quickstart_experiment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAXEN_DATA_DIR", str(tmp_path))
    cfg = config.compose(["run_dir=/tmp/x"])
    assert cfg.experiment_name == "quickstart"
    assert cfg.data.name == "quickstart" and cfg.task.name in tasks.names()
    assert cfg.data_dir == str(tmp_path)


def test_data_dir_defaults_to_home(monkeypatch):
    monkeypatch.delenv("FLAXEN_DATA_DIR", raising=False)
    cfg = config.compose(["run_dir=/tmp/x"])
    assert cfg.data_dir == os.path.join(os.path.expanduser("~"), "flaxen_data")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(experiment):
    cfg = config.compose([f"experiment={experiment}", "run_dir=/tmp/x"])
    assert cfg.experiment_name == experiment
    header = open(os.path.join(ROOT, "configs", "experiment", f"{experiment}.yaml")).read()
    assert "Command:" in header and "Expected:" in header


@pytest.mark.parametrize("override, named", [
    ("optimizer.lrr=1e-3", "optimizer.lrr"),
    ("stepz=10", "stepz"),
    ("steps=ten", "steps"),
    ("model.hidden_size=wide", "model.hidden_size"),
    ("data.max_lenght=64", "data.max_lenght"),
])
def test_misspelled_keys_and_wrong_types_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config.compose([override, "run_dir=/tmp/x"])


@pytest.mark.parametrize("override, message", [
    ("task.name=tagging", "task.name='tagging'"),
    ("schedule.name=step", "schedule.name='step'"),
    ("micro_batch_size=5", "batch_size=32 is not a multiple of micro_batch_size=5"),
    ("steps=0", "steps=0"),
    ("best_mode=up", "best_mode='up'"),
    ("model.pretrained=/no/such/dir", "model.pretrained='/no/such/dir'"),
    ("data.window_length=4096", "data.window_length=4096 exceeds model.max_position_embeddings"),
])
def test_bad_values_are_rejected_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        config.compose([override, "run_dir=/tmp/x"])


def test_eval_config_composes():
    cfg = config.compose(["run_dir=/tmp/run", "split=test", "step=3"], config_name="eval")
    assert cfg.run_dir == "/tmp/run" and cfg.split == "test" and cfg.step == 3


def test_train_py_rejects_a_misspelled_key_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "optimizer.lrr=1e-3",
                             f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "optimizer.lrr" in result.stderr + result.stdout
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("value", ["runs/x", "runs/minilm_sst2/seed=1", "/tmp/a b/c", "it's", "a,b[0]"])
def test_override_quotes_what_hydra_would_parse(value):
    cfg = config.compose([config.override("run_dir", value)], config_name="eval")
    assert cfg.run_dir == value
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {config.shell_override('run_dir', value)}"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == [config.override("run_dir", value)]
