"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune"): the
`prune` config group and the optax wrapper that keeps the masks.

Schedule: between `start_step` t0 and `end_step` t_end the sparsity follows
    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3
(s_i = `initial_sparsity`, s_f = `sparsity`): fast pruning while many redundant weights remain,
slower as fewer are left. Masks are recomputed at t0, t0 + every, t0 + 2 every, ... and at t_end
(also when t_end - t0 is not a multiple of `every`, so the run ends at exactly s_f); after t_end
they stay fixed while training continues. t counts optimizer updates from 1 (the loop's step
after the update); a step of 0 never happens, so t0 = 0 starts at `every`.

At a pruning step the mask keeps the largest |w| of the weights after that step's update, ranked
globally across every pruned kernel (models.prune: the block kernels named by `include`; the
embeddings, LayerNorms, biases, pooler and task head are never pruned), with exactly
round(s_t * N) weights pruned, ties broken by position (models.prune.magnitude_masks). Weights
pruned earlier are pruned first, so once zero a weight stays zero. After every update the masked
weights are set to exactly 0 (their update is -w, and w + (-w) = 0 in floating point); the
optimizer's moments of masked weights keep running, as in Zhu & Gupta's implementation, but never
reach the weights.

The wrapper's state (`PruneState`: the wrapped optimizer's state, one boolean mask per pruned
kernel and a bool placeholder of shape () for every other parameter, and its update count) is part
of the optimizer state, so checkpoints carry it and a resumed run prunes exactly as an
uninterrupted one. The masks have their kernel's path and shape, so
flaxen.sharding.optimizer_state_shardings gives each its kernel's sharding; the placeholders and
the count are replicated.

Config (configs/prune/*.yaml, `prune=gradual`):
    name              none | gradual
    sparsity          s_f in [0, 1): the fraction of the pruned weights that are 0 from end_step on
    initial_sparsity  s_i in [0, sparsity] at start_step (default 0)
    start_step        t0 >= 0
    end_step          t_end: start_step < end_step <= steps
    every             dt >= 1: steps between mask updates
    include           which block kernels count: query, key, value, out, intermediate, output
Full fine-tuning only (peft=none): a PEFT method freezes the kernels being pruned.

results.json holds `prune`: the settings, the number of pruned weights N and the measured final
sparsity (the fraction of them that are exactly 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxen import update_rules
from flaxen.errors import ConfigError
from models import prune as model_prune

NAMES = ("none", "gradual")


@dataclass
class PruneConfig:
    """Gradual magnitude pruning (see flaxen/pruning.py): `name` none | gradual; target `sparsity`,
    `initial_sparsity`, `start_step`, `end_step`, `every`, and the block kernels it counts (`include`)."""
    name: str = "none"
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: Optional[int] = None
    every: int = 10
    include: List[str] = field(default_factory=lambda: list(model_prune.BLOCK_KERNELS))


def enabled(cfg: Any) -> bool:
    """Whether the TrainConfig `cfg` prunes."""
    prune = cfg.get("prune") if hasattr(cfg, "get") else getattr(cfg, "prune", None)
    return prune is not None and prune.name != "none"


def check_config(cfg: Any) -> None:
    """ConfigError naming the key for a `prune` setting that cannot work (flaxen.config.validate)."""
    prune = cfg.get("prune") if hasattr(cfg, "get") else getattr(cfg, "prune", None)
    if prune is None:
        return
    if prune.name not in NAMES:
        raise ConfigError(f"prune.name={prune.name!r}: expected one of {', '.join(NAMES)}")
    if prune.name == "none":
        defaults = PruneConfig()
        for key in ("sparsity", "initial_sparsity", "start_step", "end_step", "every", "include"):
            if _plain(getattr(prune, key)) != _plain(getattr(defaults, key)):
                raise ConfigError(f"prune.{key}={_plain(getattr(prune, key))!r} has no effect with prune.name=none: "
                                  "choose prune=gradual to prune during training")
        return
    if not 0.0 <= prune.sparsity < 1.0:
        raise ConfigError(f"prune.sparsity={prune.sparsity}: expected a fraction in [0, 1)")
    if not 0.0 <= prune.initial_sparsity <= prune.sparsity:
        raise ConfigError(f"prune.initial_sparsity={prune.initial_sparsity}: expected a fraction in [0, "
                          f"prune.sparsity={prune.sparsity}]")
    if prune.start_step is None or prune.start_step < 0:
        raise ConfigError(f"prune.start_step={prune.start_step}: expected a step >= 0")
    if prune.end_step is None:
        raise ConfigError("prune.end_step is null: set the step at which prune.sparsity is reached "
                          f"(prune.start_step={prune.start_step} < end_step <= steps={cfg.steps})")
    if not prune.start_step < prune.end_step <= cfg.steps:
        raise ConfigError(f"prune.start_step={prune.start_step}, prune.end_step={prune.end_step}: expected "
                          f"start_step < end_step <= steps={cfg.steps}")
    if prune.every is None or prune.every < 1:
        raise ConfigError(f"prune.every={prune.every}: expected a number of steps >= 1")
    model_prune.check_include(prune.include, "prune.include")
    peft = cfg.get("peft") if hasattr(cfg, "get") else getattr(cfg, "peft", None)
    peft_name = (peft.get("name") if hasattr(peft, "get") else getattr(peft, "name", None)) if peft else None
    if peft_name not in (None, "none"):
        raise ConfigError(f"prune.name={prune.name} with peft={peft_name}: gradual pruning trains the block "
                          "kernels it prunes, which a PEFT method freezes; use peft=none (full fine-tuning)")


def _plain(value):
    return list(value) if not isinstance(value, (str, int, float, type(None))) else value


def sparsity_at(prune: Any, step: int) -> float:
    """s_t of the cubic schedule at `step` (clamped to [start_step, end_step]; see the module docstring)."""
    t0, t_end = prune.start_step, prune.end_step
    remaining = (1.0 - min(max(step - t0, 0), t_end - t0) / (t_end - t0)) ** 3
    # s_f + (s_i - s_f) r, written so that it is exactly s_i at t0 and exactly s_f at t_end
    return prune.initial_sparsity * remaining + prune.sparsity * (1.0 - remaining)


def pruning_steps(prune: Any) -> list[int]:
    """The steps at which masks are recomputed: start_step, + every, ... up to end_step, and
    end_step itself (steps >= 1 only)."""
    steps = set(range(prune.start_step, prune.end_step + 1, prune.every)) | {prune.end_step}
    return sorted(t for t in steps if t >= 1)


def schedule(prune: Any, total: int) -> list[tuple[int, int]]:
    """(step, number of weights pruned from that step on) for each pruning step, of `total` weights."""
    return [(t, model_prune.num_pruned(total, sparsity_at(prune, t))) for t in pruning_steps(prune)]


class PruneState(NamedTuple):
    inner: Any
    masks: Any     # the params' pytree: bool masks of the pruned kernels (False = 0), bool () elsewhere
    count: jax.Array  # optimizer updates applied so far (int32)


def selected_leaves(params: Any, include) -> list[bool]:
    """For each leaf of `params` (jax.tree.leaves order), whether it is a pruned kernel."""
    from flaxen.checkpoint import variable_path  # imported here: flaxen.config imports this module

    return [model_prune.is_block_kernel(variable_path(path), include)
            for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def gradual_pruning(optimizer: optax.GradientTransformation, selected: list[bool],
                    steps: list[tuple[int, int]]) -> optax.GradientTransformation:
    """`optimizer` followed by magnitude masks on the leaves marked in `selected`, recomputed at
    each (step, number pruned) of `steps` and re-applied after every update (module docstring)."""
    chosen = [i for i, s in enumerate(selected) if s]
    when = jnp.asarray([t for t, _ in steps] or [0], jnp.int32)
    how_many = jnp.asarray([k for _, k in steps] or [0], jnp.int32)

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        masks = [jnp.ones(jnp.shape(x) if s else (), bool) for x, s in zip(leaves, selected)]
        return PruneState(optimizer.init(params), jax.tree.unflatten(treedef, masks), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("gradual pruning needs the parameters in optimizer.update")
        updates, inner = optimizer.update(updates, state.inner, params)
        update_leaves, treedef = jax.tree.flatten(updates)
        param_leaves = jax.tree.leaves(params)
        mask_leaves = jax.tree.leaves(state.masks)
        count = state.count + 1
        hit = when == count
        old = [mask_leaves[i] for i in chosen]
        candidates = [param_leaves[i] + update_leaves[i] for i in chosen]  # what apply_updates will compute
        new = jax.lax.cond(jnp.any(hit), lambda: model_prune.magnitude_masks(
            candidates, jnp.sum(jnp.where(hit, how_many, 0)), old), lambda: old)
        for i, mask in zip(chosen, new):
            update_leaves[i] = jnp.where(mask, update_leaves[i], -param_leaves[i])
            mask_leaves[i] = mask
        return (jax.tree.unflatten(treedef, update_leaves),
                PruneState(inner, jax.tree.unflatten(jax.tree.structure(state.masks), mask_leaves), count))

    return optax.GradientTransformation(init, update)


@update_rules.register
def build(cfg: Any, model: Any, params: Any):
    """The update rule of `cfg.prune` (flaxen.update_rules): None without pruning."""
    if not enabled(cfg):
        return None
    selected = selected_leaves(params, cfg.prune.include)
    if not any(selected):
        raise ConfigError(f"prune.include={list(cfg.prune.include)}: none of these kernels is trained in this run")
    total = sum(int(np.prod(np.shape(x))) for x, s in zip(jax.tree.leaves(params), selected) if s)
    steps = schedule(cfg.prune, total)
    return lambda optimizer: gradual_pruning(optimizer, selected, steps)


def record(cfg: Any, params: Any) -> dict | None:
    """results.json's `prune` entry for the final `params`: the settings, the number of pruned
    weights and the measured sparsity (the fraction of them that are exactly 0); None without
    pruning."""
    if not enabled(cfg):
        return None
    prune = cfg.prune
    kernels = [x for x, s in zip(jax.tree.leaves(params), selected_leaves(params, prune.include)) if s]
    zeros = int(jax.jit(lambda xs: sum(jnp.sum(x == 0, dtype=jnp.int32) for x in xs))(kernels))
    total = sum(int(np.prod(x.shape)) for x in kernels)
    return {"name": prune.name, "target_sparsity": float(prune.sparsity),
            "initial_sparsity": float(prune.initial_sparsity), "start_step": int(prune.start_step),
            "end_step": int(prune.end_step), "every": int(prune.every), "include": list(prune.include),
            "weights": total, "zeros": zeros, "sparsity": zeros / total}
