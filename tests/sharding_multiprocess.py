"""One of the two processes of tests/test_sharding_mesh.py's multi-process run.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding_multiprocess.py PROCESS_ID PORT RUN_DIR DATA_DIR

Both processes run flaxen.loop on the GPT case over the quickstart language (sharding_cases.py's
`quickstart_cfg`) with `distributed.*` set in the config (coordinator 127.0.0.1:PORT, 2 processes),
so flaxen.distributed starts JAX's runtime and the mesh's data axis spans the 4 CPU devices of both
processes. The loop reads the data itself: flaxen.data's grain loader with this process's
process_index / process_count, each process feeding its half of every global batch. DATA_DIR holds
the data already prepared (by the single-device reference run). Only process 0 writes
metrics.jsonl and results.json; both take part in orbax's checkpoint writes to the shared RUN_DIR.
"""
from __future__ import annotations

import sys

import sharding_cases as cases  # noqa: E402  (puts the repository on sys.path)

from flaxen import loop  # noqa: E402


def main(process_id: int, port: int, run_dir: str, data_dir: str) -> None:
    cfg = cases.quickstart_cfg(run_dir, data_dir, "dp")
    cfg.distributed.coordinator_address = f"127.0.0.1:{port}"
    cfg.distributed.num_processes = 2
    cfg.distributed.process_id = process_id
    cfg.distributed.initialization_timeout = 120
    results = loop.train(cfg)
    import jax

    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"{jax.local_device_count()} local, {results['steps']} steps", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
