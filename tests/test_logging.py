"""What a run logs, read back as a researcher reads it: the TensorBoard event files through
TensorBoard's own event reader (tensorboard's EventAccumulator) hold exactly the scalars of
metrics.jsonl, each at its step (train rows under train/<key>, evaluations under <split>/<key>)."""
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra has it
from tiny_runs import make_cfg

from flaxen import loop


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, in_memory_task_data):
    """6 steps of a tiny classifier, a log row every step, an evaluation every 3, TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("logged")
    cfg = make_cfg(run_dir, steps=6, log_every=1, eval_every=3, checkpoint_every=0, loggers=["tensorboard"])
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
