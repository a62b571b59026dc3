"""Device mesh, logical-axis rules and the NamedShardings of the train state and batches.

Why: the one train step is jitted with explicit in/out shardings on a `jax.sharding.Mesh`
(axes `data`, `fsdp`, `tensor`), even on one device, so scaling out only changes the mesh shape
and the rules in config (configs/mesh/), never the step.

- `make_mesh(mesh_cfg)`: sizes per axis, `-1` = all remaining devices.
- Rules map a model's logical axis names (its `nnx.Param` sharding metadata, e.g.
  `('embed', 'mlp')`) to mesh axes: `{'mlp': 'tensor', 'embed': None, ...}`; a name without a
  rule is replicated.
- Parameters: `state_shardings(mesh, state, rules)` -> the same pytree of `NamedSharding`.
- Optimizer state: `optimizer_state_shardings(mesh, opt_state, params, param_shardings)` gives each
  moment the sharding of the parameter it mirrors (matched by pytree path and shape); counters
  and other scalars are replicated.
- Batches `[batch, ...]`: the batch axis over (`data`, `fsdp`), the rest replicated;
  `put_batch` assembles global arrays from this process's rows.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxen.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) sized from `mesh_cfg.{data,fsdp,tensor}`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: int(getattr(mesh_cfg, axis)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]}={sizes[bad[0]]}: expected a positive size or -1 (all remaining devices)")
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[0]} and mesh.{free[1]} are both -1: at most one mesh axis may take the rest")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ConfigError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {fixed} "
                f"({', '.join(f'{a}={s}' for a, s in sizes.items())})")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} but {len(devices)} devices are available "
            f"({', '.join(f'{a}={s}' for a, s in sizes.items())})")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types, devices=devices)


def _mesh_axes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def check_rules(rules: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Normalises `{logical: None | axis | [axes]}` and rejects unknown mesh axes."""
    normalised = {}
    for logical, value in dict(rules).items():
        axes = _mesh_axes(value)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f"mesh.logical_axis_rules.{logical}={value!r}: unknown mesh axis {unknown[0]!r}, "
                f"expected {', '.join(MESH_AXES)}")
        normalised[logical] = axes
    return normalised


def logical_to_mesh(logical: Sequence[str | None], rules: Mapping[str, Any], where: str = "") -> PartitionSpec:
    """PartitionSpec over mesh axes for one array's logical axis names."""
    rules = check_rules(rules)
    spec, used = [], set()
    for name in logical:
        axes = rules.get(name, ()) if name is not None else ()
        if used.intersection(axes):
            raise ConfigError(
                f"mesh.logical_axis_rules shard two dimensions of {where or tuple(logical)} over mesh axis "
                f"{sorted(used.intersection(axes))[0]!r}")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def state_shardings(mesh: Mesh, state: nnx.State, rules: Mapping[str, Any]):
    """The pytree of NamedShardings of an nnx.State, from its variables' logical axis names."""
    logical = nnx.get_partition_spec(state)
    paths_and_specs = jax.tree_util.tree_flatten_with_path(logical, is_leaf=_is_spec)[0]
    treedef = jax.tree_util.tree_structure(state)
    shardings = []
    for path, spec in paths_and_specs:
        names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        shardings.append(NamedSharding(mesh, logical_to_mesh(names, rules, jax.tree_util.keystr(path))))
    return jax.tree_util.tree_unflatten(treedef, shardings)


def optimizer_state_shardings(mesh: Mesh, opt_state, params, param_shardings):
    """Shardings for an optax state: leaves that mirror a parameter (same path suffix and shape)
    take that parameter's sharding; everything else (step counters, scalars) is replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (np.shape(leaf), sharding)
    longest = max((len(p) for p in by_path), default=0)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        path = tuple(path)
        for start in range(max(0, len(path) - longest), len(path)):
            match = by_path.get(path[start:])
            if match is not None and match[0] == np.shape(leaf):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays: rows split over (data, fsdp); other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the number of batch shards)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host numpy rows of this process -> global jax.Arrays sharded over the batch axes."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}
