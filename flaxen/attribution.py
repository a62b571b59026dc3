"""Which input tokens a prediction rests on: integrated gradients and gradient × input.

Integrated gradients (Sundararajan, Taly and Yan 2017, "Axiomatic Attribution for Deep Networks"):

    IG_i = (x_i - b_i) * integral over a in [0, 1] of  df(b + a (x - b)) / dx_i  da

where x [seq, embed] are one example's word embeddings (`model.embed_tokens(input_ids)`, what
`model(inputs_embeds=...)` replaces: position and token-type embeddings and BERT's embedding
LayerNorm still apply, as in captum's Hugging Face tutorials), b the baseline and f one scalar of
the model's output (a flaxen.tasks.base.AttributionTarget, chosen by the task's
`attribution_targets`: a class logit, a tag logit at one token, a QA start or end logit). A token's
attribution is the sum of IG_i over its embedding axis. Completeness: the attributions of the
exact integral sum to f(x) - f(b); each `Attribution` reports both sides and their `gap`, the
quadrature's error.

Baselines: "zeros" (the zero vector at every position), "pad" (the pad token's embedding at every
position) or an array [seq, embed].

Quadrature rules, by captum's names (`method`): "gausslegendre" (captum's default; Gauss-Legendre
nodes mapped to [0, 1]), "riemann_left", "riemann_right", "riemann_middle" (n points, weights 1/n,
as captum) and "riemann_trapezoid" (n points 0, 1/(n-1), ..., 1, the trapezoid rule's weights,
summing to 1; captum uses the same points with weights 1/n halved at the ends, which sum to
(n-1)/n, so its attributions are ours times (n-1)/n and its completeness gap does not shrink below
|f(x) - f(b)| / n).

Gradient × input: the gradient at x times x, per token summed over the embedding axis: the
one-point rule at a = 1 with the zero baseline, so it runs through the same code and reports
f(0) as its baseline value (it satisfies no completeness; the gap says by how much).

Performance: the path points run in chunks of `batch_size` through one jitted function (the last
chunk is padded with zero-weight points, so every chunk has one shape and compiles once); a chunk
is one forward pass over `batch_size` points and one backward pass per target (jax.jacrev). Target
indices are traced arguments: another class or token reuses the compiled function.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxen.errors import ConfigError

METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle", "riemann_right")
BASELINES = ("zeros", "pad")


@dataclasses.dataclass(frozen=True)
class Attribution:
    """One target's attributions on one example.

    target: the AttributionTarget's name; method: how they were computed, in words; scores [seq]
    float32: per token, summed over the embedding axis; value: f(x); baseline_value: f(baseline)."""

    target: str
    method: str
    scores: np.ndarray
    value: float
    baseline_value: float

    @property
    def total(self) -> float:
        """The sum of the attributions."""
        return float(np.sum(self.scores, dtype=np.float64))

    @property
    def delta(self) -> float:
        """f(x) - f(baseline): what the attributions of the exact integral sum to."""
        return self.value - self.baseline_value

    @property
    def gap(self) -> float:
        """total - delta: the completeness error (the quadrature's, for integrated gradients)."""
        return self.total - self.delta


def quadrature(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(points [steps], weights [steps]) float64 on [0, 1] of the rule `method` (see the module
    docstring); the weights sum to 1. ConfigError for an unknown rule or too few steps."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    least = 2 if method == "riemann_trapezoid" else 1
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < least:
        raise ConfigError(f"steps={steps!r}: expected an integer >= {least} for method={method}")
    n = int(steps)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if method == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
        return np.linspace(0.0, 1.0, n), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)


def _example(input_ids, attention_mask, token_type_ids):
    """input_ids [seq] or [1, seq] -> ([1, seq] int32, mask [1, seq], types [1, seq] | None)."""
    ids = np.asarray(input_ids, np.int32)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one example [seq] or [1, seq], got shape {np.shape(input_ids)}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(ids.shape)
    types = None if token_type_ids is None else np.asarray(token_type_ids, np.int32).reshape(ids.shape)
    return ids, mask, types


def baseline_embeddings(model: Any, input_ids, baseline: Any = "zeros", pad_token_id: int | None = None) -> np.ndarray:
    """The baseline [seq, embed] float32 for one example's input_ids [seq] (see the module docstring);
    "pad" uses `pad_token_id` (default: the model config's)."""
    ids, _, _ = _example(input_ids, None, None)
    embeds = np.asarray(model.embed_tokens(jnp.asarray(ids)), np.float32)[0]
    if isinstance(baseline, str):
        if baseline == "zeros":
            return np.zeros_like(embeds)
        if baseline == "pad":
            pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
            return np.asarray(model.embed_tokens(jnp.full_like(jnp.asarray(ids), int(pad))), np.float32)[0]
        raise ConfigError(f"baseline={baseline!r}: expected one of {', '.join(BASELINES)} or an array [seq, embed]")
    array = np.asarray(baseline, np.float32)
    if array.shape != embeds.shape:
        raise ConfigError(f"baseline: an array must have the embeddings' shape {embeds.shape} [seq, embed], "
                          f"got {array.shape}")
    return array


def _select(output, fields: tuple[str, ...], indices):
    """[batch, k] float32: output.<fields[j]>[:, *indices[j]] for each target j."""
    columns = [getattr(output, field)[(slice(None), *index)] for field, index in zip(fields, indices)]
    return jnp.stack(columns, -1).astype(jnp.float32)


def _call(model, embeds, attention_mask, token_type_ids):
    rows = embeds.shape[0]
    mask = jnp.broadcast_to(attention_mask, (rows, attention_mask.shape[1]))
    types = None if token_type_ids is None else jnp.broadcast_to(token_type_ids, mask.shape)
    return model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types, deterministic=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "fields"))
def _weighted_gradients(graphdef, state, fields, indices, embeds, baseline, points, weights, attention_mask,
                        token_type_ids):
    """sum_m weights[m] * d f_k(b + points[m] (x - b)) / dx for each target k: [k, seq, embed]."""
    model = nnx.merge(graphdef, state)

    def targets(path):  # [m, seq, embed] -> [k]: each target summed over the path points
        return jnp.sum(_select(_call(model, path, attention_mask, token_type_ids), fields, indices), axis=0)

    path = baseline[None] + points[:, None, None] * (embeds - baseline)[None]
    jacobian = jax.jacrev(targets)(path)  # [k, m, seq, embed]
    return jnp.einsum("m,kmse->kse", weights, jacobian)


@functools.partial(jax.jit, static_argnames=("graphdef", "fields"))
def _values(graphdef, state, fields, indices, embeds, attention_mask, token_type_ids):
    """[rows, k]: the targets at each row of embeds [rows, seq, embed]."""
    model = nnx.merge(graphdef, state)
    return _select(_call(model, embeds, attention_mask, token_type_ids), fields, indices)


def _attribute(model, input_ids, targets, attention_mask, token_type_ids, baseline, points, weights,
               batch_size, describe) -> list[Attribution]:
    if not targets:
        raise ValueError("no attribution targets")
    ids, mask, types = _example(input_ids, attention_mask, token_type_ids)
    graphdef, state = nnx.split(model)
    fields = tuple(t.field for t in targets)
    indices = tuple(tuple(jnp.asarray(i, jnp.int32) for i in t.index) for t in targets)
    embeds = jnp.asarray(model.embed_tokens(jnp.asarray(ids)), jnp.float32)[0]
    baseline = jnp.asarray(baseline, jnp.float32)
    mask, types = jnp.asarray(mask), None if types is None else jnp.asarray(types)
    values = np.asarray(_values(graphdef, state, fields, indices, jnp.stack([embeds, baseline]), mask, types))
    chunk = max(1, min(int(batch_size), len(points)))
    padded = -len(points) % chunk
    points = np.concatenate([points, np.zeros(padded)]).astype(np.float32)
    weights = np.concatenate([weights, np.zeros(padded)]).astype(np.float32)
    gradients = None
    for start in range(0, len(points), chunk):
        part = _weighted_gradients(graphdef, state, fields, indices, embeds, baseline,
                                   jnp.asarray(points[start:start + chunk]), jnp.asarray(weights[start:start + chunk]),
                                   mask, types)
        gradients = part if gradients is None else gradients + part
    scores = np.asarray(jnp.sum((embeds - baseline)[None] * gradients, axis=-1))  # [k, seq]
    return [Attribution(target=t.name, method=describe, scores=scores[k], value=float(values[0, k]),
                        baseline_value=float(values[1, k])) for k, t in enumerate(targets)]


def integrated_gradients(model: Any, input_ids, targets: Sequence[Any], *, attention_mask=None, token_type_ids=None,
                         baseline: Any = "zeros", steps: int = 50, method: str = "gausslegendre",
                         batch_size: int = 32, pad_token_id: int | None = None) -> list[Attribution]:
    """Integrated gradients of each target (AttributionTarget: name, field, index) on one example.

    input_ids [seq] (or [1, seq]); attention_mask, token_type_ids alike (mask default all ones);
    baseline "zeros" | "pad" | an array [seq, embed]; `steps` path points of the rule `method`,
    `batch_size` of them per compiled chunk. Returns one Attribution per target, in order."""
    points, weights = quadrature(steps, method)
    reference = baseline_embeddings(model, input_ids, baseline, pad_token_id)
    name = baseline if isinstance(baseline, str) else "given"
    describe = f"integrated gradients ({method}, {steps} steps, {name} baseline)"
    return _attribute(model, input_ids, targets, attention_mask, token_type_ids, reference, points, weights,
                      batch_size, describe)


def gradient_x_input(model: Any, input_ids, targets: Sequence[Any], *, attention_mask=None,
                     token_type_ids=None) -> list[Attribution]:
    """Gradient × input of each target on one example (shapes as `integrated_gradients`);
    baseline_value is f at the zero embeddings."""
    reference = baseline_embeddings(model, input_ids, "zeros")
    return _attribute(model, input_ids, targets, attention_mask, token_type_ids, reference, np.ones(1), np.ones(1),
                      1, "gradient x input")
