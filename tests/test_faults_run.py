"""A run directory cannot be damaged: one training process at a time (RUN_DIR/.lock), the config
recorded once and a resume refused when it would change what the run computes, everything
checkable checked before the first step and before the directory is written, Ctrl-C / SIGTERM
exiting 130 / 143 after the checkpoint is saved, a resume dropping what was logged past its
checkpoint, and a data_dir that does not exist refused by name."""
import errno
import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from omegaconf import OmegaConf

import tiny_runs
from flaxen import checkpoint, config, evaluation_run, loop, runlock, tasks
from flaxen.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["experiment=quickstart", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
         "model.num_layers=1", "data.synthetic.num_train=300", "data.synthetic.num_validation=40", "batch_size=8",
         "eval_batch_size=16", "eval_batches=2", "schedule.warmup_steps=1", "progress_bar=false", "loggers=[]"]


def make_cfg(run_dir, **overrides):
    """tests/tiny_runs.py's tiny seq_cls run, with the repository as data_dir (it must exist)."""
    return tiny_runs.make_cfg(run_dir, data_dir=ROOT, **overrides)


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def commands(run_dir):
    with open(os.path.join(run_dir, "commands.jsonl")) as f:
        return [json.loads(line) for line in f]


def snapshot(run_dir):
    """{relative path: bytes} of every file under run_dir."""
    files = {}
    for parent, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, run_dir)] = f.read()
    return files


class Process:
    """A subprocess (cwd: the repository root) whose merged output is read line by line."""

    def __init__(self, args, env=None):
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        self.lines, self.queue = [], queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append(line)
            self.queue.put(line)
        self.queue.put(None)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"exited ({self.popen.wait()}) before printing {text!r}:\n{self.output}")
            if text in line:
                return line

    def finish(self, timeout=120):
        code = self.popen.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, self.output

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)


@pytest.fixture
def processes():
    """start(args, env=None) -> Process; whatever still runs at the end of the test is killed."""
    started = []

    def start(args, env=None):
        started.append(Process(args, env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def train_env(tmp_path_factory):
    """Unbuffered output and one XLA compilation cache shared by the train.py subprocesses."""
    cache = tmp_path_factory.getbasetemp() / "xla_cache_subprocesses"
    return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def seq_task(in_memory_task_data):
    return in_memory_task_data("seq_cls")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, seq_task):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    results = loop.train(make_cfg(run_dir), task_data=seq_task)
    return run_dir, results


# ---------------------------------------------------------------------- the lock


HOLD_LOCK = ("import sys, time\nfrom flaxen.runlock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
             "print('locked', flush=True)\ntime.sleep(300)\n")


def test_a_second_start_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        tmp_path, tmp_path_factory, seq_task, processes, capsys):
    run_dir = tmp_path / "run"
    holder = processes([sys.executable, "-c", HOLD_LOCK, str(run_dir)])
    holder.wait_for("locked", timeout=60)
    with open(run_dir / ".lock") as f:
        record = json.load(f)
    assert record["host"] == socket.gethostname() and record["pid"] == holder.popen.pid
    assert set(record) == {"host", "pid", "started"}

    with pytest.raises(runlock.RunLockedError) as error:
        loop.train(make_cfg(run_dir), task_data=seq_task)
    message = str(error.value)
    for part in (f"host {record['host']}", f"pid {record['pid']}", f"started {record['started']}", str(run_dir)):
        assert part in message
    assert os.listdir(run_dir) == [".lock"]

    refused = processes([sys.executable, "train.py", *SMALL, "steps=5", f"data_dir={tmp_path}",
                         f"hydra.run.dir={run_dir}"], env=train_env(tmp_path_factory))
    code, output = refused.finish(timeout=120)
    assert code == 1, output
    assert f"error: run directory {run_dir} is in use by another training process: host {record['host']}, " \
           f"pid {record['pid']}, started {record['started']}" in output
    assert "Traceback" not in output
    assert sorted(os.listdir(run_dir)) == [".hydra", ".lock"]  # Hydra's own record, then nothing of ours

    holder.kill()  # SIGKILL: the lock file stays behind, naming a pid that is gone
    assert (run_dir / ".lock").exists()
    capsys.readouterr()
    results = loop.train(make_cfg(run_dir, steps=2, eval_split=None, checkpoint_every=0), task_data=seq_task)
    assert results["status"] == "completed"
    printed = capsys.readouterr().out
    assert f"names host {record['host']}, pid {record['pid']}" in printed
    assert f"pid {record['pid']} is not running); taking the run directory over" in printed
    assert not (run_dir / ".lock").exists()


def test_the_lock_within_one_process_and_without_flock(tmp_path, monkeypatch):
    warnings = []
    first = runlock.RunLock(tmp_path, log=warnings.append).acquire()
    with pytest.raises(runlock.RunLockedError, match=f"pid {os.getpid()}"):
        runlock.RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    with runlock.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert warnings == []

    # a file system without flock: the file's holder decides
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    lock_file = tmp_path / ".lock"
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "started": "2025-01-01T00:00:00+00:00"}
    lock_file.write_text(json.dumps(alive))
    with pytest.raises(runlock.RunLockedError, match=f"pid {os.getppid()}.*does not support file locks"):
        runlock.RunLock(tmp_path).acquire()
    lock_file.write_text(json.dumps({**alive, "host": "elsewhere"}))
    with pytest.raises(runlock.RunLockedError, match="host elsewhere"):
        runlock.RunLock(tmp_path).acquire()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=60)
    lock_file.write_text(json.dumps({**alive, "pid": finished.pid}))
    lock = runlock.RunLock(tmp_path, log=warnings.append).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and f"pid {finished.pid}" in warnings[0] and "not running" in warnings[0]
    lock.release()
    assert not lock_file.exists()


# ---------------------------------------------------------------------- the config, once


def test_a_changed_config_is_refused_and_the_finished_run_stays_intact(finished_run, seq_task, monkeypatch):
    run_dir, results = finished_run
    before = snapshot(run_dir)
    changed = make_cfg(run_dir, steps=9, seed=1, **{"model.num_layers": 2, "optimizer.lr": 0.01})
    with pytest.raises(ConfigError) as error:
        loop.train(changed, task_data=seq_task)
    message = str(error.value)
    assert "model.num_layers: 1 -> 2\n" in message and "optimizer.lr: 0.001 -> 0.01\n" in message
    assert "seed: 0 -> 1\n" in message and "steps:" not in message.split("Only")[0]
    assert "hydra.run.dir=PATH" in message and f"delete {run_dir}" in message
    assert snapshot(run_dir) == before

    evaluate = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location(
        "flaxen_entry_eval", os.path.join(ROOT, "eval.py")))
    spec.loader.exec_module(evaluate)
    monkeypatch.setattr(evaluation_run, "_load_task_data", lambda cfg, run_dir=None: seq_task)
    overrides = [f"run_dir={run_dir}", "split=validation", "eval_batch_size=8"]
    report = evaluate.run(config.compose(overrides, config_name="eval"), overrides)
    best = results["best_eval"]
    assert report["step"] == best["step"]
    assert report["metrics"]["accuracy"] == best["accuracy"] and report["metrics"]["loss"] == best["loss"]


def test_a_safe_change_resumes_and_is_recorded(finished_run, seq_task, tmp_path):
    source, _ = finished_run
    run_dir = tmp_path / "moved"
    shutil.copytree(source, run_dir)
    config_yaml = (run_dir / "config.yaml").read_bytes()
    results = loop.train(make_cfg(run_dir, steps=12, eval_every=6, log_every=3), task_data=seq_task)
    assert results["status"] == "completed" and results["steps"] == 12
    assert (run_dir / "config.yaml").read_bytes() == config_yaml
    first, second = commands(run_dir)
    assert first["start"] == "new" and first["changed"] == {}
    assert second["start"] == "resume" and second["argv"] == sys.argv
    assert second["pid"] == os.getpid() and second["host"] == socket.gethostname()
    assert second["changed"] == {"steps": [8, 12], "eval_every": [4, 6], "log_every": [2, 3],
                                 "run_dir": [str(source), str(run_dir)]}
    train_steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    assert train_steps == [2, 4, 6, 8, 9, 12]
    assert [r["step"] for r in rows(run_dir) if "validation/accuracy" in r] == [4, 8, 12]


# ---------------------------------------------------------------------- checks before the first step


@pytest.mark.parametrize("overrides, data, error, message", [
    ({"eval_split": "validaton"}, {}, ConfigError, "eval_split='validaton': the data has splits train, validation"),
    ({"best_metric": "acuracy"}, {}, ConfigError,
     "best_metric='acuracy': evaluating seq_cls on this data gives loss, num_examples, accuracy, macro_f1"),
    ({"task.num_labels": 3}, {}, ConfigError, "task.num_labels=3: the data has 2 labels (odd, even)"),
    ({}, {"num_validation": 0}, DataError,
     "eval_split: the validation split of data 'quickstart' has no seq_cls examples"),
])
def test_startup_errors_come_before_any_step_or_file(tmp_path, in_memory_task_data, overrides, data, error,
                                                      message):
    run_dir = tmp_path / "run"
    with pytest.raises(error) as raised:
        loop.train(make_cfg(run_dir, **overrides), task_data=in_memory_task_data("seq_cls", **data))
    assert message in str(raised.value)
    assert not run_dir.exists()


def test_metric_names_are_what_evaluation_gives(finished_run, seq_task):
    run_dir, results = finished_run
    cfg = OmegaConf.load(run_dir / "config.yaml")
    scalars = {k for k, v in results["final_eval"].items() if isinstance(v, (int, float))}
    assert set(tasks.get("seq_cls").metric_names(cfg, seq_task)) == scalars


def test_a_nonexistent_data_dir_is_refused_by_name(tmp_path, monkeypatch):
    run_dir, missing = tmp_path / "run", tmp_path / "no_such_data"
    monkeypatch.delenv("FLAXEN_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=f"data_dir='{missing}' does not exist: set data_dir=PATH"):
        loop.train(config.compose(["experiment=quickstart", f"run_dir={run_dir}", f"data_dir={missing}"]))
    monkeypatch.setenv("FLAXEN_DATA_DIR", str(missing))
    with pytest.raises(ConfigError, match=f"data_dir='{missing}' \\(from FLAXEN_DATA_DIR\\) does not exist"):
        loop.train(config.compose(["experiment=quickstart", f"run_dir={run_dir}"]))
    assert not missing.exists() and not run_dir.exists()
    monkeypatch.delenv("FLAXEN_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))  # the default root may be created (generated data lands there)
    config.check_data_dir(config.compose(["experiment=quickstart", f"run_dir={run_dir}"]))


# ---------------------------------------------------------------------- resume trims the logs


class CrashingTaskData:
    """Wraps a TaskData; the train loader raises on batch number `crash_at` (1-based), as a
    process killed between two checkpoints would stop."""

    def __init__(self, task_data, crash_at):
        self.inner, self.crash_at = task_data, crash_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loader(self, split, batch_size, **kwargs):
        inner = self.inner.loader(split, batch_size, **kwargs)
        if split != "train":
            return inner
        crash_at = self.crash_at

        class Loader:
            count = 0

            def __iter__(self):
                return self

            def __next__(self):
                Loader.count += 1
                if Loader.count == crash_at:
                    raise RuntimeError("simulated crash")
                return next(inner)

            def get_state(self):
                return inner.get_state()

            def set_state(self, state):
                inner.set_state(state)

        return Loader()


def masked_crc(data):
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scalars(path):
    """[(tag, step, value)] of an event file, every record's two CRCs verified (TFRecord format)."""
    from tensorboardX.proto import event_pb2

    data, out, offset = open(path, "rb").read(), [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc(header)
        body = data[offset + 12:offset + 12 + length]
        assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == masked_crc(body)
        event = event_pb2.Event.FromString(body)
        out += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
        offset += 16 + length
    return out


def event_files(directory):
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.startswith("events.out")]


def test_a_resume_drops_what_was_logged_after_its_checkpoint(tmp_path, seq_task, finished_run):
    reference_dir, _ = finished_run
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, loggers=["tensorboard"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg, task_data=CrashingTaskData(seq_task, crash_at=7))
    assert [r["step"] for r in rows(run_dir) if "loss" in r] == [2, 4, 6]  # step 6: past the checkpoint at 4
    assert not (run_dir / ".lock").exists()

    results = loop.train(cfg, task_data=seq_task)
    assert results["steps"] == 8
    logged = rows(run_dir)
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in logged if "validation/accuracy" in r] == [4, 8]
    reference = {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(reference_dir) if "loss" in r}
    assert {r["step"]: (r["loss"], r["grad_norm"]) for r in logged if "loss" in r} == reference

    board = run_dir / "tensorboard"
    current = [s for path in event_files(board) for s in scalars(path) if s[0] == "train/loss"]
    assert [step for _, step, _ in current] == [2, 4, 6, 8]
    assert [value for _, _, value in current] == pytest.approx([reference[s][0] for s in (2, 4, 6, 8)], rel=1e-6)
    (old,) = event_files(board / "superseded")
    assert [step for tag, step, _ in scalars(old) if tag == "train/loss"] == [2, 4, 6]
    assert [step for tag, step, _ in scalars(old) if tag == "validation/accuracy"] == [4]


# ---------------------------------------------------------------------- signals


def test_sigint_and_sigterm_exit_130_and_143_after_saving_and_the_rerun_completes(tmp_path, tmp_path_factory,
                                                                                 processes):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    data_dir.mkdir()
    command = [sys.executable, "train.py", *SMALL, "steps=400", "log_every=10", "checkpoint_every=1000",
               "eval_every=0", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    env = train_env(tmp_path_factory)
    stopped_at = []
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run = processes(command, env=env)
        run.wait_for("compiled and ran the first step")
        run.popen.send_signal(sig)
        exit_code, output = run.finish()
        assert exit_code == code, output
        step = int(output.split("stopped at step ")[1].split(";")[0])
        assert os.path.isdir(run_dir / "checkpoints" / str(step)), output
        assert rows(run_dir)[-1]["step"] == step and not (run_dir / "results.json").exists()
        if stopped_at:
            assert f"(step {stopped_at[-1]})" in output and step > stopped_at[-1]
        stopped_at.append(step)

    final = processes(command, env=env)
    exit_code, output = final.finish()
    assert exit_code == 0, output
    assert f"(step {stopped_at[-1]})" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 400
    steps = [r["step"] for r in rows(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 400 and set(stopped_at) <= set(steps)
    assert [(c["start"], c["changed"]) for c in commands(run_dir)] == [("new", {}), ("resume", {}), ("resume", {})]
    scalars_logged = {k for k, v in results["final_eval"].items() if isinstance(v, (int, float))}
    assert set(tasks.get("clm").metric_names(None, None)) == scalars_logged
    assert not (run_dir / ".lock").exists()
    # bitwise the run that was never interrupted
    uninterrupted = tmp_path / "uninterrupted"
    exit_code, output = processes([*command[:-1], f"hydra.run.dir={uninterrupted}"], env=env).finish()
    assert exit_code == 0, output
    resumed_arrays = checkpoint.Checkpointer(str(run_dir / "checkpoints"), read_only=True).restore_arrays(400)
    reference_arrays = checkpoint.Checkpointer(str(uninterrupted / "checkpoints"), read_only=True).restore_arrays(400)
    assert resumed_arrays.keys() == reference_arrays.keys()
    for key, value in reference_arrays.items():
        np.testing.assert_array_equal(np.asarray(resumed_arrays[key]), np.asarray(value), err_msg=".".join(key))


def test_a_config_key_added_later_with_its_default_is_no_change():
    """A run saved before a config key existed resumes under a flaxen that has it (at its default);
    a saved key with another value is still a change."""
    from omegaconf import OmegaConf

    cfg = config.compose(["run_dir=/tmp/unused", "data_dir=/tmp"])
    saved = OmegaConf.create(config.to_container(cfg))
    del saved.task["n_best_size"]
    assert loop._config_changes(saved, cfg) == {}
    saved.task.max_answer_length = 5
    assert loop._config_changes(saved, cfg) == {"task.max_answer_length": (5, 30)}
