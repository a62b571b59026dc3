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

With `privacy` (a flaxen.privacy.Plan) the train step is DP-SGD instead (`private_gradient`):
per-example gradients (jax.vmap over the rows, each row's loss the task's loss on a batch of that
one row, normalised by its own loss weight; padding rows weigh 0), each scaled to L2 norm <=
clip_norm, summed over the batch (over every micro-batch with accumulation), plus Gaussian noise
of std noise_multiplier * clip_norm added once, divided by the expected batch size. Keys:
split(fold_in(rng, step)) -> (dropout, noise); an example's dropout key folds in its micro-batch
and its row. With accumulation the rows are sorted by length, micro-batches without a real row are
skipped and the others run cut to the shortest bucket length that holds their rows (lax.switch),
so a Poisson batch's padding rows and short rows cost little. metrics: loss (mean of the examples' losses), grad_norm (of the noisy mean gradient),
weight and examples (real rows), clipped_fraction, learning_rate. The model is traced without
activation sharding constraints inside the per-example vmap. The non-private step is unchanged.

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
        with jax.named_scope("loss"):  # named scopes label the ops in profiles (scripts/profile_step.py)
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
        params, opt_state, grad_norm = _apply_update(optimizer, grads, opt_state, params)
        metrics = {"loss": loss_sum / weight, "grad_norm": grad_norm, "weight": weight}
        return params, opt_state, _with_learning_rate(metrics, schedule, step)

    return _jit_train_step(train_step, donate, param_shardings, opt_shardings, rest_shardings, batch_sharding,
                           replicated)


def _apply_update(optimizer, grads, opt_state, params):
    """(new params, new optimizer state, the gradients' global norm): one optimizer update."""
    with jax.named_scope("optimizer"):  # named scopes label the ops in profiles (scripts/profile_step.py)
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grad_norm


def _with_learning_rate(metrics: dict, schedule, step) -> dict:
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
    return metrics


def _jit_train_step(train_step, donate: bool, param_shardings, opt_shardings, rest_shardings, batch_sharding,
                    replicated):
    """jit of a train_step(params, opt_state, rest, batch, step, rng) with its shardings (none: jit
    decides) and params / opt_state donated."""
    shardings = dict(
        in_shardings=(param_shardings, opt_shardings, rest_shardings, batch_sharding, replicated, replicated),
        out_shardings=(param_shardings, opt_shardings, replicated),
    ) if param_shardings is not None else {}
    return jax.jit(train_step, donate_argnums=(0, 1) if donate else (), **shardings)


# ---------------------------------------------------------------------- DP-SGD (flaxen.privacy)

def _row_weights(batch: dict):
    """[rows] float32: 1 for real rows (the batch's `valid` field), else 1 everywhere."""
    if "valid" in batch:
        return batch["valid"].astype(jnp.float32)
    return jnp.ones(batch["input_ids"].shape[:1], jnp.float32)


def per_example_grads(graphdef, task, params, rest, batch: dict, rng=None):
    """(gradients with a leading [rows] axis, losses [rows]): each row's gradient of the task's loss
    on a batch of that one row, loss_sum / max(loss_weight, 1), times its `valid` weight (padding
    rows: 0). Dropout when `rng` is given: row i uses fold_in(rng, i)."""
    task = tasks.get(task)

    def example_loss(params, row, key):
        one = jax.tree.map(lambda x: x[None], row)
        output = _forward(graphdef, params, rest, task, one, key)
        loss_sum, _ = task.loss_terms(output, one)
        loss = loss_sum / jnp.maximum(task.loss_weight(one), 1.0)
        return loss * _row_weights(one)[0]

    grad_fn = jax.value_and_grad(example_loss)
    if rng is None:
        losses, grads = jax.vmap(grad_fn, in_axes=(None, 0, None))(params, batch, None)
    else:
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch["input_ids"].shape[0]))
        losses, grads = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, batch, keys)
    return grads, losses


def per_example_norms(grads) -> jax.Array:
    """[rows] float32: the L2 norm of each row's gradient over all leaves."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
                        for g in jax.tree.leaves(grads)))


def clip_factors(norms: jax.Array, clip_norm: float) -> jax.Array:
    """[rows]: min(1, clip_norm / norm), the scale that brings each gradient to norm <= clip_norm."""
    return jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))


def _clipped_sum(graphdef, task, clip_norm, params, rest, batch, rng):
    """(sum of the rows' clipped gradients, [loss sum, real rows, clipped rows])."""
    grads, losses = per_example_grads(graphdef, task, params, rest, batch, rng)
    norms = per_example_norms(grads)
    real = _row_weights(batch)
    factors = clip_factors(norms, clip_norm) * (real > 0)
    summed = jax.tree.map(lambda g: jnp.einsum("b,b...->...", factors.astype(g.dtype), g), grads)
    stats = jnp.stack([jnp.sum(losses), jnp.sum(real), jnp.sum((norms > clip_norm) * real)])
    return summed, stats


def _row_lengths(batch: dict):
    """[rows] int32: one past each row's last attended position (0 for a row with none)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return jnp.full(batch["input_ids"].shape[:1], batch["input_ids"].shape[1], jnp.int32)
    positions = jnp.arange(1, mask.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(mask > 0, positions, 0), axis=1)


def _length_order(real, needed, accum_steps: int):
    """[rows] indices that reorder a batch so that micro-batch 0, 1, ... of `_micro_batches` (which
    takes rows j, j + accum_steps, ... as micro-batch j) hold the real rows from the shortest
    (`needed`) to the longest, then the padding rows."""
    rows = real.shape[0]
    micro = rows // accum_steps
    order = jnp.argsort(jnp.where(real, needed, jnp.iinfo(needed.dtype).max), stable=True)
    position = jnp.arange(rows)
    return order[(position % accum_steps) * micro + position // accum_steps]


def _cut(batch: dict, length: int) -> dict:
    """The batch with its token fields ([rows, T, ...]) cut to their first `length` positions."""
    full = batch["input_ids"].shape[1]
    return jax.tree.map(lambda x: x[:, :length] if x.ndim >= 2 and x.shape[1] == full else x, batch)


def gaussian_noise(tree, key, std: float):
    """N(0, std^2) per coordinate, shaped like `tree` (one key per leaf, split from `key`)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([(std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                              for k, x in zip(keys, leaves)])


def private_gradient(graphdef, task, privacy, params, rest, batch: dict, rng, accum_steps: int = 1,
                     noise: bool = True, lengths=()):
    """(noisy mean clipped gradient, stats [loss sum, real rows, clipped rows]) of one DP-SGD step.

    `privacy`: clip_norm, noise_multiplier, batch_size (flaxen.privacy.Plan). `rng`: this step's key
    (fold_in(run key, step)); split into (dropout, noise). With `accum_steps` > 1 the clipped sums
    of the micro-batches are added before the noise, which is added once. The rows are then sorted
    by length (real rows first): a micro-batch without a real row is skipped, and one whose rows
    all fit in a shorter length of `lengths` (the data's bucket lengths) runs cut to that length
    (lax.switch; cutting trailing padding changes no real position's output), so a batch's cost
    follows its real rows' lengths. `noise=False` leaves the noise out (tests)."""
    task = tasks.get(task)
    clip_norm = float(privacy.clip_norm)
    dropout_rng, noise_rng = jax.random.split(rng)
    if accum_steps == 1:
        grad_sum, stats = _clipped_sum(graphdef, task, clip_norm, params, rest, batch, dropout_rng)
    else:
        full = batch["input_ids"].shape[1]
        options = sorted({int(n) for n in lengths if int(n) < full} | {full})
        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((3,), jnp.float32))

        branches = [lambda micro, key: zeros] + [
            lambda micro, key, n=n: _clipped_sum(graphdef, task, clip_norm, params, rest, _cut(micro, n), key)
            for n in options]
        # each row's weight and length once for the batch: they order the rows and pick each
        # micro-batch's branch
        real = _row_weights(batch) > 0
        needed = jnp.where(real, _row_lengths(batch), 0)
        order = _length_order(real, needed, accum_steps)

        def accumulate(carry, inputs):
            (micro, real, needed), index = inputs
            fits = sum((jnp.max(needed) > n).astype(jnp.int32) for n in options[:-1])  # the first option >= needed
            branch = jnp.where(jnp.any(real), 1 + fits, 0)
            result = jax.lax.switch(branch, branches, micro, jax.random.fold_in(dropout_rng, index))
            return jax.tree.map(jnp.add, carry, result), None

        sorted_rows = jax.tree.map(lambda x: x[order], (batch, real, needed))
        (grad_sum, stats), _ = jax.lax.scan(
            accumulate, zeros, (_micro_batches(sorted_rows, accum_steps), jnp.arange(accum_steps)))
    if noise:
        std = float(privacy.noise_multiplier) * clip_norm
        grad_sum = jax.tree.map(jnp.add, grad_sum, gaussian_noise(grad_sum, noise_rng, std))
    grads = jax.tree.map(lambda g: g / float(privacy.batch_size), grad_sum)
    return grads, stats


def make_private_train_step(graphdef, task, optimizer: optax.GradientTransformation, privacy, *, schedule=None,
                            accum_steps: int = 1, lengths=(), param_shardings: Any = None, opt_shardings: Any = None,
                            rest_shardings: Any = None, batch_sharding: Any = None, replicated: Any = None,
                            donate: bool = True):
    """The jitted DP-SGD train step: the signature and outputs of make_train_step's (see the module
    docstring). `lengths`: the row lengths micro-batches may be cut to (private_gradient)."""
    task = tasks.get(task)

    def train_step(params, opt_state, rest, batch, step, rng):
        grads, stats = private_gradient(graphdef, task, privacy, params, rest, batch, jax.random.fold_in(rng, step),
                                        accum_steps, lengths=lengths)
        params, opt_state, grad_norm = _apply_update(optimizer, grads, opt_state, params)
        examples = stats[1]
        metrics = {"loss": stats[0] / jnp.maximum(examples, 1.0), "grad_norm": grad_norm,
                   "weight": jnp.maximum(examples, 1.0), "examples": examples,
                   "clipped_fraction": stats[2] / jnp.maximum(examples, 1.0)}
        return params, opt_state, _with_learning_rate(metrics, schedule, step)

    return _jit_train_step(train_step, donate, param_shardings, opt_shardings, rest_shardings, batch_sharding,
                           replicated)


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
