"""Runs that cannot be damaged, the storage half: a kill during a save, damaged checkpoint files, a
full disk, a damaged prepared dataset and tokenizer training that must not depend on chance.

References are independent of the code under test: an uninterrupted run's final parameters, the
intact template checkpoint restored before it was damaged, a fresh preparation's records and
sha256 of the files on disk."""
import errno
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import tiny_runs
from flaxen import checkpoint, config, evaluation_run, loop, modeling, tasks
from flaxen.data import DataConfig, TokenizerConfig, builders, load_task_data
from flaxen.errors import CheckpointError, DataError, StorageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(run_dir, **overrides):
    """tests/tiny_runs.py's tiny seq_cls run, checkpointing every 2 steps."""
    return tiny_runs.make_cfg(run_dir, **{"checkpoint_every": 2, **overrides})


def saved_arrays(run_dir, step):
    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    try:
        return {k: np.asarray(v) for k, v in ckpt.restore_arrays(step).items()}
    finally:
        ckpt.close()


def assert_same_arrays(ours, reference):
    assert sorted(ours) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=".".join(key))


@pytest.fixture(scope="module")
def seq_task(in_memory_task_data):
    return in_memory_task_data("seq_cls")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seq_task):
    """An uninterrupted 8-step run."""
    run_dir = tmp_path_factory.mktemp("reference")
    loop.train(make_cfg(run_dir), task_data=seq_task)
    return run_dir


@pytest.fixture(scope="module")
def template(tmp_path_factory, seq_task):
    """A run stopped after step 4 (checkpoints 2 and 4), copied by each test before damaging it."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    stopped = loop.train(make_cfg(run_dir), task_data=seq_task, should_stop=lambda step: step == 4)
    assert stopped == {"status": "interrupted", "steps": 4}
    return run_dir


@pytest.fixture
def run_copy(template, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(template, target)
    return target


def largest_array_file(item_dir):
    """The largest OCDBT data file of an array item (where parameter values are stored)."""
    return max(glob.glob(os.path.join(item_dir, "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def damage(step_dir, kind):
    """Damages a checkpoint step the ways a crash, a bad disk or a user can; returns the file."""
    if kind == "missing commit metadata":
        path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
        os.remove(path)
    elif kind == "missing commit marker":
        path = os.path.join(step_dir, "commit_success.txt")
        os.remove(path)
    elif kind == "missing meta/metadata":
        path = os.path.join(step_dir, "meta", "metadata")
        os.remove(path)
    else:
        path = largest_array_file(os.path.join(step_dir, "params"))
        size = os.path.getsize(path)
        if kind == "truncated array file":
            os.truncate(path, size // 2)
        elif kind == "deleted array file":
            os.remove(path)
        elif kind == "flipped bytes":
            with open(path, "r+b") as f:
                f.seek(size // 2)
                chunk = f.read(8)
                f.seek(size // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))
    return os.path.relpath(path, step_dir)


# ---------------------------------------------------------------- checkpoints

def test_resume_skips_a_damaged_newest_checkpoint_and_matches_an_uninterrupted_run(run_copy, template, reference,
                                                                                   seq_task, capsys):
    name = damage(run_copy / "checkpoints" / "4", "truncated array file")
    results = loop.train(make_cfg(run_copy), task_data=seq_task)
    out = capsys.readouterr().out
    assert results["status"] == "completed" and results["steps"] == 8
    assert f"checkpoint step 4 is corrupt ({name} has" in out and "resumed from" in out
    assert f"{run_copy}/checkpoints/2 (step 2)" in out
    aside = run_copy / "checkpoints.corrupt" / "4"
    assert os.path.getsize(aside / name) < os.path.getsize(template / "checkpoints" / "4" / name)
    assert_same_arrays(saved_arrays(run_copy, 8), saved_arrays(reference, 8))


def test_kill_during_save_leftovers_are_ignored_and_cleared(run_copy, reference, seq_task, capsys):
    """A killed save leaves orbax's temporary directory (never committed) and, at worst, a step
    directory without its commit metadata: neither may be resumed from."""
    checkpoints = run_copy / "checkpoints"
    leftover = checkpoints / "6.orbax-checkpoint-tmp"
    shutil.copytree(checkpoints / "4", leftover)
    damage(checkpoints / "4", "missing commit marker")
    results = loop.train(make_cfg(run_copy), task_data=seq_task)
    out = capsys.readouterr().out
    assert results["steps"] == 8
    assert f"removed {leftover}: an unfinished checkpoint save" in out
    assert "checkpoint step 4 is corrupt (commit_success.txt is missing (the save never committed))" in out
    assert not leftover.exists() and (run_copy / "checkpoints.corrupt" / "4" / "params").is_dir()
    assert not [n for n in os.listdir(checkpoints) if "tmp" in n]
    assert_same_arrays(saved_arrays(run_copy, 8), saved_arrays(reference, 8))


def test_checkpoints_saved_without_checksums_still_resume_exactly(run_copy, reference, seq_task):
    """Steps saved before checksums existed (or killed before they were written) are checked
    structurally, read through and then restored."""
    for path in glob.glob(os.path.join(run_copy, "checkpoints", "*", checkpoint.CHECKSUM_FILE)):
        os.remove(path)
    loop.train(make_cfg(run_copy), task_data=seq_task)
    assert not (run_copy / "checkpoints.corrupt").exists()
    assert_same_arrays(saved_arrays(run_copy, 8), saved_arrays(reference, 8))


@pytest.mark.parametrize("checksums", [True, False])
def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(run_copy, checksums):
    if not checksums:
        for path in glob.glob(os.path.join(run_copy, "checkpoints", "*", checkpoint.CHECKSUM_FILE)):
            os.remove(path)
    spec = modeling.read_spec(str(run_copy))
    spec.config = spec.config.__class__.from_dict({**spec.config.to_dict(), "intermediate_size": 24})
    _, params, rest = nnx.split(spec.build_abstract(), nnx.Param, ...)
    ckpt = checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints"))
    with pytest.raises(CheckpointError, match=rf"checkpoint {run_copy}/checkpoints/4 does not match the model being "
                                              r"restored: parameter backbone\.layers\.0\..* has shape"):
        ckpt.restore_latest_good(params=modeling.abstract_like(params), rest=modeling.abstract_like(rest))
    ckpt.close()
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["2", "4"]
    assert not (run_copy / "checkpoints.corrupt").exists()


@pytest.mark.parametrize("kind", ["truncated array file", "deleted array file", "flipped bytes",
                                  "missing meta/metadata", "missing commit metadata", "missing commit marker"])
def test_each_kind_of_damage_is_named_moved_aside_and_the_previous_step_restored(run_copy, template, kind):
    expected = saved_arrays(template, 2)
    name = damage(run_copy / "checkpoints" / "4", kind)
    spec = modeling.read_spec(str(run_copy))
    _, params, rest = nnx.split(spec.build_abstract(), nnx.Param, ...)
    ckpt = checkpoint.Checkpointer(os.path.join(run_copy, "checkpoints"))
    messages = []
    step, restored = ckpt.restore_latest_good(params=modeling.abstract_like(params),
                                              rest=modeling.abstract_like(rest), log=messages.append)
    ckpt.close()
    assert step == 2 and restored["meta"]["step"] == 2
    assert len(messages) == 1 and messages[0].startswith("checkpoint step 4 is corrupt (")
    assert name in messages[0]
    assert ckpt.all_steps() == [2] and sorted(os.listdir(run_copy / "checkpoints.corrupt")) == ["4"]
    arrays = {checkpoint.variable_path(p): np.asarray(v)
              for p, v in jax.tree_util.tree_leaves_with_path(restored["params"])}
    assert_same_arrays(arrays, {k: v for k, v in expected.items() if k in arrays})


def test_all_checkpoints_damaged_is_one_error_naming_each_step(run_copy, seq_task):
    damage(run_copy / "checkpoints" / "4", "flipped bytes")
    damage(run_copy / "checkpoints" / "2", "missing meta/metadata")
    with pytest.raises(CheckpointError) as raised:
        loop.train(make_cfg(run_copy), task_data=seq_task)
    message = str(raised.value)
    assert message.startswith(f"no usable checkpoint in {run_copy}/checkpoints: step 4: ")
    assert "sha256 mismatch" in message and "step 2: meta/metadata is missing" in message
    assert sorted(os.listdir(run_copy / "checkpoints.corrupt")) == ["2", "4"]


def test_eval_and_init_from_name_a_damaged_checkpoint_and_move_nothing(run_copy, seq_task, tmp_path, monkeypatch):
    name = damage(run_copy / "checkpoints" / "4", "deleted array file")
    before = sorted(os.listdir(run_copy / "checkpoints"))
    monkeypatch.setattr(evaluation_run, "_load_task_data", lambda cfg, run_dir=None: seq_task)
    for overrides, best in (([f"run_dir={run_copy}", "step=4"], ""),
                            ([f"run_dir={run_copy}"], "the best step of the run, ")):
        with pytest.raises(CheckpointError) as raised:
            evaluation_run.evaluate_from_config(config.compose(overrides, config_name="eval"), overrides)
        assert str(raised.value) == (f"{best}checkpoint {run_copy}/checkpoints/4, is corrupt: {name} is missing. "
                                     "Evaluate another step with step=N (saved steps: 2)")

    with pytest.raises(CheckpointError) as raised:
        loop.train(make_cfg(tmp_path / "finetune", init_from=str(run_copy)), task_data=seq_task)
    message = str(raised.value)
    assert message == (f"init_from={run_copy}: its best step, checkpoint {run_copy}/checkpoints/4, is corrupt: {name} "
                       f"is missing. Start from another step with init_from={run_copy}/checkpoints/N (saved steps: 2)")
    assert sorted(os.listdir(run_copy / "checkpoints")) == before
    assert not (run_copy / "checkpoints.corrupt").exists()


def _fail_writes_after(monkeypatch, saves_allowed):
    """Every orbax file write after `saves_allowed` checkpoint saves raises OSError(ENOSPC)."""
    from etils import epath

    count = {"saves": 0}
    original_save = checkpoint.Checkpointer.save

    def counting_save(self, *args, **kwargs):
        count["saves"] += 1
        return original_save(self, *args, **kwargs)

    def full(path_self, *args, **kwargs):
        if count["saves"] > saves_allowed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path_self))
        return original_write(path_self, *args, **kwargs)

    original_write = epath.Path.write_text
    monkeypatch.setattr(checkpoint.Checkpointer, "save", counting_save)
    monkeypatch.setattr(type(epath.Path("/")), "write_text", full)


def test_disk_full_during_a_save_names_path_and_cause_and_keeps_the_last_checkpoint(tmp_path, seq_task, monkeypatch):
    run_dir = tmp_path / "run"
    _fail_writes_after(monkeypatch, saves_allowed=1)
    with pytest.raises(StorageError) as raised:
        loop.train(make_cfg(run_dir, checkpoint_every=4, eval_every=4), task_data=seq_task)
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint step 8 to {run_dir}/checkpoints: ENOSPC (No space left on "
                              "device)")
    assert f"The last good checkpoint is {run_dir}/checkpoints/4" in message
    monkeypatch.undo()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["4"]
    assert checkpoint.Checkpointer(str(run_dir / "checkpoints"), read_only=True).verify(4) is None
    assert saved_arrays(run_dir, 4)


def test_write_json_on_a_read_only_file_system_keeps_the_old_file(tmp_path, monkeypatch):
    from flaxen import logging as run_logging

    path = tmp_path / "results.json"
    run_logging.write_json(str(path), {"a": 1})

    def read_only(source, target):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), target)

    monkeypatch.setattr(run_logging.os, "replace", read_only)
    with pytest.raises(StorageError, match=rf"^could not write {path}: EROFS \(Read-only file system\)$"):
        run_logging.write_json(str(path), {"a": 2})
    monkeypatch.undo()
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["results.json"]


def test_the_command_history_and_tokenizer_writes_name_path_and_cause(tmp_path, monkeypatch):
    from flaxen import logging as run_logging

    missing = tmp_path / "gone" / "commands.jsonl"
    with pytest.raises(StorageError, match=rf"^could not write {missing}: ENOENT"):
        run_logging.append_jsonl(str(missing), {"start": "new"})

    class FullDisk:
        def save(self, directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(directory, "tokenizer.json"))

    with pytest.raises(StorageError, match=r"could not write .*tokenizer: ENOSPC \(No space left on device\)"):
        modeling.write_tokenizer(str(tmp_path), FullDisk())
    assert os.listdir(tmp_path) == []


def test_metrics_write_on_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    from flaxen import logging as run_logging

    writer = run_logging.MetricsWriter(str(tmp_path), loggers=[])
    writer.write(1, {"loss": 1.0})

    class FullFile:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def tell(self):
            return self.file.tell()

        def write(self, text):
            self.file.write(text[:7])
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_logging, "open", FullFile, raising=False)
    with pytest.raises(StorageError, match=rf"could not write the metrics of step 2 to {tmp_path}/metrics.jsonl: "
                                           r"ENOSPC \(No space left on device\)"):
        writer.write(2, {"loss": 0.5})
    monkeypatch.undo()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "loss": 1.0}]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_really_full_disk_during_a_save(tmp_path, tiny_tmpfs, seq_task):
    """The checkpoint directory lives on a tiny tmpfs, filled up after the first save."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(tiny_tmpfs, run_dir / "checkpoints")

    def fill_after_first_save(step):
        if step == 5:
            with open(tiny_tmpfs / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
        return False

    with pytest.raises(StorageError) as raised:
        loop.train(make_cfg(run_dir, checkpoint_every=4, eval_every=4), task_data=seq_task,
                   should_stop=fill_after_first_save)
    assert "could not write checkpoint step 8 to " in str(raised.value) and "ENOSPC" in str(raised.value)
    os.remove(tiny_tmpfs / "filler")
    assert sorted(os.listdir(tiny_tmpfs)) == ["4"]
    assert checkpoint.Checkpointer(str(run_dir / "checkpoints"), read_only=True).verify(4) is None
    assert saved_arrays(run_dir, 4)


# ---------------------------------------------------------------- prepared data

def tsv_config(tmp_path, **kw):
    return DataConfig(name="tiny", source="delimited", splits={"train": "train.tsv"}, format="tsv",
                      text_columns=["sentence"], label_column="label", tokenizer=TokenizerConfig(kind="word"),
                      prepared_dir=str(tmp_path / "prepared"), **kw)


def write_tsv(tmp_path, rows=300):
    lines = ["sentence\tlabel"] + [f"sentence number {i} is {'good' if i % 3 else 'bad'} \t{i % 2}"
                                   for i in range(rows)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return [f"sentence number {i} is {'good' if i % 3 else 'bad'} " for i in range(rows)]


def load(tmp_path, **kw):
    return load_task_data(tsv_config(tmp_path, **kw), tasks.get("seq_cls"), str(tmp_path))


def record_file(prepared_path):
    (name,) = [n for n in os.listdir(prepared_path) if "-train.array_record" in n]
    return os.path.join(prepared_path, name)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_prepared_data_records_checksums_and_a_damaged_file_is_named_and_rebuilt(tmp_path, capsys):
    texts = write_tsv(tmp_path)
    first = load(tmp_path)
    path = record_file(first.prepared.path)
    recorded = json.load(open(os.path.join(first.prepared.path, builders.CHECKSUM_FILE)))
    assert recorded["algorithm"] == "sha256"
    assert recorded["files"][os.path.basename(path)] == {"bytes": os.path.getsize(path), "sha256": sha256(path)}

    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xde\xad\xbe\xef")
    assert os.path.getsize(path) == size
    again = load(tmp_path)
    out = capsys.readouterr().out
    assert f"prepared data file {path} is corrupt (its sha256 differs" in out
    assert again.prepared.path == first.prepared.path
    assert [r["text"] for r in again.records("train")] == texts
    config_dir = os.path.dirname(first.prepared.path)
    (kept,) = glob.glob(config_dir + ".corrupt-*")
    damaged = os.path.join(kept, os.path.relpath(path, config_dir))
    assert os.path.getsize(damaged) == size and sha256(damaged) != sha256(path)

    os.truncate(path, size // 2)
    load(tmp_path)
    assert f"prepared data file {path} is corrupt ({size // 2:,} bytes where {size:,} were written (truncated))" \
        in capsys.readouterr().out


def flip_bytes(path, offset=1000):
    """Inverts 4 bytes inside the first records (array_record pads its chunks with zeros that no
    hash covers)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        chunk = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_data_prepared_without_checksums_still_opens_and_gets_them(tmp_path, capsys):
    texts = write_tsv(tmp_path)
    first = load(tmp_path)
    checksums = os.path.join(first.prepared.path, builders.CHECKSUM_FILE)
    recorded = open(checksums).read()
    os.remove(checksums)
    stamp = os.stat(record_file(first.prepared.path)).st_mtime_ns
    capsys.readouterr()
    again = load(tmp_path)
    assert [r["text"] for r in again.records("train")] == texts
    assert open(checksums).read() == recorded
    assert os.stat(record_file(first.prepared.path)).st_mtime_ns == stamp and "preparing" not in capsys.readouterr().out

    os.remove(checksums)  # damaged before it had checksums: riegeli's own chunk hashes find it
    path = record_file(first.prepared.path)
    flip_bytes(path)
    again = load(tmp_path)
    assert (f"prepared data file {path} is corrupt (unreadable: Corrupted Riegeli/records file: chunk"
            in capsys.readouterr().out)
    assert [r["text"] for r in again.records("train")] == texts


def test_a_damaged_file_of_large_data_is_named_when_reading_fails(tmp_path, monkeypatch):
    """Above HASH_ALWAYS_BYTES only sizes are compared when opening; the failed read names the file."""
    texts = write_tsv(tmp_path)
    path = record_file(load(tmp_path).prepared.path)
    flip_bytes(path)
    monkeypatch.setattr(builders, "HASH_ALWAYS_BYTES", 0)
    config_dir = os.path.dirname(os.path.dirname(path))
    with pytest.raises(DataError) as raised:
        load(tmp_path)  # opens (sizes agree), then reads the train records, which fails
    message = str(raised.value)
    assert message.startswith("reading split 'train' failed (RuntimeError: Corrupted Riegeli/records file: chunk")
    assert f"prepared data file {path} is corrupt (its sha256 differs" in message
    (kept,) = glob.glob(config_dir + ".corrupt-*")
    assert f"Moved {config_dir} to {kept} (kept for inspection); run the same command again" in message
    assert [r["text"] for r in load(tmp_path).records("train")] == texts


def test_damaged_read_only_prepared_data_says_how_to_rebuild(tmp_path):
    write_tsv(tmp_path)
    first = load(tmp_path)
    path = record_file(first.prepared.path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xde\xad\xbe\xef")
    config_dir = os.path.dirname(first.prepared.path)
    parent = os.path.dirname(config_dir)
    os.chmod(parent, 0o555)
    try:
        with pytest.raises(DataError) as raised:
            load(tmp_path)
    finally:
        os.chmod(parent, 0o755)
    message = str(raised.value)
    assert f"prepared data file {path} is corrupt (its sha256 differs" in message
    assert f"mv '{config_dir}' '{config_dir}.corrupt-" in message and "data.prepared_dir=" in message
    assert os.path.isdir(config_dir) and not glob.glob(config_dir + ".corrupt-*")


# ---------------------------------------------------------------- tokenizer training

TRAIN_SCRIPT = """
import os, random, sys
from flaxen.data import tokenizers
rng = random.Random(0)
letters = "abcdefghijklmnopqrstuvwxyz"
words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(600)]
texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)]
for kind, size in (("wordpiece", 700), ("bpe", 600)):
    tokenizers.train_tokenizer(kind, texts, vocab_size=size, min_frequency=2).save(os.path.join(sys.argv[1], kind))
"""


def test_tokenizer_training_is_deterministic_across_processes(tmp_path):
    """Three trainings in separate processes (the trainer's hash seeds and thread pools are per
    process) give byte-identical tokenizer files, WordPiece (which differed from run to run on
    this corpus before) and byte-level BPE."""
    script = tmp_path / "train_tokenizers.py"
    script.write_text(TRAIN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outputs = [tmp_path / f"run{i}" for i in range(3)]
    processes = [subprocess.Popen([sys.executable, str(script), str(out)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                                  text=True) for out in outputs]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    for kind in ("wordpiece", "bpe"):
        files = [(out / kind / "tokenizer.json").read_bytes() for out in outputs]
        assert files[0] == files[1] == files[2], kind
        vocab = json.loads(files[0])["model"]["vocab"]
        assert 300 < len(vocab) <= 700
    saved = json.loads((outputs[0] / "wordpiece" / "tokenizer.json").read_bytes())
    added = [token["content"] for token in saved["added_tokens"]]
    assert added == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
