"""Shared definitions of the multi-device tests (tests/test_sharding_mesh.py and the processes it starts).

Two tiny models (2 layers, 32 wide, 4 heads, vocabulary 64) train for 10 steps on conftest's
in-memory data through flaxen.loop: a BERT tagger (token_cls, with dropout, so the dropout masks
must not depend on the mesh either) and a GPT causal LM (clm), both with AdamW; the GPT again with
plain SGD (`gpt_clm_sgd`: no momentum, no clipping, no weight decay), where each update is the
learning rate times the gradient, so a gradient of the wrong scale (summed instead of averaged
over the batch shards) moves the parameters by that factor (Adam's update is nearly invariant to
the gradient's scale, and clipping would hide it). The meshes are the presets of configs/mesh/ at
their sizes on 8 devices: dp (data=8), fsdp (fsdp=8), dp_tp (data=4 x tensor=2) and dp_fsdp_tp
(data=2 x fsdp=2 x tensor=2).

The two-process run (`quickstart_cfg`) trains the GPT on flaxen's generated quickstart language
through the real data pipeline (flaxen.data's per-process grain loader), not in-memory data.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from omegaconf import OmegaConf

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from conftest import InMemoryTaskData  # noqa: E402

STEPS = 10
BATCH = 16
SEQ = 16
COMMON = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position_embeddings=SEQ, layer_norm_eps=1e-5)
GPT = dict(COMMON, family="gpt2", hidden_dropout=0.0, attention_dropout=0.0, name="tiny_gpt")
ADAMW = {"lr": 3e-3}
# plain SGD: lr 0.5 lowers the tiny GPT's loss within the 10 steps
PLAIN_SGD = {"name": "sgd", "lr": 0.5, "momentum": 0.0, "clip_norm": 0.0, "weight_decay": 0.0}
CASES = {  # name -> (task, model, optimizer settings)
    "bert_token_cls": ("token_cls", dict(COMMON, family="bert", hidden_dropout=0.1, attention_dropout=0.1,
                                         name="tiny_bert"), ADAMW),
    "gpt_clm": ("clm", GPT, ADAMW),
    "gpt_clm_sgd": ("clm", GPT, PLAIN_SGD),
}
MESHES = ("dp", "fsdp", "dp_tp", "dp_fsdp_tp")
MESH_SHAPES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "dp_tp": (4, 1, 2), "dp_fsdp_tp": (2, 2, 2)}


def mesh_preset(name: str):
    return OmegaConf.load(os.path.join(ROOT, "configs", "mesh", f"{name}.yaml"))


def task_data(case: str) -> InMemoryTaskData:
    task, model, _ = CASES[case]
    return InMemoryTaskData(task, vocab_size=model["vocab_size"], seq_len=SEQ, num_train=64, num_validation=16)


def make_cfg(run_dir: str, case: str, mesh: str | None = None, **overrides):
    """The TrainConfig of `case`: 10 steps of batch 16, a loss logged every step, one checkpoint at the end."""
    from flaxen import config

    task, model, optimizer = CASES[case]
    cfg = OmegaConf.structured(config.TrainConfig)
    cfg.model = OmegaConf.merge(cfg.model, model)
    cfg.data.max_length, cfg.data.bucket_lengths, cfg.data.window_length = SEQ, [SEQ], SEQ
    cfg.task.name = task
    cfg.run_dir, cfg.data_dir = str(run_dir), str(run_dir)
    for key, value in optimizer.items():
        OmegaConf.update(cfg.optimizer, key, value, merge=False)
    settings = dict(steps=STEPS, batch_size=BATCH, log_every=1, eval_every=0, eval_split=None, checkpoint_every=0,
                    keep_checkpoints=1, progress_bar=False, loggers=[])
    settings.update(overrides)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    if mesh is not None:
        cfg.mesh = OmegaConf.merge(cfg.mesh, mesh_preset(mesh))
    return cfg


# the two-process run's data: the quickstart preset, small (about 2,000 train tokens: 16-token windows)
QUICKSTART_SENTENCES = {"num_train": 200, "num_validation": 16}


def quickstart_cfg(run_dir: str, data_dir: str, mesh: str | None = None):
    """The GPT case on the quickstart language read by flaxen.data from `data_dir` (prepared there
    on first use): the loop builds the per-process loader itself (no task_data)."""
    cfg = make_cfg(run_dir, "gpt_clm", mesh)
    cfg.data_dir = str(data_dir)
    for key, value in QUICKSTART_SENTENCES.items():
        OmegaConf.update(cfg.data.synthetic, key, value, merge=False)
    return cfg


def step_values(run_dir: str, key: str = "loss") -> list[float]:
    """Per-step `key` of metrics.jsonl (log_every=1: the loss and grad_norm of every step)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    values = {row["step"]: row[key] for row in rows if key in row}
    return [values[step] for step in range(1, STEPS + 1)]


def step_losses(run_dir: str) -> list[float]:
    return step_values(run_dir, "loss")


def final_arrays(run_dir: str, items=("params",)) -> dict[str, np.ndarray]:
    """The arrays of the run's last checkpoint (restored without a target, so on the topology that
    wrote it), keyed 'item/path'."""
    from flaxen import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    step = ckpt.latest_step()
    out = {}
    for item in items:
        for path, value in ckpt.restore_arrays(step, items=(item,)).items():
            out[item + "/" + "/".join(path)] = np.asarray(value)
    ckpt.close()
    return out


def restore_checkpoint(run_dir: str, cfg, mesh, rules: dict) -> tuple[dict, dict]:
    """A run's last checkpoint (parameters and optimizer state) restored with the shardings that
    `mesh` and `rules` give them: ({'params': ..., 'opt_state': ...}, the same with the target shardings)."""
    import jax
    from flax import nnx

    from flaxen import checkpoint, modeling, optim, sharding

    abstract = modeling.read_spec(run_dir).build_abstract()
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    schedule = optim.make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, schedule, optim.decay_mask(abstract, params))
    param_shardings = sharding.state_shardings(mesh, params, rules)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = sharding.optimizer_state_shardings(mesh, opt_state, params, param_shardings)
    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    restored = ckpt.restore(ckpt.latest_step(), params=modeling.abstract_like(params, param_shardings),
                            opt_state=modeling.abstract_like(opt_state, opt_shardings), meta=False, data=False)
    ckpt.close()
    return restored, {"params": param_shardings, "opt_state": opt_shardings}
