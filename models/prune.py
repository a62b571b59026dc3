"""Pruning a trained model: unstructured magnitude pruning of the block weights, and structured
removal of attention heads ranked by importance.

Which weights magnitude pruning counts (`BLOCK_KERNELS`): the Dense kernels of every Transformer
block, attention query/key/value/out and the MLP's intermediate and output kernels. The token,
position and token-type embeddings (tied to the LM head), LayerNorm scales and biases, every bias,
BERT's pooler and the task head are never pruned: they are a small part of the weights and the
model is far more sensitive to them. `include` narrows the set (e.g. ("intermediate", "output"):
the MLP only).

    magnitude_prune(model, sparsity, include=BLOCK_KERNELS) -> a copy whose round(sparsity * N)
        smallest-magnitude block weights (N of them, ranked globally across all blocks) are 0
    masks_for(arrays, sparsity) -> boolean masks (False = pruned) of any pytree of arrays
    sparsity(model, include) -> the fraction of those weights that are exactly 0

Ties are broken deterministically: among weights of equal magnitude the one earlier in flattening
order (layer by layer; query, key, value, out, intermediate, output; row-major inside a kernel) is
pruned first. The selection is exact without sorting: a 32-step bisection over the IEEE bit
patterns of |w| (monotone for non-negative floats) finds the k-th smallest magnitude, and a cumulative
count ranks the weights tied with it; each step is one pass of comparisons, so it stays cheap for
the ten million weights of all-MiniLM-L6-v2 and works the same on sharded arrays.

Attention heads (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"):

    head_importance(model, batches, loss_fn) -> importance [num_layers, num_heads]
    prune_heads(model, {layer: [head, ...]}) -> a smaller model (query/key/value kernels
        [embed, heads', head_dim], out kernel [heads', head_dim, embed]; config.pruned_heads)
    prune_fraction_of_heads(model, fraction, importance, per_layer=False) -> (model, heads pruned)
    expand_pruned_heads(model) -> the same function at full size, pruned heads' weights zero

Head indices are always the original ones (0 .. num_heads - 1), as in Hugging Face's
`pruned_heads`, also for a model that was pruned before. A layer keeps at least one head.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.errors import ConfigError

# the block kernels magnitude pruning may count, and where each sits inside a block
BLOCK_KERNELS = ("query", "key", "value", "out", "intermediate", "output")
_IN_BLOCK = {"query": ("attention", "query"), "key": ("attention", "key"), "value": ("attention", "value"),
             "out": ("attention", "out"), "intermediate": ("intermediate",), "output": ("output",)}
_ATTENTION_PROJECTIONS = ("query", "key", "value")


# ----------------------------------------------------------------------------- magnitude pruning


def check_include(include: Iterable[str], key: str = "include") -> tuple[str, ...]:
    """`include` as a tuple of BLOCK_KERNELS names (in their order); ConfigError for another name
    or an empty selection."""
    include = tuple(include)
    unknown = [name for name in include if name not in BLOCK_KERNELS]
    if unknown or not include:
        raise ConfigError(f"{key}={list(include)}: expected a non-empty list of {', '.join(BLOCK_KERNELS)}")
    return tuple(name for name in BLOCK_KERNELS if name in include)


def kernel_paths(num_layers: int, include: Iterable[str] = BLOCK_KERNELS) -> list[tuple]:
    """Parameter paths ('backbone', 'layers', i, ..., 'kernel') of the pruned kernels, in the
    tie-breaking order (layer by layer, then BLOCK_KERNELS order)."""
    include = check_include(include)
    return [("backbone", "layers", i) + _IN_BLOCK[name] + ("kernel",) for i in range(num_layers) for name in include]


def is_block_kernel(path: Sequence, include: Iterable[str] = BLOCK_KERNELS) -> bool:
    """Whether a parameter path (strings or ints, e.g. a model or state path) names a kernel that
    magnitude pruning counts."""
    path = tuple(str(p) for p in path)
    if len(path) < 5 or path[:2] != ("backbone", "layers") or not path[2].isdigit() or path[-1] != "kernel":
        return False
    return any(path[3:-1] == _IN_BLOCK[name] for name in check_include(include))


def block_kernels(model, include: Iterable[str] = BLOCK_KERNELS) -> dict[tuple, nnx.Param]:
    """{path: kernel Variable} of the model's pruned kernels, in tie-breaking order."""
    variables = _variables(model)
    return {path: variables[path] for path in kernel_paths(len(model.backbone.layers), include)}


def magnitude_masks(arrays: Sequence[jax.Array], num_pruned, previous: Sequence[jax.Array] | None = None
                    ) -> list[jax.Array]:
    """Boolean masks (False = pruned) with exactly `num_pruned` False entries over all `arrays`
    together: the smallest |w|, ties to the earlier entry (flattening order). `previous` masks,
    when given, are pruned first (entries already pruned stay pruned while `num_pruned` is at
    least their number). Traceable: `num_pruned` may be a traced integer."""
    keys = []
    for index, array in enumerate(arrays):
        bits = jax.lax.bitcast_convert_type(jnp.abs(array.astype(jnp.float32)), jnp.uint32) + jnp.uint32(1)
        if previous is not None:
            bits = jnp.where(previous[index], bits, jnp.uint32(0))
        keys.append(bits)  # 0: pruned before; 1 + bits(|w|) otherwise (ordered as |w|, NaN last)
    k = jnp.asarray(num_pruned, jnp.int32)

    def count(predicate):
        return sum(jnp.sum(predicate(key), dtype=jnp.int32) for key in keys)

    def bisect(_, bounds):  # the smallest threshold t with count(key <= t) >= k
        low, high = bounds
        middle = low + (high - low) // jnp.uint32(2)
        enough = count(lambda key: key <= middle) >= k
        return jnp.where(enough, low, middle + jnp.uint32(1)), jnp.where(enough, middle, high)

    threshold, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.uint32(0), jnp.uint32(0x80000000)))
    ties_needed = k - count(lambda key: key < threshold)
    masks, ties_before = [], jnp.int32(0)
    for key in keys:
        tied = key == threshold
        rank = ties_before + jnp.cumsum(tied.reshape(-1), dtype=jnp.int32).reshape(key.shape)
        masks.append(~((key < threshold) | (tied & (rank <= ties_needed))))
        ties_before = ties_before + jnp.sum(tied, dtype=jnp.int32)
    return masks


def num_pruned(total: int, sparsity: float) -> int:
    """round(sparsity * total): how many of `total` weights a sparsity prunes."""
    return int(round(float(sparsity) * total))


def masks_for(params: Any, sparsity: float) -> Any:
    """Boolean masks (the pytree of `params`, False = pruned) with exactly round(sparsity * N)
    False entries over all N entries of the pytree's arrays: global magnitude pruning, ties to the
    entry earlier in flattening order (jax.tree.leaves, then row-major)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity={sparsity}: expected a fraction in [0, 1]")
    leaves, treedef = jax.tree.flatten(params)
    k = num_pruned(sum(int(np.prod(np.shape(x))) for x in leaves), sparsity)
    masks = jax.jit(magnitude_masks)([jnp.asarray(x) for x in leaves], k)
    return jax.tree.unflatten(treedef, masks)


def magnitude_prune(model, sparsity: float, *, include: Iterable[str] = BLOCK_KERNELS):
    """A copy of `model` (which is left as it is) with the round(sparsity * N) smallest-magnitude
    weights among the N weights of its block kernels (`include`; see the module docstring for
    which weights count) set to exactly 0, ranked globally across all blocks. One shot: no
    retraining."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={sparsity}: expected a fraction in [0, 1)")
    pruned = nnx.clone(model)
    kernels = block_kernels(pruned, include)
    masks = masks_for({"/".join(map(str, p)): v[...] for p, v in kernels.items()}, sparsity)
    for path, variable in kernels.items():
        variable.set_value(jnp.where(masks["/".join(map(str, path))], variable[...], 0).astype(variable[...].dtype))
    return pruned


def sparsity(model, include: Iterable[str] = BLOCK_KERNELS) -> float:
    """The fraction of the block kernels' weights (`include`) that are exactly 0."""
    kernels = [np.asarray(v[...]) for v in block_kernels(model, include).values()]
    return float(sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels))


# ----------------------------------------------------------------------------- attention heads


def _names(key_path) -> tuple[str, ...]:
    """A pytree key path of an nnx.State as strings, without a trailing 'value'."""
    names = [str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))) for entry in key_path]
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def head_importance(model, batches: Iterable[Any], loss_fn: Callable[[Any, Any], jax.Array], *,
                    normalize: bool = True) -> np.ndarray:
    """Importance of every attention head, [num_layers, num_heads] float32 (original head indices;
    heads already pruned get 0).

    Michel et al. 2019: a mask ξ_h = 1 multiplies each head's output, and
        I_h = Σ over batches |∂ loss_fn(model, batch) / ∂ξ_h|
    (the absolute gradient of each batch's loss, summed over the batches, as the paper's code and
    Hugging Face's bertology example accumulate it; with one batch it is |Σ over its data|). With
    `normalize`, each layer's scores are divided by their L2 norm, as in the paper, so that scores
    compare across layers. `loss_fn(model, batch)` returns a scalar (e.g. the mean task loss of a
    deterministic forward pass).

    How ξ enters: a head's output reaches the block only through its rows of the output projection,
    Σ_h ctx_h · W_out[h] + b, so scaling head h's output by ξ_h is scaling W_out[h] by ξ_h; the
    gradient is taken with respect to that scale (exactly the same function as masking the head's
    output inside attention)."""
    config = model.config
    graphdef, state = nnx.split(model)
    num_layers = len(model.backbone.layers)

    out_kernels = {("backbone", "layers", str(i), "attention", "out", "kernel"): i for i in range(num_layers)}

    def loss_of_mask(xi, state, batch):
        def scale(path, value):
            layer = out_kernels.get(_names(path))
            return value if layer is None else value * xi[layer].astype(value.dtype)[:, None, None]

        return loss_fn(nnx.merge(graphdef, jax.tree_util.tree_map_with_path(scale, state)), batch)

    gradient = jax.jit(jax.grad(loss_of_mask))
    xi = [jnp.ones((config.heads_in_layer(i),), jnp.float32) for i in range(num_layers)]
    total = [np.zeros(config.heads_in_layer(i), np.float64) for i in range(num_layers)]
    seen = 0
    for batch in batches:
        for layer, g in enumerate(gradient(xi, state, batch)):
            total[layer] += np.abs(np.asarray(g, np.float64))
        seen += 1
    if not seen:
        raise ConfigError("head_importance: `batches` yielded no batch")
    importance = np.zeros((num_layers, config.num_heads), np.float64)
    for layer, scores in enumerate(total):
        if normalize:
            norm = np.sqrt(np.sum(scores ** 2))
            scores = scores / norm if norm > 0 else scores
        importance[layer, list(config.kept_heads(layer))] = scores
    return importance.astype(np.float32)


def _variables(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def _attention_leaf(path: tuple) -> tuple[int, str, str] | None:
    """(layer, projection, 'kernel' | 'bias') for an attention projection parameter path."""
    if len(path) == 6 and path[:2] == ("backbone", "layers") and path[3] == "attention":
        return int(path[2]), path[4], path[5]
    return None


def _rebuild(model, config, move: Callable[[tuple, np.ndarray, tuple], np.ndarray]):
    """A model of `config` (the same head and labels) whose every variable is `move(path, old
    value, new shape)`; ConfigError when the model's variables are not those of a plain model
    (a PEFT method: merge or remove it first)."""
    from models.model import Model

    fresh = nnx.eval_shape(lambda: Model(config, model.head_name, model.num_labels or 2, rngs=nnx.Rngs(0)))
    old, new = _variables(model), _variables(fresh)
    if set(old) != set(new):
        extra = sorted(".".join(map(str, p)) for p in set(old) ^ set(new))
        raise ConfigError(f"head pruning needs a plain model (no PEFT layers); these variables do not fit: "
                          f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for path, variable in new.items():
        value = move(path, np.asarray(old[path][...]), tuple(variable.shape))
        variable.set_value(jnp.asarray(value, dtype=old[path][...].dtype))
    if hasattr(model, "hf_metadata"):
        fresh.hf_metadata = model.hf_metadata
    return fresh


def _head_axis(projection: str, leaf: str) -> int | None:
    """The heads axis of an attention parameter (None: the out bias, which has none)."""
    if projection in _ATTENTION_PROJECTIONS:
        return 1 if leaf == "kernel" else 0
    return 0 if leaf == "kernel" else None


def prune_heads(model, heads_to_prune: Mapping[int, Iterable[int]]):
    """A smaller copy of `model` without the given heads ({layer: [original head index, ...]};
    heads pruned before are ignored). Each pruned head's query/key/value kernel columns and biases
    and its rows of the output projection are removed, so the kernels become [embed, heads',
    head_dim] and [heads', head_dim, embed]; the config records every removed head in
    `pruned_heads` (written to config.json by models.save_pretrained). The result equals `model`
    with those heads' outputs masked to 0."""
    config = model.config
    # ModelConfig merges the pairs and raises ConfigError for a head out of range or a layer left empty
    pairs = list(config.pruned_heads or ()) + list(dict(heads_to_prune).items())
    new_config = dataclasses.replace(config, pruned_heads=pairs)

    def move(path, value, shape):
        leaf = _attention_leaf(path)
        axis = None if leaf is None else _head_axis(leaf[1], leaf[2])
        if axis is None:
            return value
        before, after = config.kept_heads(leaf[0]), new_config.kept_heads(leaf[0])
        return np.take(value, [before.index(h) for h in after], axis=axis)

    return _rebuild(model, new_config, move)


def expand_pruned_heads(model):
    """`model` at full size (config without pruned_heads): the pruned heads come back with zero
    query/key/value weights and zero output-projection rows, so they contribute nothing and the
    outputs are the pruned model's. What transformers 5 (which no longer builds head-pruned
    models) loads: models.save_pretrained(expand_pruned_heads(model), path)."""
    config = model.config
    full = dataclasses.replace(config, pruned_heads=None)

    def move(path, value, shape):
        leaf = _attention_leaf(path)
        axis = None if leaf is None else _head_axis(leaf[1], leaf[2])
        if axis is None:
            return value
        out = np.zeros(shape, value.dtype)
        index = [slice(None)] * len(shape)
        index[axis] = list(config.kept_heads(leaf[0]))
        out[tuple(index)] = value
        return out

    return _rebuild(model, full, move)


def prune_fraction_of_heads(model, fraction: float, importance: np.ndarray, *, per_layer: bool = False):
    """Prunes the least important `fraction` of the model's remaining heads; returns (the smaller
    model, {layer: [original heads pruned now]}).

    `importance`: [num_layers, num_heads] from head_importance (normalised per layer, so scores
    compare across layers). Globally (default): the round(fraction * remaining heads) lowest
    scores over all layers, skipping a layer's last remaining head (every layer keeps one).
    `per_layer=True`: round(fraction * heads in the layer) lowest in each layer, at most all but
    one. Ties go to the lower (layer, head) index."""
    config = model.config
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"prune_fraction_of_heads: fraction={fraction}: expected a value in [0, 1)")
    importance = np.asarray(importance, np.float64)
    if importance.shape != (config.num_layers, config.num_heads):
        raise ConfigError(f"prune_fraction_of_heads: importance has shape {importance.shape}; expected "
                          f"{(config.num_layers, config.num_heads)} (head_importance)")
    remaining = {layer: list(config.kept_heads(layer)) for layer in range(config.num_layers)}
    chosen: dict[int, list[int]] = {}
    if per_layer:
        for layer, heads in remaining.items():
            count = min(int(round(fraction * len(heads))), len(heads) - 1)
            ranked = sorted(heads, key=lambda h: (importance[layer, h], h))
            if count:
                chosen[layer] = sorted(ranked[:count])
    else:
        count = int(round(fraction * sum(len(h) for h in remaining.values())))
        candidates = sorted(((importance[layer, h], layer, h) for layer, heads in remaining.items() for h in heads))
        left = {layer: len(heads) for layer, heads in remaining.items()}
        for _, layer, head in candidates:
            if count == 0:
                break
            if left[layer] > 1:
                chosen.setdefault(layer, []).append(head)
                left[layer] -= 1
                count -= 1
        chosen = {layer: sorted(heads) for layer, heads in sorted(chosen.items())}
    return prune_heads(model, chosen), chosen
