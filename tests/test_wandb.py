"""Weights & Biases logging (loggers=[..., wandb]), read back from the offline run files: W&B holds
exactly the scalars of metrics.jsonl at their steps (train rows under train/<key>, evaluations
under <split>/<metric>), the resolved config and the git commit, and a resumed flaxen run
continues the same W&B run (the id kept in RUN_DIR/wandb_id).

wandb 0.31 ships no Python reader for its .wandb files (its sync is in the wandb-core binary), so
`wandb_records` reads the record framing (LevelDB's log format behind a 7-byte ":W&B" header:
32 KiB blocks, each record chunk a 7-byte header of CRC, length and type) and parses each record
with wandb's own protobuf, wandb.proto.wandb_internal_pb2.Record.

WANDB_MODE=offline: no network, no account. WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR and
WANDB_DATA_DIR point into the test's temporary directory, so nothing is written to $HOME."""
import glob
import json
import os
import struct
import sys

import pytest
from tiny_runs import make_cfg

from flaxen import config, loop
from flaxen import logging as run_logging
from flaxen.errors import ConfigError

pytest.importorskip("wandb")

HOME_PATHS = [os.path.expanduser(p) for p in ("~/.config/wandb", "~/.cache/wandb", "~/.local/share/wandb", "~/.netrc")]
CRASH_AT = 7  # the first start dies before step 7 is logged; its last checkpoint is step 4


def wandb_records(path: str) -> list:
    """The wandb_internal_pb2.Record messages of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, records, chunks, offset = 32768, [], b"", 7
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            offset += left
            continue
        chunks += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL, or the LAST chunk of a record split over blocks
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(directory: str) -> dict:
    """{run: the run record, config: {key: value}, history: {tag: [(step, value)]}, summary:
    {key: value}, exit_code} of one offline-run-* directory."""
    (path,) = glob.glob(os.path.join(directory, "*.wandb"))
    out = {"run": None, "config": {}, "history": {}, "summary": {}, "exit_code": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            for tag, value in items.items():
                if not tag.startswith("_"):
                    out["history"].setdefault(tag, []).append((items["_step"], value))
            continue
        elif kind == "summary":
            out["summary"].update({_key(item): json.loads(item.value_json) for item in record.summary.update})
            continue
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
            continue
        else:
            continue
        out["config"].update({_key(item): json.loads(item.value_json) for item in updates})
    return out


def jsonl_scalars(run_dir, keep=lambda step: True) -> dict:
    """metrics.jsonl as {tag: [(step, value)]}, with the tags TensorBoard and W&B use."""
    expected = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if keep(row["step"]):
                for tag, value in run_logging._scalars(row).items():
                    expected.setdefault(tag, []).append((row["step"], value))
    return expected


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, in_memory_task_data):
    """A tiny classifier logged every step to TensorBoard and W&B (offline), evaluated every 4
    steps: a first start crashes before step 7 (checkpoint at 4), the rerun resumes and ends at 8."""
    tmp = tmp_path_factory.mktemp("wandb")
    home_before = {path: os.path.exists(path) for path in HOME_PATHS}
    repo_wandb = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "wandb")
    repo_wandb_before = os.path.exists(repo_wandb)
    run_dir = tmp / "run"
    cfg = make_cfg(run_dir, loggers=["tensorboard", "wandb"], log_every=1, eval_every=4, checkpoint_every=4)
    data = in_memory_task_data("seq_cls")

    def crash(step):
        if step == CRASH_AT:
            raise RuntimeError("simulated crash")
        return False

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(tmp / name.lower()))
        for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
            env.delenv(name, raising=False)
        with pytest.raises(RuntimeError, match="simulated crash"):
            loop.train(cfg, task_data=data, should_stop=crash)
        first_id = (run_dir / "wandb_id").read_text().strip()
        results = loop.train(cfg, task_data=data)
    assert results["steps"] == 8
    assert {path: os.path.exists(path) for path in HOME_PATHS} == home_before, "wandb wrote to $HOME"
    assert os.path.exists(repo_wandb) == repo_wandb_before, "wandb wrote to the working directory"
    return {"run_dir": run_dir, "cfg": cfg, "first_id": first_id}


def offline_runs(run_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))


def test_wandb_scalars_equal_metrics_jsonl_across_a_resume(wandb_run):
    run_dir = wandb_run["run_dir"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert run_id == wandb_run["first_id"]
    first, resumed = offline_runs(run_dir)  # one offline run directory per start, both with the run's id
    assert first.endswith(f"-{run_id}") and resumed.endswith(f"-{run_id}")
    first, resumed = read_offline_run(first), read_offline_run(resumed)
    assert first["run"].run_id == resumed["run"].run_id == run_id
    assert first["exit_code"] == 1 and resumed["exit_code"] == 0  # the crash is marked failed

    expected = jsonl_scalars(run_dir)
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "validation/loss",
            "validation/accuracy"} <= set(expected)
    assert [step for step, _ in expected["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in expected["validation/accuracy"]] == [4, 8]
    # the resumed start logged every step after the checkpoint, exactly as metrics.jsonl holds it
    assert resumed["history"] == jsonl_scalars(run_dir, keep=lambda step: step > 4)
    # the crashed start logged up to step 6; up to the checkpoint it is metrics.jsonl's history
    assert [step for step, _ in first["history"]["train/loss"]] == list(range(1, CRASH_AT))
    upto_checkpoint = {tag: [(s, v) for s, v in points if s <= 4] for tag, points in first["history"].items()}
    assert {tag: points for tag, points in upto_checkpoint.items() if points} == \
        jsonl_scalars(run_dir, keep=lambda step: step <= 4)


def test_wandb_records_the_resolved_config_commit_and_run_name(wandb_run):
    run_dir, cfg = wandb_run["run_dir"], wandb_run["cfg"]
    commit = run_logging.git_commit()
    for path in offline_runs(run_dir):
        run = read_offline_run(path)
        assert run["run"].project == "flaxen"
        assert run["run"].display_name == f"default/{run_dir.name}"
        assert run["run"].run_group == "default"
        recorded = {key: value for key, value in run["config"].items() if key != "_wandb"}
        assert recorded == {**config.to_container(cfg), "git_commit": commit}
        if commit is not None:
            assert run["summary"]["git_commit"] == commit


def test_tensorboard_still_logs_beside_wandb(wandb_run):
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(wandb_run["run_dir"] / "tensorboard"))


@pytest.mark.parametrize("loggers, message", [
    (["tensorboard", "comet"], r"loggers=\['tensorboard', 'comet'\]: 'comet' is not a logger; expected a list of "
                               r"tensorboard, wandb"),
    (["wandb", "wandb"], r"loggers=\['wandb', 'wandb'\]: 'wandb' is listed twice"),
])
def test_a_bad_logger_list_is_one_config_error(tmp_path, loggers, message):
    with pytest.raises(ConfigError, match=message):
        config.validate(make_cfg(tmp_path, loggers=loggers))
    with pytest.raises(ConfigError, match=message):
        config.compose([f"loggers=[{','.join(loggers)}]", f"run_dir={tmp_path}"])


def test_wandb_without_its_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec("wandb") is then None
    with pytest.raises(ConfigError, match=r"pip install 'flaxen\[wandb\]'"):
        config.validate(make_cfg(tmp_path, loggers=["tensorboard", "wandb"]))
    config.validate(make_cfg(tmp_path, loggers=["tensorboard"]))


def test_a_saved_config_with_the_retired_tensorboard_key_reads_as_loggers(tmp_path):
    for value, loggers in (("true", ["tensorboard"]), ("false", [])):
        (tmp_path / "config.yaml").write_text(f"steps: 3\ntensorboard: {value}\n")
        saved = config.load_saved(str(tmp_path / "config.yaml"))
        assert "tensorboard" not in saved and list(saved.loggers) == loggers
