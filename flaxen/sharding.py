"""Device mesh, logical-axis rules and the NamedShardings of the train state, batches and activations.

Why: the one train step is jitted with explicit in/out shardings on a `jax.sharding.Mesh`
(axes `data`, `fsdp`, `tensor`), even on one device, so scaling out only changes the mesh shape
and the rules in config (configs/mesh/), never the step.

- `make_mesh(mesh_cfg)`: sizes per axis, `-1` = all remaining devices.
- Rules map a model's logical axis names (its `nnx.Param` sharding metadata, e.g.
  `('embed', 'mlp')`) to mesh axes: `{'mlp': 'tensor', 'heads': 'tensor'}` is Megatron-style
  tensor parallelism; a name without a rule is replicated. A rule whose mesh axes do not divide
  the dimension is a ConfigError naming the parameter.
- FSDP is not a rule: when the mesh's `fsdp` axis is larger than 1, every parameter that no rule
  already puts on `fsdp` gets its largest dimension that `fsdp` divides (after the rules' own
  axes) sharded over `fsdp`, preferring a dimension the rules left unsharded. Logical names cannot
  say this: the largest dimension is `vocab` for an embedding table, `mlp` for an MLP kernel and
  `embed` for a LayerNorm scale, and a size such as GPT-2's vocabulary (50257) divides by nothing.
  Parameters with no dimension that divides stay replicated over `fsdp` (they are small).
- Parameters: `state_shardings(mesh, state, rules)` -> the same pytree of `NamedSharding`.
- Optimizer state: `optimizer_state_shardings(mesh, opt_state, params, param_shardings)` gives each
  moment the sharding of the parameter it mirrors (matched by pytree path and shape); counters
  and other scalars are replicated.
- Batches `[batch, ...]`: the batch axis over (`data`, `fsdp`), the rest replicated;
  `put_batch` assembles global arrays from this process's rows.
- Activations: `activation_sharding(mesh, rules)` resolves the logical names the models put on
  activations at block boundaries (`('batch', 'length', 'embed')`, `('batch', 'length', 'mlp')`)
  for `models.layers.activation_sharding`; `batch` is always (`data`, `fsdp`).
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


def _sizes(mesh: Mesh) -> str:
    return ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_mesh(logical: Sequence[str | None], rules: Mapping[str, Any], where: str = "") -> PartitionSpec:
    """PartitionSpec over mesh axes for one array's logical axis names (the rules only)."""
    rules = check_rules(rules)
    spec, used = [], set()
    for name in logical:
        axes = rules.get(name, ()) if name is not None else ()
        if used.intersection(axes):
            raise ConfigError(
                f"mesh.logical_axis_rules shard two dimensions of {where or tuple(logical)} over mesh axis "
                f"{sorted(used.intersection(axes))[0]!r}")
        used.update(axes)
        spec.append(_entry(axes))
    return PartitionSpec(*spec)


def param_spec(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, Any],
               where: str = "") -> PartitionSpec:
    """The PartitionSpec of one parameter of `shape`: the rules' axes, then `fsdp` on its largest
    dimension that it divides (see the module docstring)."""
    spec = logical_to_mesh(logical, rules, where)
    dims = [_mesh_axes(entry) for entry in spec] + [()] * (len(shape) - len(spec))
    for dim, (size, axes) in enumerate(zip(shape, dims)):
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            raise ConfigError(
                f"mesh.logical_axis_rules.{logical[dim]}={list(axes)} splits dimension {dim} of "
                f"{where or 'a parameter'} (size {size}, shape {tuple(shape)}) into {shards} shards, which do not "
                f"divide it; change the rule or the mesh sizes ({_sizes(mesh)})")
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and not any("fsdp" in axes for axes in dims):
        candidates = []
        for dim, (size, axes) in enumerate(zip(shape, dims)):
            shards = math.prod(mesh.shape[a] for a in axes)
            if (size // shards) % fsdp == 0:
                candidates.append((shards == 1, size // shards, -dim))
        if candidates:
            dim = -max(candidates)[2]
            dims[dim] = dims[dim] + ("fsdp",)
    return PartitionSpec(*(_entry(axes) for axes in dims))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def state_shardings(mesh: Mesh, state: nnx.State, rules: Mapping[str, Any]):
    """The pytree of NamedShardings of an nnx.State (arrays or ShapeDtypeStructs), from its
    variables' logical axis names, the rules and FSDP (`param_spec`)."""
    logical = nnx.get_partition_spec(state)
    paths_and_specs = jax.tree_util.tree_flatten_with_path(logical, is_leaf=_is_spec)[0]
    leaves, treedef = jax.tree_util.tree_flatten(state)
    shardings = []
    for (path, spec), leaf in zip(paths_and_specs, leaves):
        shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
        names = tuple(spec) if isinstance(spec, PartitionSpec) else (None,) * len(shape)
        names = names + (None,) * (len(shape) - len(names))
        shardings.append(NamedSharding(mesh, param_spec(mesh, names, shape, rules, jax.tree_util.keystr(path))))
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


def activation_sharding(mesh: Mesh, rules: Mapping[str, Any]):
    """`resolve(logical_names, shape) -> NamedSharding` for `models.layers.activation_sharding`.

    `batch` goes over (data, fsdp); other names follow the rules (`mlp` and `heads` over `tensor`
    under Megatron-style rules; `embed` and `length` usually replicated). A mesh axis already used by
    an earlier dimension, or axes that do not divide a dimension, leave that dimension replicated.
    """
    rules = {**check_rules(rules), "batch": BATCH_AXES}

    def resolve(logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        spec, used = [], set()
        for name, size in zip(logical, shape):
            axes = tuple(a for a in rules.get(name, ()) if a not in used) if name is not None else ()
            if size % math.prod(mesh.shape[a] for a in axes):
                axes = ()
            used.update(axes)
            spec.append(_entry(axes))
        return NamedSharding(mesh, PartitionSpec(*spec))

    return resolve
