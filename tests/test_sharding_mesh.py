"""Sharded training on 8 CPU devices against the single-device run, cross-mesh restore, ahead-of-time
memory reports, and two processes training as one.

The runs happen in processes of their own (the device count is fixed when JAX starts):
tests/sharding_runs.py's `bert` and `gpt` parts on 8 devices and its `reference` part on 1 device,
started side by side; tests/sharding_multiprocess.py twice for the two-process run. The cases
(tests/sharding_cases.py): a tiny BERT tagger with dropout and a tiny GPT causal LM with AdamW, and
the GPT with plain SGD, 10 steps of flaxen.loop on each mesh preset dp (data=8), fsdp (fsdp=8),
dp_tp (data=4 x tensor=2) and dp_fsdp_tp (data=2 x fsdp=2 x tensor=2); every step's loss and
gradient norm and the final parameters are held to the single-device run's. Every process, the
single-device reference included, compiles with COMPILE_FLAGS, which cut XLA's CPU code generation
time about fourfold and leave the SPMD partitioning under test as it is.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import sharding_cases as cases

TESTS = os.path.dirname(os.path.abspath(__file__))
COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                 "--xla_cpu_parallel_codegen_split_count=1")
TIMEOUT = 600


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}")


def _finish(process: subprocess.Popen, log_path: str, what: str) -> None:
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0:
        with open(log_path) as f:
            pytest.fail(f"{what} failed (exit {process.returncode}):\n{f.read()[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the three parts of sharding_runs.py together; returns (out_dir, merged results)."""
    out = str(tmp_path_factory.mktemp("sharding_runs"))
    started = []
    for part, devices in (("bert", 8), ("gpt", 8), ("reference", 1)):
        log_path = os.path.join(out, f"{part}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, os.path.join(TESTS, "sharding_runs.py"), part, out],
                                       env=_env(devices), stdout=log, stderr=subprocess.STDOUT, cwd=cases.ROOT)
        started.append((process, log_path, f"sharding_runs.py {part}"))
    for process, log_path, what in started:
        _finish(process, log_path, what)
    results = {"runs": {}, "seconds": {}}
    for part in ("bert", "gpt", "reference"):
        with open(os.path.join(out, f"{part}.json")) as f:
            part_results = json.load(f)
        for key, value in part_results.items():
            if isinstance(value, dict) and key in results:
                results[key].update({k if key == "runs" else f"{part}/{k}": v for k, v in value.items()})
            else:
                results[key] = value
    return out, results


def _arrays(out: str, name: str) -> dict:
    with np.load(os.path.join(out, f"{name}.npz")) as data:
        return {key: data[key] for key in data.files}


# A sharded step sums its gradients, losses and norms over the shards in another order than one
# device does: float32 rounding, about 1e-7 relative, so per-step losses and gradient norms agree
# to rtol 1e-5 (a gradient summed instead of averaged over the 2-8 batch shards is off by 2-8x).
STEP_RTOL = 1e-5
# Final parameters, per element: relative to the value, with an absolute floor for entries near
# zero (biases that start at 0, LayerNorm biases), whose value is itself a sum of rounded gradient
# terms, so their error is absolute, not relative.
#   plain SGD: x_10 = x_0 - lr * (g_1 + ... + g_10). The gradient norms are ~1 and agree to ~1e-7
#     relative, so an entry drifts by a few lr * 1e-7 at most (observed: <= 4e-8 beyond rtol 1e-5):
#     floor 1e-7 (float32's spacing at 1.0, where the LayerNorm scales sit), rtol 1e-5.
#   AdamW: each entry's update is lr * m / sqrt(v), its gradient divided by its own RMS, which
#     turns that ~1e-7 rounding noise into a larger update difference for entries whose gradient is
#     near zero (observed: <= 6e-6): floor 2e-5 (0.1 % of the 0.02 weight scale, 1/150 of one
#     update of lr 3e-3), rtol 1e-4. The SGD case is the one that sees a gradient's scale in the
#     parameters: Adam's update is nearly invariant to it, and clipping (clip_norm=1) rescales it.
PARAM_TOLERANCE = {"gpt_clm_sgd": dict(rtol=1e-5, atol=1e-7)}
ADAM_PARAM_TOLERANCE = dict(rtol=1e-4, atol=2e-5)


def _assert_same_run(run: dict, reference: dict, what: str) -> None:
    """Per-step losses and gradient norms (metrics.jsonl, log_every=1) of `run` equal the reference's."""
    assert len(run["losses"]) == len(run["grad_norms"]) == cases.STEPS
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=STEP_RTOL, atol=0, err_msg=f"{what} loss")
    np.testing.assert_allclose(run["grad_norms"], reference["grad_norms"], rtol=STEP_RTOL, atol=0,
                               err_msg=f"{what} grad_norm")


@pytest.mark.parametrize("case", list(cases.CASES))
def test_every_mesh_trains_like_one_device(runs, case):
    out, results = runs
    reference = results["runs"][f"{case}_single"]
    assert reference["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert reference["losses"][-1] < reference["losses"][0]
    expected = _arrays(out, f"{case}_single")
    tolerance = PARAM_TOLERANCE.get(case, ADAM_PARAM_TOLERANCE)
    for mesh in cases.MESHES:
        run = results["runs"][f"{case}_{mesh}"]
        assert tuple(run["mesh"].values()) == cases.MESH_SHAPES[mesh], (mesh, run["mesh"])
        _assert_same_run(run, reference, f"{case} {mesh}")
        final = _arrays(out, f"{case}_{mesh}")
        assert final.keys() == expected.keys()
        assert any(key.startswith("params/") for key in final)
        for key in expected:
            np.testing.assert_allclose(final[key], expected[key], **tolerance, err_msg=f"{case} {mesh} {key}")


def test_lora_trains_on_a_tensor_mesh_like_on_one_device(runs):
    """A LoRA model (every projection adapted, dropout on) on data=4 x tensor=2: each LoRA factor is
    split over `tensor` where the layer it adapts is (its axis names under the dp_tp rules), and one
    plain-SGD train step gives the single-device loss, gradient norm and updated parameters."""
    out, results = runs
    lora = results["lora"]["meshes"]
    sharded, single = lora["dp_tp"], lora["single"]
    assert sharded["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    factors = [key for key in sharded["specs"] if "lora_" in key]
    assert len(factors) == 2 * 2 * 6  # 2 layers x 6 adapted projections x (A, B)
    assert set(sharded["specs"]) - set(factors) == {"['head']['dense']['kernel'].value", "['head']['dense']['bias'].value"}
    for key in factors:
        assert sharded["specs"][key] == [RULES_ONLY.get(name) for name in sharded["logical"][key]], key
    # the shardings worked out by hand for the layer-0 factors
    layer = "['backbone']['layers'][0]"
    assert sharded["specs"][f"{layer}['attention']['query']['lora_b'].value"] == [None, "tensor", None]
    assert sharded["specs"][f"{layer}['attention']['out']['lora_a'].value"] == ["tensor", None, None]
    assert sharded["specs"][f"{layer}['intermediate']['lora_b'].value"] == [None, "tensor"]
    assert sharded["specs"][f"{layer}['output']['lora_a'].value"] == ["tensor", None]
    assert sharded["specs"][f"{layer}['attention']['query']['lora_a'].value"] == [None, None]
    assert all(spec == [None] * len(spec) for spec in single["specs"].values())
    assert sharded["loss"] == pytest.approx(single["loss"], rel=STEP_RTOL)
    assert sharded["grad_norm"] == pytest.approx(single["grad_norm"], rel=STEP_RTOL)
    expected, final = _arrays(out, "lora_single"), _arrays(out, "lora_dp_tp")
    assert final.keys() == expected.keys() == sharded["specs"].keys()
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], **PARAM_TOLERANCE["gpt_clm_sgd"], err_msg=key)


# The BERT tagger's parameters under the rules heads -> tensor, mlp -> tensor, and FSDP on the largest
# dimension the fsdp size divides, preferring one that tensor does not split (worked out by hand).
FSDP8 = {  # fsdp=8, tensor=1: 'tensor' stays in the spec but splits nothing, so every dimension counts as free
    "['word']['embedding']": ["fsdp", None],
    "['position']['embedding']": [None, "fsdp"],
    "['token_type']['embedding']": [None, "fsdp"],
    "['query']['kernel']": ["fsdp", "tensor", None],
    "['query']['bias']": ["tensor", "fsdp"],
    "['out']['kernel']": ["tensor", None, "fsdp"],
    "['out']['bias']": ["fsdp"],
    "['intermediate']['kernel']": [None, ["tensor", "fsdp"]],
    "['intermediate']['bias']": [["tensor", "fsdp"]],
    "['output']['kernel']": [["tensor", "fsdp"], None],
    "['output']['bias']": ["fsdp"],
    "['scale']": ["fsdp"],
    "['norm']['bias']": ["fsdp"],
    "['head']['dense']['kernel']": ["fsdp", None],
    "['head']['dense']['bias']": [None],
}
DP2_FSDP2_TP2 = dict(FSDP8, **{
    "['intermediate']['kernel']": ["fsdp", "tensor"],
    "['output']['kernel']": ["tensor", "fsdp"],
})
RULES_ONLY = {"heads": "tensor", "mlp": "tensor"}


def _expected_spec(mesh: str, key: str, logical: list) -> list:
    if mesh in ("dp", "dp_tp"):
        return [RULES_ONLY.get(name) for name in logical]
    table = FSDP8 if mesh == "fsdp" else DP2_FSDP2_TP2
    name = re.sub(r"\.value$", "", key)
    name = re.sub(r"\['(key|value)'\]", "['query']", name)
    name = re.sub(r"\['(attention_norm|output_norm)'\]\['bias'\]", "['norm']['bias']", name)
    matches = [spec for suffix, spec in table.items() if name.endswith(suffix)]
    assert len(matches) == 1, (key, matches)
    return matches[0]


@pytest.mark.parametrize("mesh", cases.MESHES)
def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say(runs, mesh):
    _, results = runs
    placed = results["shardings"][mesh]
    assert len(placed["params"]) == 39
    for key, leaf in placed["params"].items():
        assert leaf["spec"] == _expected_spec(mesh, key, leaf["logical"]), (mesh, key, leaf)
    moments = {}
    for key, leaf in placed["opt_state"].items():
        match = re.search(r"\.(mu|nu)(\[.*)$", key)
        if match is None:
            assert leaf["shape"] == [] and leaf["spec"] == [], (key, leaf)
            continue
        param = placed["params"][match.group(2)]
        assert leaf["shape"] == param["shape"] and leaf["spec"] == param["spec"], (mesh, key)
        moments[match.group(2)] = moments.get(match.group(2), 0) + 1
    assert moments == {key: 2 for key in placed["params"]}


def test_fsdp_leaves_each_device_an_eighth_of_the_state(runs):
    _, results = runs
    fsdp = results["shardings"]["fsdp"]
    eighth = fsdp["total_bytes"] / 8
    for held in fsdp["bytes_per_device"]:
        assert eighth <= held <= 1.01 * eighth, (held, eighth)
    assert results["shardings"]["dp"]["bytes_per_device"] == [results["shardings"]["dp"]["total_bytes"]] * 8


@pytest.mark.parametrize("mesh", ["fsdp", "dp_fsdp_tp"])
def test_the_train_step_returns_the_state_as_it_was_sharded(runs, mesh):
    _, results = runs
    placed, returned = results["shardings"][mesh], results["step_outputs"][mesh]
    assert returned["params"] == {key: leaf["spec"] for key, leaf in placed["params"].items()}
    assert returned["opt_state"] == {key: leaf["spec"] for key, leaf in placed["opt_state"].items()}


def test_a_checkpoint_saved_under_fsdp8_restores_on_one_device_and_on_dp2_tp4(runs):
    out, results = runs
    restore = results["restore"]
    assert restore["saved_mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert restore["target_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert restore["same_keys"] and restore["max_abs_difference"] == 0.0
    query = next(k for k in restore["target_specs"] if k.endswith("['layers'][0]['attention']['query']['kernel'].value")
                 and k.startswith("params/"))
    assert restore["saved_specs"][query] == ["fsdp", "tensor", None]
    assert restore["target_specs"][query] == [None, "tensor", None]

    saved = _arrays(out, "restore_saved_mesh")
    on_one_device = _restore_on_one_device(restore["run_dir"], "bert_token_cls", "fsdp")
    assert on_one_device.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(on_one_device[key], saved[key], err_msg=key)
    trained_alone = _arrays(out, "bert_token_cls_single")
    for key, value in _by_variable_path(on_one_device).items():
        np.testing.assert_allclose(value, trained_alone[key], **ADAM_PARAM_TOLERANCE, err_msg=key)


def _restore_on_one_device(run_dir: str, case: str, mesh: str) -> dict:
    """A run's last checkpoint (parameters and optimizer state) restored onto this process's one device
    with the targets a single-device run would give them; keyed 'item/keystr'."""
    import jax

    from flaxen import sharding
    from flaxen.config import MeshConfig

    cfg = cases.make_cfg(run_dir, case, mesh)
    single = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    restored, _ = cases.restore_checkpoint(run_dir, cfg, single, {})
    arrays = {}
    for item in ("params", "opt_state"):
        for path, array in jax.tree_util.tree_leaves_with_path(restored[item]):
            assert array.sharding.device_set == {jax.devices()[0]}
            arrays[f"{item}/{jax.tree_util.keystr(path)}"] = np.asarray(array)
    return arrays


def _by_variable_path(arrays: dict) -> dict:
    """'params/<keystr>' -> 'params/backbone/layers/0/...' (the keys of sharding_cases.final_arrays)."""
    return {"params/" + "/".join(re.findall(r"\['?([^'\]]+)'?\]", key.split("/", 1)[1])): value
            for key, value in arrays.items() if key.startswith("params/")}


def test_aot_memory_per_device_falls_as_fsdp_grows(runs):
    _, results = runs
    reports = results["aot"]
    assert [r["mesh"]["fsdp"] for r in reports] == [1, 2, 4, 8]
    totals = [r["memory_per_device"]["total"] for r in reports]
    assert all(later < earlier for earlier, later in zip(totals, totals[1:])), totals
    whole = reports[0]
    for report in reports:
        n = report["mesh"]["fsdp"]
        assert report["parameters"] == whole["parameters"]
        assert report["parameter_bytes_per_device"] * n == 4 * whole["parameters"]
        assert report["optimizer_bytes_per_device"] <= whole["optimizer_bytes_per_device"] / n + 64
        held = report["parameter_bytes_per_device"] + report["optimizer_bytes_per_device"]
        assert held <= report["memory_per_device"]["arguments"] <= held + whole["memory_per_device"]["arguments"] / 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(runs, tmp_path):
    """JAX's distributed runtime from flaxen's config over 2 processes x 2 CPU devices (data=4), each
    process reading its half of every batch through flaxen.data's per-process loader (quickstart
    language), against the same config's run on one device and one process."""
    out, results = runs
    run_dir, port = str(tmp_path / "run"), _free_port()
    data_dir = os.path.join(out, "data")  # prepared by the single-device reference run
    started = []
    for process_id in (0, 1):
        log_path = str(tmp_path / f"process{process_id}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, os.path.join(TESTS, "sharding_multiprocess.py"), str(process_id), str(port), run_dir,
                 data_dir],
                env=_env(2), stdout=log, stderr=subprocess.STDOUT, cwd=cases.ROOT)
        started.append((process, log_path, f"process {process_id}"))
    for process, log_path, what in started:
        _finish(process, log_path, what)
    logs = [open(log_path).read() for _, log_path, _ in started]
    assert "process 0 of 2: 4 devices, 2 local, 10 steps" in logs[0]
    assert "process 1 of 2: 4 devices, 2 local, 10 steps" in logs[1]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in logs[0]
    assert "parameters:" not in logs[1] and "done:" not in logs[1]
    reference = results["runs"]["quickstart_single"]
    assert reference["losses"][-1] < reference["losses"][0]
    run = {"losses": cases.step_losses(run_dir), "grad_norms": cases.step_values(run_dir, "grad_norm")}
    _assert_same_run(run, reference, "two processes")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert sum(1 for line in f if '"loss"' in line) == cases.STEPS
    final = _by_variable_path(_restore_on_one_device(run_dir, "gpt_clm", "dp"))
    expected = _arrays(out, "quickstart_single")
    assert final.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], **ADAM_PARAM_TOLERANCE, err_msg=key)
