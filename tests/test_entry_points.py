"""train.py as a user runs it: `python train.py experiment=NAME seed=1` in a fresh working directory
lands in the run directory configs/config.yaml documents (hydra.run.dir = runs/<experiment_name>/
<override_dirname>), which scripts/reproduce.py's run_dir_of relies on; `python train.py -m
... seed=0,1` makes one run directory per seed under the multirun layout (hydra.sweep.dir /
hydra.sweep.subdir).

Two subprocesses (JAX starts in each). The experiment is a tiny preset written into a
--config-dir (the quickstart language, one 32-wide layer, 2 steps), so the command line carries
only what a user types: experiment, seed and data_dir (excluded from the directory name).
"""
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "entry_tiny"
PRESET = f"""# @package _global_
defaults:
  - override /model: gpt_nano
  - override /task: clm
  - override /data: quickstart
experiment_name: {EXPERIMENT}
model: {{hidden_size: 32, num_heads: 2, intermediate_size: 64, num_layers: 1, max_position_embeddings: 64}}
data: {{synthetic: {{num_train: 300, num_validation: 40}}}}
schedule: {{warmup_steps: 1}}
steps: 2
batch_size: 8
eval_batch_size: 16
log_every: 1
eval_every: 2
checkpoint_every: 2
progress_bar: false
loggers: []
"""


def hydra_section() -> dict:
    with open(os.path.join(ROOT, "configs", "config.yaml")) as f:
        return yaml.safe_load(f)["hydra"]


def override_dirname(overrides: list[str]) -> str:
    """Hydra's ${hydra.job.override_dirname} as configs/config.yaml sets it up: the command-line
    key=value pairs minus exclude_keys, sorted, joined by ','."""
    excluded = set(hydra_section()["job"]["config"]["override_dirname"]["exclude_keys"])
    return ",".join(sorted(o for o in overrides if o.split("=", 1)[0] not in excluded))


def expand(pattern: str, override_line: str) -> str:
    return pattern.replace("${experiment_name}", EXPERIMENT).replace("${hydra.job.override_dirname}", override_line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh working directory, the tiny preset in a config dir, a data dir and the subprocess env
    (one XLA compilation cache for both subprocesses)."""
    base = tmp_path_factory.mktemp("entry")
    cwd, conf, data = base / "work", base / "conf" / "experiment", base / "data"
    for path in (cwd, conf, data):
        os.makedirs(path)
    (conf / f"{EXPERIMENT}.yaml").write_text(PRESET)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(base / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return {"cwd": str(cwd), "config_dir": str(base / "conf"), "data_dir": str(data), "env": env}


def train(workdir, *overrides) -> list[str]:
    """Runs `python train.py --config-dir CONF OVERRIDES...` in the working directory; returns the
    overrides that name the run (the data_dir override last)."""
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config-dir", workdir["config_dir"], *overrides,
               f"data_dir={workdir['data_dir']}"]
    result = subprocess.run(command, cwd=workdir["cwd"], env=workdir["env"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "error:" not in result.stderr
    return [o for o in overrides if o != "-m"] + [f"data_dir={workdir['data_dir']}"]


def assert_finished_run(run_dir: str, seed: int) -> None:
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["status"] == "completed" and results["steps"] == 2
    assert results["experiment"] == EXPERIMENT
    saved = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    assert saved.seed == seed and os.path.realpath(saved.run_dir) == os.path.realpath(run_dir)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "2"))


def test_train_py_seed_1_lands_in_the_documented_run_directory(workdir, monkeypatch):
    overrides = train(workdir, f"experiment={EXPERIMENT}", "seed=1")
    pattern = hydra_section()["run"]["dir"]
    assert pattern == "runs/${experiment_name}/${hydra.job.override_dirname}"
    expected = os.path.join(workdir["cwd"], expand(pattern, override_dirname(overrides)))
    assert expected == os.path.join(workdir["cwd"], "runs", EXPERIMENT, "seed=1")
    assert os.listdir(workdir["cwd"]) == ["runs"] and os.listdir(os.path.join(workdir["cwd"], "runs")) == [EXPERIMENT]
    assert_finished_run(expected, seed=1)

    spec = importlib.util.spec_from_file_location("flaxen_reproduce_entry", os.path.join(ROOT, "scripts", "reproduce.py"))
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    monkeypatch.setattr(reproduce, "ROOT", workdir["cwd"])
    assert reproduce.run_dir_of(EXPERIMENT, 1) == expected
    assert reproduce.train_command(EXPERIMENT, 1)[2:] == [f"experiment={EXPERIMENT}", "seed=1"]


def test_train_py_multirun_makes_one_run_directory_per_seed(workdir):
    before = datetime.datetime.now().replace(microsecond=0)
    overrides = train(workdir, "-m", f"experiment={EXPERIMENT}", "seed=0,1")
    sweep = hydra_section()["sweep"]
    assert sweep == {"dir": "multirun/${experiment_name}/${now:%Y-%m-%d_%H-%M-%S}",
                     "subdir": "${hydra.job.override_dirname}"}
    parent = os.path.join(workdir["cwd"], "multirun", EXPERIMENT)
    (stamp,) = os.listdir(parent)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", stamp), stamp
    assert datetime.datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S") >= before
    jobs = {seed: override_dirname([f"experiment={EXPERIMENT}", f"seed={seed}", overrides[-1]]) for seed in (0, 1)}
    assert jobs == {0: "seed=0", 1: "seed=1"}
    assert sorted(name for name in os.listdir(os.path.join(parent, stamp)) if not name.startswith(".")
                  and name != "multirun.yaml") == ["seed=0", "seed=1"]
    for seed, subdir in jobs.items():
        assert_finished_run(os.path.join(parent, stamp, subdir), seed=seed)
    assert not os.path.exists(os.path.join(workdir["cwd"], "runs", EXPERIMENT, "seed=0"))
