"""AdaLoRA's training rules as an optax wrapper: Hugging Face PEFT's orthogonality regulariser
(AdaLoraModel.forward) and rank budget (RankAllocator.update_and_allocate), step for step.

Why an optimizer wrapper: the train step stays one generic `optimizer.update`, and the importance
averages, the step count and the final allocation live in the optimizer state, so checkpoints
carry them and a resumed run equals an uninterrupted one (flaxen.update_rules).

One update at step t (PEFT's `global_step`: the number of updates before this one; T = total_step
- tfinal), for the AdaLoRA factors A, E, B of every adapted layer (models.peft.adalora):
1. gradients += orth_reg_weight · ∇ mean over every A and B of ‖QQᵀ - I‖_F, ‖PᵀP - I‖_F (PEFT adds
   that regulariser to the loss; flaxen's logged loss is the task's loss without it);
2. the run's optimizer computes the update (its clipping, AdamW, ...) and the new parameters w;
3. for t < T: sensitivity I = |w · g| (g: the gradient the optimizer stepped with, after its
   clipping, as PEFT sees `p.grad` after `optimizer.step()`), Ī ← beta1 Ī + (1 - beta1) I,
   uncertainty Ū ← beta2 Ū + (1 - beta2) |I - Ī|;
4. the budget follows PEFT's budget_schedule: init_r · n for t ≤ tinit, then
   int((init_r n - target_r n) (1 - (t - tinit) / (T - tinit))³ + target_r n) down to
   target_r · n at T. When tinit < t < T and t % deltaT == 0, and at t = T, each singular value
   is scored Ī_E Ū_E + mean over its A row of Ī Ū + mean over its B column of Ī Ū, the
   (init_r n - budget)-th smallest score over all layers is the threshold, and every E at or below
   it is set to 0 (PEFT's mask_to_budget; between allocations the optimizer may grow them back);
   at t = T the averages are reset and that allocation becomes final: for t > T the pruned E are
   set to 0 after every update (PEFT's mask_using_rank_pattern).

`adalora(optimizer, config, modules, clip_norm=None)` builds the wrapper (tests use it directly);
the registered rule builds it for every run with peft.name=adalora (total_step null = `steps`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxen import update_rules
from flaxen.errors import ConfigError
from models import peft
from models.peft.adalora import AdaLoRAParam, adalora_layers, orthogonality


class AdaLoRAState(NamedTuple):
    """count: updates done (the next update's PEFT global_step). exp_avg_ipt / exp_avg_unc: the
    smoothed sensitivity and uncertainty, shaped like the AdaLoRA parameters (A, E, B of every
    layer). rank_pattern: shaped like the E's, True where the latest allocation kept the singular
    value (all True before the first). inner: the wrapped optimizer's state."""
    count: jax.Array
    exp_avg_ipt: Any
    exp_avg_unc: Any
    rank_pattern: Any
    inner: Any


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """(budget, mask now?) at `step`: Hugging Face PEFT's RankAllocator.budget_schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
    return budget, step % deltaT == 0


def _key(entry) -> Any:
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    return getattr(entry, "name", entry)


def _plain(path) -> tuple:
    """A pytree path of an nnx.State leaf -> the parameter's path (Variable `.value` dropped)."""
    keys = tuple(_key(k) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def _by_path(tree) -> dict:
    return {_plain(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _replace(tree, new: dict):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: new.get(_plain(path), leaf), tree)


_E_FILTER = nnx.All(AdaLoRAParam, nnx.PathContains("lora_e"))


def adalora(optimizer: optax.GradientTransformation, config: Any, modules: Sequence[tuple], *,
            clip_norm: float | None = None) -> optax.GradientTransformation:
    """`optimizer` with AdaLoRA's rules (module docstring) for the AdaLoRA layers at `modules`
    (their paths in the parameter tree, e.g. ('backbone', 'layers', 0, 'attention', 'query')).

    config: a models.peft AdaLoRAConfig with total_step set. clip_norm: the global-norm clipping
    inside `optimizer` (None: none), so importance uses the gradient the optimizer steps with.
    The wrapper's update needs `params` (an nnx.State holding every module's A, E, B)."""
    if config.total_step is None:
        raise ConfigError("peft.total_step: expected a number of steps for AdaLoRA's budget schedule")
    modules = [tuple(m) for m in modules]
    if not modules:
        raise ConfigError(f"peft.target_modules={list(config.target_modules)}: AdaLoRA adapts no layer")
    keys = [(m + ("lora_a",), m + ("lora_e",), m + ("lora_b",)) for m in modules]
    n = len(modules)
    init_bgt, target_bgt = config.init_r * n, config.target_r * n
    final = config.total_step - config.tfinal
    schedule = [budget_schedule(t, init_bgt=init_bgt, target_bgt=target_bgt, tinit=config.tinit,
                                tfinal=config.tfinal, total_step=config.total_step, deltaT=config.deltaT)
                for t in range(final + 1)]
    # at t = T PEFT forces an allocation at the schedule's value there (the target budget)
    budgets = np.asarray([b for b, _ in schedule], np.int32)
    allocate = np.asarray([mask and t < final for t, (_, mask) in enumerate(schedule)], bool)
    allocate[final] = True
    beta1, beta2, weight = float(config.beta1), float(config.beta2), float(config.orth_reg_weight)
    clip = optax.clip_by_global_norm(clip_norm) if clip_norm else None

    def init(params):
        factors = nnx.filter_state(params, AdaLoRAParam)
        present = set(_by_path(factors))
        missing = [k for triple in keys for k in triple if k not in present]
        if missing:
            raise ConfigError(f"peft.name='adalora': the AdaLoRA factor {'.'.join(map(str, missing[0]))} is not "
                              "among the trained parameters")
        zeros = jax.tree.map(jnp.zeros_like, factors)
        kept = jax.tree.map(lambda e: jnp.ones(e.shape, jnp.bool_), nnx.filter_state(params, _E_FILTER))
        return AdaLoRAState(jnp.zeros((), jnp.int32), zeros, zeros, kept, optimizer.init(params))

    def update(grads, state: AdaLoRAState, params=None):
        if params is None:
            raise ValueError("AdaLoRA's update rule needs the parameters: optimizer.update(grads, state, params)")
        t = state.count
        p = _by_path(params)
        if weight > 0:
            reg_grads = jax.grad(orthogonality)([(p[a], p[b]) for a, _, b in keys])
            g = _by_path(grads)
            added = {}
            for (a, _, b), (ga, gb) in zip(keys, reg_grads):
                added[a] = g[a] + weight * ga
                added[b] = g[b] + weight * gb
            grads = _replace(grads, added)
        updates, inner = optimizer.update(grads, state.inner, params)
        stepped = _by_path(clip.update(grads, optax.EmptyState())[0] if clip is not None else grads)
        u = _by_path(updates)
        new = {k: p[k] + u[k] for triple in keys for k in triple}

        # importance: sensitivity and uncertainty averages (PEFT's update_ipt), for t < T
        learning = t < final
        avg_ipt, avg_unc = _by_path(state.exp_avg_ipt), _by_path(state.exp_avg_unc)
        ipt_new, unc_new = {}, {}
        for k in avg_ipt:
            ipt = jnp.abs(new[k] * stepped[k])
            smoothed = beta1 * avg_ipt[k] + (1 - beta1) * ipt
            uncertain = beta2 * avg_unc[k] + (1 - beta2) * jnp.abs(ipt - smoothed)
            ipt_new[k] = jnp.where(learning, smoothed, avg_ipt[k])
            unc_new[k] = jnp.where(learning, uncertain, avg_unc[k])

        # allocation (PEFT's mask_to_budget) at scheduled steps and at T; the final one after T
        index = jnp.clip(t, 0, final)
        allocating = (t <= final) & jnp.asarray(allocate)[index]
        scores = []
        for a, e, b in keys:
            score_a = ipt_new[a] * unc_new[a]
            score_b = ipt_new[b] * unc_new[b]
            scores.append(ipt_new[e] * unc_new[e]
                          + jnp.mean(score_a.reshape(-1, score_a.shape[-1]), axis=0)
                          + jnp.mean(score_b.reshape(score_b.shape[0], -1), axis=1))
        every = jnp.concatenate(scores)
        k = init_bgt - jnp.asarray(budgets)[index]
        threshold = jnp.where(k > 0, jnp.sort(every)[jnp.clip(k - 1, 0, every.shape[0] - 1)], -jnp.inf)
        previous = _by_path(state.rank_pattern)
        kept, new_updates = {}, {}
        for (a, e, b), score in zip(keys, scores):
            kept[e] = jnp.where(allocating, score > threshold, previous[e])
            prune = (allocating | (t > final)) & ~kept[e]
            new_updates[e] = jnp.where(prune, -p[e], u[e])
        reset = t == final
        ipt_new = {k_: jnp.where(reset, jnp.zeros_like(v), v) for k_, v in ipt_new.items()}
        unc_new = {k_: jnp.where(reset, jnp.zeros_like(v), v) for k_, v in unc_new.items()}
        state = AdaLoRAState(t + 1, _replace(state.exp_avg_ipt, ipt_new), _replace(state.exp_avg_unc, unc_new),
                             _replace(state.rank_pattern, kept), inner)
        return _replace(updates, new_updates), state

    return optax.GradientTransformation(init, update)


def rank_pattern(state: AdaLoRAState) -> dict[str, list[bool]]:
    """{dotted layer path: [kept?] per singular value} of the latest allocation in `state`."""
    return {".".join(map(str, path[:-1])): np.asarray(kept).tolist() for path, kept in _by_path(state.rank_pattern).items()}


def find_state(opt_state) -> AdaLoRAState | None:
    """The AdaLoRAState inside a run's optimizer state (None without AdaLoRA)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoRAState))
             if isinstance(s, AdaLoRAState)]
    return found[0] if found else None


@update_rules.register
def build(cfg: Any, model: Any, params: Any):
    """The AdaLoRA rule of a run with peft.name=adalora (None otherwise)."""
    config = peft.config_of(model)
    if not isinstance(config, peft.AdaLoRAConfig):
        return None
    config = peft.for_run(config, cfg.steps)
    clip_norm = cfg.optimizer.clip_norm if cfg.optimizer.clip_norm and cfg.optimizer.clip_norm > 0 else None
    modules = [path for path, _ in adalora_layers(model)]
    return lambda optimizer: adalora(optimizer, config, modules, clip_norm=clip_norm)
