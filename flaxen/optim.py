"""Learning-rate schedules and the optax optimizer, with weight decay masked off biases and norms.

Why: one place turns the `optimizer` and `schedule` config groups into an optax
GradientTransformation, so the train step only calls `update`.

- Schedules are functions of the optimizer update count `t` (0 for the first update), for
  `total_steps` updates with peak rate `lr`:
    constant       lr
    warmup_linear  lr * t / warmup for t < warmup, then linear to end = end_lr_ratio * lr at t = total_steps
    warmup_cosine  the same warmup, then end + (lr - end) * (1 + cos(pi * progress)) / 2
  (progress = (t - warmup) / (total_steps - warmup)).
- AdamW applies decoupled weight decay (scaled by the learning rate) only where
  `decay_mask` is True: every parameter except biases and LayerNorm scales and biases
  (the BERT / GPT-2 convention).
- Adafactor (Shazeer & Stern 2018; T5's optimizer) keeps factored second moments of every matrix
  with both dimensions >= 128 and, with `multiply_by_parameter_scale`, makes each update relative
  to the parameter's RMS, so T5's unit-variance embeddings and the small attention matrices move
  at the same relative rate (AdamW's absolute steps barely move T5's embeddings); its weight decay
  (`weight_decay` > 0) is masked and scaled by the learning rate like AdamW's.
- Global-norm clipping (`clip_norm` > 0) runs before the optimizer.
Gradient accumulation lives in the train step (flaxen.loop), which sums micro-batch gradients
normalised by the whole batch's token count, so one update sees exactly the large batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxen.errors import ConfigError


def make_schedule(schedule_cfg: Any, lr: float, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the update count (see the module docstring)."""
    name, warmup = schedule_cfg.name, int(schedule_cfg.warmup_steps)
    end = float(lr) * float(schedule_cfg.end_lr_ratio)
    if name == "constant":
        return optax.constant_schedule(float(lr))
    decay_steps = max(int(total_steps) - warmup, 1)
    if name == "warmup_linear":
        decay = optax.linear_schedule(float(lr), end, decay_steps)
    elif name == "warmup_cosine":
        decay = optax.cosine_decay_schedule(float(lr), decay_steps, alpha=end / float(lr))
    else:
        raise ConfigError(f"schedule.name={name!r}: expected constant, warmup_linear or warmup_cosine")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, float(lr), warmup), decay], [warmup])


def _is_norm(module: Any) -> bool:
    return isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def decay_mask(model: nnx.Module, params: nnx.State):
    """Pytree of bools shaped like `params`: False for biases and for parameters of norm layers."""
    norm_paths = {tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and _is_norm(node)}

    def keys(path):
        return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))

    def decays(path, _):
        names = keys(path)
        return not (names[-1] == "bias" or names[:-1] in norm_paths)

    return jax.tree_util.tree_map_with_path(decays, params)


def _decoupled(weight_decay: float, schedule: optax.Schedule):
    """Adafactor's decay rate as AdamW's: weight_decay * learning rate at each update (optax applies
    Adafactor's rate unscaled, so a rate of 0.01 would shrink every weight by 1 % a step); None if 0."""
    if not weight_decay:
        return None
    return lambda count: float(weight_decay) * schedule(count)


def make_optimizer(optimizer_cfg: Any, schedule: optax.Schedule, mask) -> optax.GradientTransformation:
    """Clipping (if clip_norm > 0) then AdamW or Adafactor (decay where `mask` is True) or SGD with momentum."""
    name = optimizer_cfg.name
    if name == "adamw":
        core = optax.adamw(schedule, b1=optimizer_cfg.b1, b2=optimizer_cfg.b2, eps=optimizer_cfg.eps,
                           weight_decay=optimizer_cfg.weight_decay, mask=mask)
    elif name == "adafactor":
        core = optax.adafactor(schedule, decay_rate=optimizer_cfg.decay_rate,
                               multiply_by_parameter_scale=optimizer_cfg.multiply_by_parameter_scale,
                               clipping_threshold=optimizer_cfg.clipping_threshold or None,
                               momentum=optimizer_cfg.momentum or None,
                               weight_decay_rate=_decoupled(optimizer_cfg.weight_decay, schedule),
                               weight_decay_mask=mask if optimizer_cfg.weight_decay else None)
    elif name == "sgd":
        core = optax.chain(
            optax.add_decayed_weights(optimizer_cfg.weight_decay, mask=mask) if optimizer_cfg.weight_decay else optax.identity(),
            optax.sgd(schedule, momentum=optimizer_cfg.momentum or None))
    else:
        raise ConfigError(f"optimizer.name={name!r}: expected adamw, adafactor or sgd")
    if optimizer_cfg.clip_norm and optimizer_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer_cfg.clip_norm), core)
    return core


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over all leaves, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
