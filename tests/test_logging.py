"""What a run logs, read back as a researcher reads it: the TensorBoard event files through
TensorBoard's own event reader (tensorboard's EventAccumulator) hold exactly the scalars of
metrics.jsonl, each at its step (train rows under train/<key>, evaluations under <split>/<key>)."""
import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra has it

from flaxen import config, loop

TINY = {"family": "bert", "vocab_size": 50, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0, "name": "tiny"}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, in_memory_task_data):
    """6 steps of a tiny classifier, a log row every step, an evaluation every 3, TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("logged")
    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.model = OmegaConf.merge(cfg.model, TINY)
    cfg.data.max_length, cfg.data.bucket_lengths = 16, [16]
    cfg.task.name = "seq_cls"
    cfg.run_dir, cfg.data_dir = str(run_dir), str(run_dir)
    settings = {"steps": 6, "batch_size": 8, "eval_batch_size": 8, "log_every": 1, "eval_every": 3,
                "checkpoint_every": 0, "progress_bar": False, "loggers": ["tensorboard"]}
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    loop.train(cfg, task_data=in_memory_task_data("seq_cls"))
    return run_dir


def test_tensorboard_scalars_equal_metrics_jsonl(logged_run):
    expected = {}
    for line in open(logged_run / "metrics.jsonl"):
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = key if "/" in key else f"train/{key}"
                expected.setdefault(tag, []).append((row["step"], value))
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "validation/loss", "validation/accuracy"} <= set(expected)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in expected["validation/accuracy"]] == [3, 6]

    events = EventAccumulator(str(logged_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        read = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in read] == [step for step, _ in points], tag
        # event files store scalars as float32: the JSON value rounded to float32, exactly
        assert [np.float32(value) for _, value in read] == [np.float32(value) for _, value in points], tag
