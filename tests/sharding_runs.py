"""The runs behind tests/test_sharding_mesh.py, in processes of their own.

    XLA_FLAGS="--xla_force_host_platform_device_count=8 ..." python tests/sharding_runs.py PART OUT_DIR

The device count must be set before JAX starts, hence separate processes (the test starts the
three parts side by side). PART:
- `bert` (8 devices): the BERT case on every mesh preset; the sharding of every parameter and
  optimizer leaf as the loop's functions place them (spec, shape, logical names), the bytes each
  device holds, and the shardings of one train step's outputs; the cross-mesh restore (the fsdp=8
  checkpoint onto fsdp=8 and onto data=2 x tensor=4); a LoRA model's train step on data=4 x
  tensor=2 and on one device (`lora`).
- `gpt` (8 devices): the GPT case with AdamW and with plain SGD on every mesh preset;
  scripts/aot_compile.py's memory reports of a small GPT for fsdp = 1, 2, 4, 8.
- `reference` (1 device): every case on a single device, and the GPT on the quickstart language
  read through flaxen.data (the reference of the two-process run; its data is prepared under
  OUT_DIR/data, where the two processes find it).
Writes OUT_DIR/PART.json (per run: mesh shape, per-step losses and gradient norms; the rest as
above), OUT_DIR/<case>_<mesh>.npz (final parameters of each run, from its checkpoint) and the run
directories under OUT_DIR/runs/.
"""
from __future__ import annotations

import json
import os
import sys
import time

import sharding_cases as cases  # noqa: E402  (puts the repository on sys.path)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from flaxen import loop, modeling, optim, sharding, state, steps  # noqa: E402
from flaxen.config import OptimizerConfig  # noqa: E402


def spec_list(spec: PartitionSpec, ndim: int) -> list:
    entries = list(spec) + [None] * (ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def train_state(cfg, model):
    """params, opt_state, rest and their shardings, placed as flaxen.loop places them."""
    mesh = sharding.make_mesh(cfg.mesh)
    rules = dict(cfg.mesh.logical_axis_rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = optim.make_schedule(cfg.schedule, cfg.optimizer.lr, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, schedule, optim.decay_mask(model, params))
    param_shardings = sharding.state_shardings(mesh, params, rules)
    rest_shardings = sharding.state_shardings(mesh, rest, rules)
    # from host copies: the train step donates its inputs, and the model is reused for the next mesh
    params = jax.device_put(jax.tree.map(np.asarray, params), param_shardings)
    rest = jax.device_put(jax.tree.map(np.asarray, rest), rest_shardings)
    opt_shardings = sharding.optimizer_state_shardings(mesh, jax.eval_shape(optimizer.init, params), params,
                                                       param_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return dict(mesh=mesh, rules=rules, graphdef=graphdef, params=params, rest=rest, opt_state=opt_state,
                optimizer=optimizer, schedule=schedule, param_shardings=param_shardings,
                rest_shardings=rest_shardings, opt_shardings=opt_shardings)


def describe_shardings(state) -> dict:
    """Every parameter's logical names, shape and spec; every optimizer leaf's spec; bytes per device."""
    logical = {jax.tree_util.keystr(p): tuple(s) for p, s in jax.tree_util.tree_leaves_with_path(
        nnx.get_partition_spec(state["params"]), is_leaf=lambda x: isinstance(x, PartitionSpec))}
    params = {}
    for path, array in jax.tree_util.tree_leaves_with_path(state["params"]):
        key = jax.tree_util.keystr(path)
        params[key] = {"logical": list(logical[key]), "shape": list(array.shape),
                       "spec": spec_list(array.sharding.spec, array.ndim)}
    optimizer = {}
    for path, array in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        optimizer[jax.tree_util.keystr(path)] = {"shape": list(array.shape),
                                                 "spec": spec_list(array.sharding.spec, array.ndim)}
    per_device = {d.id: 0 for d in jax.devices()}
    total = 0
    for array in jax.tree.leaves((state["params"], state["opt_state"])):
        total += array.nbytes
        for shard in array.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return {"params": params, "opt_state": optimizer, "bytes_per_device": list(per_device.values()),
            "total_bytes": int(total)}


def step_output_specs(cfg, task_data, state) -> dict:
    """One train step on the placed state: the specs of its output parameters and optimizer state."""
    batch_sharding, replicated = sharding.batch_sharding(state["mesh"]), sharding.replicated(state["mesh"])
    train_step = steps.make_train_step(
        state["graphdef"], cfg.task.name, state["optimizer"], schedule=state["schedule"],
        param_shardings=state["param_shardings"], opt_shardings=state["opt_shardings"],
        rest_shardings=state["rest_shardings"], batch_sharding=batch_sharding, replicated=replicated,
        activation_sharding=sharding.activation_sharding(state["mesh"], state["rules"]))
    batch = next(task_data.loader("train", cfg.batch_size, seed=cfg.seed, train=True))
    params, opt_state, _ = train_step(state["params"], state["opt_state"], state["rest"],
                                      sharding.put_batch(batch, batch_sharding), np.int32(0),
                                      jax.random.key(0, impl=loop.RNG_IMPL))
    return {"params": {jax.tree_util.keystr(p): spec_list(a.sharding.spec, a.ndim)
                       for p, a in jax.tree_util.tree_leaves_with_path(params)},
            "opt_state": {jax.tree_util.keystr(p): spec_list(a.sharding.spec, a.ndim)
                          for p, a in jax.tree_util.tree_leaves_with_path(opt_state)}}


def restore_onto(run_dir: str, cfg, mesh_cfg) -> tuple[dict, dict]:
    """The run's last checkpoint restored with the shardings of `mesh_cfg`: ({path: array}, {path: spec})."""
    mesh = sharding.make_mesh(mesh_cfg)
    restored, expected = cases.restore_checkpoint(run_dir, cfg, mesh, dict(mesh_cfg.logical_axis_rules))
    arrays, specs = {}, {}
    for item in ("params", "opt_state"):
        for (path, array), target in zip(jax.tree_util.tree_leaves_with_path(restored[item]),
                                         jax.tree.leaves(expected[item])):
            key = f"{item}/{jax.tree_util.keystr(path)}"
            assert array.sharding.is_equivalent_to(target, array.ndim), (key, array.sharding, target)
            arrays[key] = np.asarray(array)
            specs[key] = spec_list(array.sharding.spec, array.ndim)
    return arrays, specs


AOT_MODEL = ["~experiment", "model=gpt_nano", "task=clm", "model.vocab_size=256", "model.hidden_size=64",
             "model.intermediate_size=256", "model.num_layers=2", "model.max_position_embeddings=32",
             "data.window_length=32", "batch_size=16", "mesh.data=1"]


def aot_reports() -> list[dict]:
    """scripts/aot_compile.py's report of a small GPT on the first 1, 2, 4 and 8 devices as fsdp."""
    sys.path.insert(0, os.path.join(cases.ROOT, "scripts"))
    import aot_compile

    from flaxen import config

    reports = []
    for fsdp in (1, 2, 4, 8):
        cfg = config.compose(AOT_MODEL + [f"mesh.fsdp={fsdp}"])
        reports.append(aot_compile.memory_report(cfg, jax.devices()[:fsdp]))
    return reports


def enable_cache(out_dir: str) -> None:
    """A persistent compilation cache of this process: the model's initialisation compiles once per case."""
    jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, f"xla_cache_{os.getpid()}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_case(out_dir: str, case: str, mesh: str | None, results: dict) -> str:
    """flaxen.loop on `case` and `mesh` (None: the single-device reference) -> results[name]."""
    name = f"{case}_{mesh or 'single'}"
    tick = time.perf_counter()
    run_dir = os.path.join(out_dir, "runs", name)
    cfg = cases.make_cfg(run_dir, case, mesh)
    loop.train(cfg, task_data=cases.task_data(case))
    record_run(out_dir, name, cfg, run_dir, results)
    results["seconds"][name] = round(time.perf_counter() - tick, 1)
    return run_dir


def record_run(out_dir: str, name: str, cfg, run_dir: str, results: dict) -> None:
    """A finished run's mesh shape, per-step loss and gradient norm, and final parameters (npz)."""
    results["runs"][name] = {"mesh": dict(sharding.make_mesh(cfg.mesh).shape), "losses": cases.step_losses(run_dir),
                             "grad_norms": cases.step_values(run_dir, "grad_norm")}
    np.savez(os.path.join(out_dir, f"{name}.npz"), **cases.final_arrays(run_dir))


LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["attention.*", "intermediate", "output"]}


def lora_steps(out_dir: str) -> dict:
    """One train step (flaxen.state, as the loop builds it; plain SGD, dropout on) of the BERT
    tagger with LoRA on every projection, on data=4 x tensor=2 and on one device: the placed specs
    and logical names of the trainable parameters, the step's loss and gradient norm, and the
    updated trainable parameters (OUT_DIR/lora_<mesh>.npz)."""
    from models import peft

    case = "bert_token_cls"
    cfg = cases.make_cfg(os.path.join(out_dir, "unused"), case, "dp_tp")
    data = cases.task_data(case)
    base, _ = modeling.build(cfg, data, log=lambda *a: None)
    base = modeling.apply_peft(base, LORA, seed=0)
    # B starts at zero (so A would get no gradient): give every LoRA factor random values
    for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(base, peft.PeftParam))):
        variable.set_value(0.2 * jax.random.normal(jax.random.key(100 + i), variable.shape))
    trainable = peft.trainable_filter(base)
    batch = next(data.loader("train", cfg.batch_size, seed=0, train=True))
    sgd = OptimizerConfig(**cases.PLAIN_SGD)
    out = {"meshes": {}}
    meshes = {"single": (sharding.make_mesh(OmegaConf.create({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]),
                         {}),
              "dp_tp": (sharding.make_mesh(cfg.mesh), dict(cfg.mesh.logical_axis_rules))}
    for name, (mesh, rules) in meshes.items():
        graphdef, variables = nnx.split(base)
        model = nnx.merge(graphdef, jax.tree.map(np.asarray, variables))  # host copies: the step donates its inputs
        setup = state.build(model, "token_cls", mesh, rules, optimizer_cfg=sgd,
                            schedule=optax.constant_schedule(sgd.lr), trainable_filter=trainable)
        logical = {jax.tree_util.keystr(p): list(s) for p, s in jax.tree_util.tree_leaves_with_path(
            nnx.get_partition_spec(setup.params), is_leaf=lambda x: isinstance(x, PartitionSpec))}
        specs = {jax.tree_util.keystr(p): spec_list(a.sharding.spec, a.ndim)
                 for p, a in jax.tree_util.tree_leaves_with_path(setup.params)}
        params, _, metrics = setup.train_step(setup.params, setup.opt_state, setup.rest, setup.put_batch(batch),
                                              np.int32(0), jax.random.key(0, impl=loop.RNG_IMPL))
        np.savez(os.path.join(out_dir, f"lora_{name}.npz"),
                 **{jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(params)})
        out["meshes"][name] = {"mesh": dict(mesh.shape), "specs": specs, "logical": logical,
                               "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
    return out


def bert_part(out_dir: str, results: dict) -> None:
    """The BERT case on every mesh, the shardings the loop's functions give, and the cross-mesh restore."""
    case = "bert_token_cls"
    for mesh in cases.MESHES:
        run_case(out_dir, case, mesh, results)
    tick = time.perf_counter()
    data = cases.task_data(case)
    results["shardings"], results["step_outputs"] = {}, {}
    model, _ = modeling.build(cases.make_cfg(os.path.join(out_dir, "unused"), case), data, log=lambda *a: None)
    for mesh in cases.MESHES:
        cfg = cases.make_cfg(os.path.join(out_dir, "unused"), case, mesh)
        state = train_state(cfg, model)
        results["shardings"][mesh] = describe_shardings(state)
        if mesh in ("fsdp", "dp_fsdp_tp"):
            results["step_outputs"][mesh] = step_output_specs(cfg, data, state)
    results["seconds"]["shardings"] = round(time.perf_counter() - tick, 1)

    tick = time.perf_counter()
    run_dir = os.path.join(out_dir, "runs", f"{case}_fsdp")
    cfg = cases.make_cfg(run_dir, case, "fsdp")
    saved, saved_specs = restore_onto(run_dir, cfg, cfg.mesh)
    target = OmegaConf.merge(cases.mesh_preset("dp_tp"), {"data": -1, "fsdp": 1, "tensor": 4})
    moved, moved_specs = restore_onto(run_dir, cfg, target)
    results["restore"] = {
        "run_dir": run_dir, "saved_mesh": dict(sharding.make_mesh(cfg.mesh).shape),
        "target_mesh": dict(sharding.make_mesh(target).shape), "saved_specs": saved_specs, "target_specs": moved_specs,
        "same_keys": sorted(saved) == sorted(moved),
        "max_abs_difference": max(float(np.max(np.abs(saved[k] - moved[k]), initial=0.0)) for k in saved)}
    np.savez(os.path.join(out_dir, "restore_saved_mesh.npz"), **saved)
    results["seconds"]["restore"] = round(time.perf_counter() - tick, 1)

    tick = time.perf_counter()
    results["lora"] = lora_steps(out_dir)
    results["seconds"]["lora"] = round(time.perf_counter() - tick, 1)


def gpt_part(out_dir: str, results: dict) -> None:
    """The GPT cases (AdamW, plain SGD) on every mesh, and the ahead-of-time memory reports."""
    for case in ("gpt_clm", "gpt_clm_sgd"):
        for mesh in cases.MESHES:
            run_case(out_dir, case, mesh, results)
    tick = time.perf_counter()
    results["aot"] = aot_reports()
    results["seconds"]["aot"] = round(time.perf_counter() - tick, 1)


def reference_part(out_dir: str, results: dict) -> None:
    """Every case on one device; the GPT on the quickstart language through flaxen.data."""
    for case in cases.CASES:
        run_case(out_dir, case, None, results)
    tick = time.perf_counter()
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    run_dir = os.path.join(out_dir, "runs", "quickstart_single")
    cfg = cases.quickstart_cfg(run_dir, data_dir)
    loop.train(cfg)
    record_run(out_dir, "quickstart_single", cfg, run_dir, results)
    results["seconds"]["quickstart_single"] = round(time.perf_counter() - tick, 1)


PARTS = {"bert": (bert_part, 8), "gpt": (gpt_part, 8), "reference": (reference_part, 1)}


def main(part: str, out_dir: str) -> None:
    function, devices = PARTS[part]
    enable_cache(out_dir)
    assert jax.device_count() == devices, jax.devices()
    results = {"runs": {}, "seconds": {}}
    start = time.perf_counter()
    function(out_dir, results)
    results["seconds"]["total"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out_dir, f"{part}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
