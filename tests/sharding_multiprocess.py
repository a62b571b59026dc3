"""One of the two processes of tests/test_sharding_mesh.py's multi-process run.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding_multiprocess.py PROCESS_ID PORT RUN_DIR

Both processes run flaxen.loop on the GPT case (sharding_cases.py) with `distributed.*` set in the
config (coordinator 127.0.0.1:PORT, 2 processes), so flaxen.distributed starts JAX's runtime and
the mesh's data axis spans the 4 CPU devices of both processes. Each process feeds only its half
of every global batch (`ProcessRows`, as a per-process data loader does); only process 0 writes
metrics.jsonl and results.json; both take part in orbax's checkpoint writes to the shared RUN_DIR.
"""
from __future__ import annotations

import sys

import sharding_cases as cases  # noqa: E402  (puts the repository on sys.path)

from flaxen import loop  # noqa: E402


class ProcessRows:
    """A task's data where process p of P gets rows [p*B/P, (p+1)*B/P) of each global batch of B rows."""

    def __init__(self, data):
        self.data = data
        self.tokenizer, self.label_names = data.tokenizer, data.label_names

    def loader(self, split, batch_size, *, seed=0, train=False, process_index=0, process_count=1):
        rows = self.data.loader(split, batch_size * process_count, seed=seed, train=train)
        start = process_index * batch_size
        return _Slice(rows, slice(start, start + batch_size))


class _Slice:
    def __init__(self, loader, rows: slice):
        self.loader, self.rows = loader, rows

    def __iter__(self):
        return self

    def __next__(self):
        return {key: value[self.rows] for key, value in next(self.loader).items()}

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


def main(process_id: int, port: int, run_dir: str) -> None:
    cfg = cases.make_cfg(run_dir, "gpt_clm", "dp")
    cfg.distributed.coordinator_address = f"127.0.0.1:{port}"
    cfg.distributed.num_processes = 2
    cfg.distributed.process_id = process_id
    cfg.distributed.initialization_timeout = 120
    results = loop.train(cfg, task_data=ProcessRows(cases.task_data("gpt_clm")))
    import jax

    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, "
          f"{jax.local_device_count()} local, {results['steps']} steps", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
