"""Multi-process start-up: JAX's distributed runtime from config or the cluster environment.

Why: on more than one host (or one process per GPU) every process runs the same train.py; each
must connect to a coordinator before it touches a device, so that `jax.devices()` lists the
devices of all processes and one jitted step spans them (JAX's multi-controller runtime; flaxen
adds no launcher and no collectives of its own). Afterwards only process 0 writes logs and
results (flaxen.loop), each process feeds its own rows of every batch
(`jax.make_array_from_process_local_data`), and orbax writes checkpoints collectively.

`initialize(distributed_cfg)` -> `{'process_id', 'num_processes'}` or None (one process).
Call it before anything touches a device; a second call is a no-op. `distributed.initialize`:
- `never`: one process, nothing happens.
- `always`: `jax.distributed.initialize` with the keys that are set; JAX fills the others from
  the environment (SLURM, Open MPI, Cloud TPU, `JAX_COORDINATOR_ADDRESS`) or fails, naming them.
- `auto` (default): as `always` when more than one process is asked for: `coordinator_address`
  or `num_processes` > 1 in config, `JAX_COORDINATOR_ADDRESS` in the environment, a SLURM job step
  with SLURM_NTASKS > 1 (inside `srun`), an Open MPI job with OMPI_COMM_WORLD_SIZE > 1, or a Cloud
  TPU VM (libtpu installed and TPU devices present: every worker of a pod slice runs the same
  command). Otherwise nothing happens.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Mapping

import jax

from flaxen.errors import ConfigError

MODES = ("auto", "always", "never")
SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _get(cfg: Any, key: str, default=None):
    value = None if cfg is None else cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def _int_env(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ.get(key, "1"))
    except ValueError:
        return 1


def _on_tpu_vm() -> bool:
    devices = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(devices) and importlib.util.find_spec("libtpu") is not None


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process environment this process runs in ('jax', 'slurm', 'openmpi', 'tpu'), or None."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax"
    if all(key in environ for key in SLURM_STEP) and _int_env(environ, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_env(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if _on_tpu_vm():
        return "tpu"
    return None


def initialize_arguments(cfg: Any, environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` that `cfg` asks for, or None when this
    is a single-process run (see the module docstring). Checks the keys; raises ConfigError."""
    mode = _get(cfg, "initialize", "auto")
    if mode not in MODES:
        raise ConfigError(f"distributed.initialize={mode!r}: expected one of {', '.join(MODES)}")
    arguments = {key: _get(cfg, key) for key in ("coordinator_address", "num_processes", "process_id")}
    ids = _get(cfg, "local_device_ids")
    if ids is not None:
        arguments["local_device_ids"] = [int(i) for i in ids]
    arguments["initialization_timeout"] = int(_get(cfg, "initialization_timeout", 300))
    num, pid = arguments["num_processes"], arguments["process_id"]
    if num is not None and num < 1:
        raise ConfigError(f"distributed.num_processes={num}: expected a positive number of processes")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise ConfigError(f"distributed.process_id={pid}: expected 0 <= process_id < num_processes"
                          f"{f' = {num}' if num is not None else ''}")
    if mode == "never":
        return None
    if mode == "auto":
        asked = arguments["coordinator_address"] is not None or (num is not None and num > 1)
        if not asked and cluster_environment(environ) is None:
            return None
    return {key: value for key, value in arguments.items() if value is not None}


def initialize(cfg: Any = None, environ: Mapping[str, str] | None = None) -> dict | None:
    """Starts JAX's distributed runtime when `cfg` (the `distributed` config) asks for it; returns
    {'process_id', 'num_processes'} when running multi-process, else None."""
    if jax.distributed.is_initialized():
        return {"process_id": jax.process_index(), "num_processes": jax.process_count()}
    arguments = initialize_arguments(cfg, environ)
    if arguments is None:
        return None
    try:
        jax.distributed.initialize(**arguments)
    except RuntimeError as error:
        if "before" in str(error):
            raise ConfigError(
                "distributed start-up: JAX already used its devices in this process; jax.distributed.initialize "
                "must run first (set distributed.initialize=never for a single-process run)") from error
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"distributed start-up failed: {error}. Set distributed.coordinator_address (host:port of process 0), "
            "distributed.num_processes and distributed.process_id, or run under SLURM (srun), Open MPI or on "
            "Cloud TPU where they are detected") from error
    return {"process_id": jax.process_index(), "num_processes": jax.process_count()}
