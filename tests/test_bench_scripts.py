"""scripts/bench.py and scripts/bench_loader.py as a user runs them, their cheapest case each: every
JSON line records the CPU it ran on (model and cores, as scripts/reproduce.py's host() writes it
into results files), the checkout's git commit, the machine's load averages and the data settings
the numbers were measured with."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("flaxen_reproduce_bench", os.path.join(ROOT, "scripts", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args) -> list[dict]:
    """The JSON lines a script prints (run from the repository root)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def assert_recorded(line: dict, reproduce) -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert line["cpu"] == reproduce.host() and line["cpu"].endswith(f", {os.cpu_count()} cores")
    assert line["git_commit"] == (commit or None)
    load = line["load_avg"]
    assert len(load) == 3 and all(isinstance(x, (int, float)) and x >= 0 for x in load), load
    assert {"source", "batch", "seq", "length_grouping"} <= set(line["data"]), line["data"]


def test_bench_records_machine_commit_load_and_data_on_every_line(reproduce):
    lines = run_script(os.path.join("scripts", "bench.py"), "--cases", "gpt_nano", "--steps", "1", "--warmup", "1")
    assert [line["case"] for line in lines] == ["host_f32_matmul_peak", "gpt_nano_clm"]
    for line in lines:
        assert_recorded(line, reproduce)
    step = lines[1]
    assert step["data"] == {"source": "one fixed batch of random token ids", "batch": 12, "seq": 64,
                            "length_grouping": 0}
    assert (step["batch"], step["seq"]) == (12, 64)


def test_bench_loader_records_machine_commit_load_and_data_on_every_line(reproduce, tmp_path):
    lines = run_script(os.path.join("scripts", "bench_loader.py"), "--presets", "quickstart_cls", "--batches", "2",
                       "--batch-size", "8", "--data-dir", str(tmp_path))
    (line,) = lines
    assert line["preset"] == "quickstart_cls"
    assert_recorded(line, reproduce)
    with open(os.path.join(ROOT, "configs", "data", "quickstart_cls.yaml")) as f:
        preset = yaml.safe_load(f)
    data = line["data"]
    assert data["batch"] == 8 and data["source"] == preset["source"]
    assert data["seq"] == preset["bucket_lengths"] and data["max_length"] == preset["max_length"]
    assert data["length_grouping"] == preset.get("length_grouping", 0)
    assert set(map(int, line["batch_lengths"])) <= set(data["seq"])
