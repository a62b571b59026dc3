"""Ahead-of-time memory report: compile flaxen's train step for a target mesh on fake CPU devices.

    python scripts/aot_compile.py '~experiment' model=gpt2_small task=clm data.window_length=1024 \
        batch_size=8 mesh.data=1 mesh.fsdp=8 [devices=8]

The arguments are train.py's (the same Hydra composition, so `~experiment` drops the default
quickstart preset, which would otherwise reshape the model) plus `devices=N`, the number of fake
devices (default: the product of the mesh sizes, an axis of -1 counting 1). Nothing is allocated:
parameters, optimizer state and the batch are ShapeDtypeStructs carrying the shardings the loop
would give them, and `jax.jit(train_step).lower(...).compile()` builds the very step flaxen.loop
runs (flaxen.state.from_config: same shardings, activation constraints, donation, gradient
accumulation). Prints one JSON
line per run: the mesh, the per-device bytes of parameters and optimizer state implied by their
shardings, and XLA's per-device memory analysis (arguments, outputs, aliased = donated buffers
reused for outputs, temporaries, total = arguments + outputs - aliased + temporaries).

Why CPU: a user sees an out-of-memory before renting hardware. Arguments and outputs are exact for
any backend (they follow from shapes and shardings); temporaries come from the CPU compiler's
buffer assignment and fusion, which differ from GPU/TPU (expect the same order of magnitude).
The vocabulary is `model.vocab_size` as configured (a run takes it from its tokenizer);
labelled tasks use `task.num_labels` (default 2).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from flaxen import config as config_lib  # noqa: E402
from flaxen import modeling, sharding, state, tasks  # noqa: E402
from flaxen.errors import ConfigError, FlaxenError  # noqa: E402
from flaxen.state import RNG_IMPL  # noqa: E402


def mesh_devices(mesh_cfg) -> int:
    """Devices of the mesh as written, an axis of -1 counting 1."""
    return math.prod(max(int(mesh_cfg[axis]), 1) for axis in sharding.MESH_AXES)


def use_fake_devices(count: int) -> None:
    """`count` CPU devices for this process; must run before JAX initialises its backend."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def batch_shapes(cfg, task) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one step at the longest row length, as the task's loader shapes it."""
    return {key: jax.ShapeDtypeStruct(shape, dtype)
            for key, (shape, dtype) in task.example_batch(cfg, cfg.batch_size).items()}


def _bytes_per_device(tree, shardings) -> int:
    return int(sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def memory_report(cfg, devices=None) -> dict:
    """Compiles the train step of `cfg` (a composed TrainConfig) for its mesh over `devices`
    (default: all) and returns the report printed by the command line (see the module docstring)."""
    task = tasks.for_run(cfg)  # bound as a run binds it: the same batch fields (e.g. class weights, seq2seq form)
    if cfg.steps is None:  # epochs=N: the step count needs the data and changes nothing compiled
        cfg = copy.deepcopy(cfg)
        cfg.steps = max(int(cfg.schedule.warmup_steps), 1)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    micro_batch = cfg.micro_batch_size or cfg.batch_size
    for key, size in (("batch_size", cfg.batch_size), ("micro_batch_size", micro_batch)):
        if size % sharding.batch_divisor(mesh):
            raise ConfigError(f"{key}={size} is not divisible by the {sharding.batch_divisor(mesh)} batch shards "
                              "of the mesh (data x fsdp)")
    values = {k: v for k, v in dict(cfg.model).items() if k not in ("name", "pretrained")}
    num_labels = int(cfg.task.num_labels or 2)
    spec = modeling.ModelSpec(models.ModelConfig.from_dict(values), task.head, num_labels)
    setup = state.from_config(cfg, spec.build_abstract(), mesh=mesh, abstract=True)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
             for k, v in batch_shapes(cfg, task).items()}
    rng = jax.eval_shape(lambda: jax.random.key(0, impl=RNG_IMPL))
    start = time.perf_counter()
    compiled = setup.train_step.lower(
        setup.params, setup.opt_state, setup.rest, batch,
        jax.ShapeDtypeStruct((), np.int32, sharding=setup.replicated),
        jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=setup.replicated)).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
              "aliased": int(stats.alias_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes)}
    memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    return {
        "model": cfg.model.name, "task": task.name, "devices": int(mesh.size), "mesh": dict(mesh.shape),
        "batch_size": int(cfg.batch_size), "micro_batch_size": int(micro_batch),
        "sequence_length": int(batch["input_ids"].shape[1]), "dtype": cfg.model.dtype, "remat": bool(cfg.model.remat),
        "parameters": modeling.count_parameters(setup.params) + modeling.count_parameters(setup.rest),
        "parameter_bytes_per_device": _bytes_per_device(setup.params, setup.param_shardings)
        + _bytes_per_device(setup.rest, setup.rest_shardings),
        "optimizer_bytes_per_device": _bytes_per_device(setup.opt_state, setup.opt_shardings),
        "memory_per_device": memory, "total_gib_per_device": round(memory["total"] / 2**30, 3),
        "compile_seconds": round(seconds, 1),
    }


def main(argv: list[str]) -> int:
    overrides = [a for a in argv if not a.startswith("devices=")]
    counts = [a.split("=", 1)[1] for a in argv if a.startswith("devices=")]
    try:
        cfg = config_lib.compose(overrides)
        if counts and not counts[-1].isdigit():
            raise ConfigError(f"devices={counts[-1]}: expected a positive number of fake devices")
        count = int(counts[-1]) if counts else mesh_devices(cfg.mesh)
        use_fake_devices(count)
        print(json.dumps(memory_report(cfg)), flush=True)
    except FlaxenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
