"""The jitted train and eval steps over pure pytrees.

Why: the model is split once (`graphdef, params, rest = nnx.split(model, trainable, ...)`) and
the steps rebuild it inside the trace (`nnx.merge`), so a step call does no Python graph
traversal; `rest` (frozen weights and other variables) is a separate argument that is never
differentiated and gets no optimizer state.

train_step(params, opt_state, rest, batch, step, rng) -> (params, opt_state, metrics)
    batch: dict of [batch, ...] arrays sharded over (data, fsdp). With `accum_steps` > 1 the
    batch is cut into `accum_steps` micro-batches of [batch / accum_steps, ...] (rows
    j, j + accum_steps, ... form micro-batch j, so each stays spread over the batch shards);
    their gradients are summed, each normalised by the whole batch's loss weight, so one
    update equals the update of the large batch.
    Dropout: key fold_in(fold_in(rng, step), micro_batch). params and opt_state are donated.
    metrics: loss (mean over the batch's scored tokens/rows), grad_norm (before clipping), weight,
    and learning_rate (the `schedule` at this update) when a schedule is given.
eval_step(params, rest, batch) -> task.eval_outputs(...) (replicated).

`task` is a flaxen Task (flaxen/tasks/): it names the model's inputs and turns the model's output
into loss terms and evaluation outputs; the steps never look at its name.

`activation_sharding` (flaxen.sharding.activation_sharding(mesh, rules)) is entered while the
model is traced, so the models' block-boundary constraints (models.layers.constrain) apply.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxen import tasks
from flaxen.optim import global_norm
from models import layers


def _forward(graphdef, params, rest, task, batch: dict, rng, activation_sharding=None):
    """The model's output (models.ModelOutput) on `batch`; dropout when `rng` is given."""
    model = nnx.merge(graphdef, params, rest)
    deterministic = rng is None
    with layers.activation_sharding(activation_sharding):
        return model(batch["input_ids"], **task.model_inputs(batch), deterministic=deterministic, dropout_rng=rng)


def _micro_batches(batch: dict, accum_steps: int) -> dict:
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum_steps} micro-batches")
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, task, optimizer: optax.GradientTransformation, *, schedule=None, accum_steps: int = 1,
                    param_shardings: Any = None, opt_shardings: Any = None, rest_shardings: Any = None,
                    batch_sharding: Any = None, replicated: Any = None, donate: bool = True,
                    activation_sharding: Any = None):
    """The jitted train step (see the module docstring). `task`: a Task or its name. Shardings
    None = let jit decide."""
    task = tasks.get(task)

    def loss_fn(params, rest, batch, rng, weight):
        output = _forward(graphdef, params, rest, task, batch, rng, activation_sharding)
        loss_sum, _ = task.loss_terms(output, batch)
        return loss_sum / weight, loss_sum

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, rest, batch, step, rng):
        rng = jax.random.fold_in(rng, step)
        weight = jnp.maximum(task.loss_weight(batch), 1.0)
        if accum_steps == 1:
            grads, loss_sum = grad_fn(params, rest, batch, rng, weight)
        else:
            def accumulate(carry, inputs):
                grad_sum, loss_total = carry
                micro, index = inputs
                grads, loss_sum = grad_fn(params, rest, micro, jax.random.fold_in(rng, index), weight)
                return (jax.tree.map(jnp.add, grad_sum, grads), loss_total + loss_sum), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss_sum), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32)),
                (_micro_batches(batch, accum_steps), jnp.arange(accum_steps)))
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / weight, "grad_norm": grad_norm, "weight": weight}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
        return params, opt_state, metrics

    shardings = dict(
        in_shardings=(param_shardings, opt_shardings, rest_shardings, batch_sharding, replicated, replicated),
        out_shardings=(param_shardings, opt_shardings, replicated),
    ) if param_shardings is not None else {}
    return jax.jit(train_step, donate_argnums=(0, 1) if donate else (), **shardings)


def make_eval_step(graphdef, task, *, param_shardings: Any = None, rest_shardings: Any = None,
                   batch_sharding: Any = None, replicated: Any = None, activation_sharding: Any = None):
    """The jitted eval step: deterministic forward pass, then task.eval_outputs."""
    task = tasks.get(task)

    def eval_step(params, rest, batch):
        output = _forward(graphdef, params, rest, task, batch, None, activation_sharding)
        return task.eval_outputs(output, batch)

    shardings = dict(in_shardings=(param_shardings, rest_shardings, batch_sharding),
                     out_shardings=replicated) if param_shardings is not None else {}
    return jax.jit(eval_step, **shardings)
