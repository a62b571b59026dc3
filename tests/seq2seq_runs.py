"""The tiny sequence-to-sequence run that tests/test_task_seq2seq.py and tests/test_generate_cli.py
share: a 1 + 1 layer, 32-wide T5 trained for 3 steps on the first 160 pairs of Multi30k (English ->
German) with a 300-id T5-style vocabulary; validation is the first 20 pairs of val. Trained once per
test session (its directory lives under the session's base temporary directory)."""
import os

import pytest

from flaxen import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("FLAXEN_DATA_DIR")
T5_TINY = ["model=t5_tiny", "model.num_layers=1", "model.num_decoder_layers=1", "model.hidden_size=32",
           "model.num_heads=2", "model.d_kv=16", "model.intermediate_size=64"]
GPT_TINY = ["model=gpt_nano", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=96"]
PAIRS = {"train": 160, "val": 20}


def data_dir(base) -> str:
    """<base>/data/m30k/{train,val}.{en,de}: slices of Multi30k."""
    if not DATA_DIR or not os.path.isdir(os.path.join(DATA_DIR, "multi30k")):
        pytest.skip("FLAXEN_DATA_DIR with multi30k/ is not available")
    folder = os.path.join(base, "data", "m30k")
    os.makedirs(folder, exist_ok=True)
    for split, count in PAIRS.items():
        for language in ("en", "de"):
            path = os.path.join(folder, f"{split}.{language}")
            if not os.path.isfile(path):
                with open(os.path.join(DATA_DIR, "multi30k", f"{split}.{language}"), encoding="utf-8") as f:
                    lines = f.readlines()[:count]
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(lines)
    return os.path.join(base, "data")


def overrides(base, run_dir, *extra) -> list[str]:
    """A seq2seq TrainConfig's overrides on the sliced data (T5 unless `extra` picks a model)."""
    model = [] if any(e.startswith("model=") for e in extra) else T5_TINY
    return model + ["task=seq2seq", "data=multi30k", "data.splits.validation=m30k/val",
                    "data.splits.train=m30k/train", "~data.splits.test", "data.name=m30k_slice",
                    "data.tokenizer.vocab_size=300", "data.max_length=32", "data.max_target_length=32",
                    "data.bucket_lengths=[16,32]", f"data_dir={data_dir(base)}",
                    f"data.prepared_dir={os.path.join(base, 'prepared')}", f"run_dir={run_dir}", "steps=3",
                    "batch_size=8", "eval_batch_size=8", "eval_every=0", "checkpoint_every=3", "log_every=1",
                    "progress_bar=false", "loggers=[]", "schedule.warmup_steps=1", "optimizer.lr=1e-2",
                    "task.generation.max_new_tokens=6", "task.generation.during_training=false",
                    *extra]


def entry(name):
    """The module of the root script `name`.py (train, eval, generate)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"flaxen_entry_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(base, name, *extra) -> str:
    """Trains (once per session, through train.py's `run`) the run `name` under `base`; returns its
    directory."""
    run_dir = os.path.join(base, name)
    if not os.path.isfile(os.path.join(run_dir, "results.json")):
        results = entry("train").run(config.compose(overrides(base, run_dir, *extra)))
        assert results["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp() / "seq2seq")
    return {"base": base, "run_dir": train(base, "t5")}
