"""The tiny training config that the loop, logging, PEFT and fault-injection tests share: a 1-layer,
16-wide BERT on the in-memory data of tests/conftest.py, 8 steps of 8 rows by default."""
from omegaconf import OmegaConf

from flaxen import config

TINY = dict(family="bert", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout=0.1, attention_dropout=0.1, name="tiny")


def make_cfg(run_dir, task="seq_cls", data_dir=None, **overrides):
    """A TrainConfig for `task` writing to `run_dir` (data_dir: `run_dir` unless given); keyword
    overrides replace the defaults below (dotted keys through OmegaConf.update)."""
    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.model = OmegaConf.merge(cfg.model, TINY)
    cfg.data.max_length, cfg.data.bucket_lengths, cfg.data.window_length = 16, [16], 16
    cfg.task.name = task
    cfg.run_dir, cfg.data_dir = str(run_dir), str(run_dir if data_dir is None else data_dir)
    settings = {"steps": 8, "batch_size": 8, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
                "eval_batch_size": 8, "keep_checkpoints": 5, "progress_bar": False, "loggers": [],
                "schedule.warmup_steps": 2}
    settings.update(overrides)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg
