"""IA³ (Liu et al. 2022): learned vectors that rescale activations inside every block.

    output scaling (keys, values):         y = (x · W + b) ⊙ l      l [*out]
    input scaling (feed-forward modules):  y = (x ⊙ l) · W + b      l [*in]

as Hugging Face PEFT's IA3 layers compute them (its `ia3_l` of shape [out, 1] or [1, in]). The
vectors start at one, so the adapted model starts equal to the base model; each carries the
logical axis names of the kernel axes it scales. Both forms fold into the weights: output
scaling multiplies the kernel's output columns and the bias, input scaling the kernel's input
rows (`merged_weights`, used by peft.merge).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.errors import ConfigError
from models.layers import Dense
from models.peft import targets
from models.peft.config import IA3Config
from models.peft.variables import IA3Param, axis_names, peft_param


class IA3Dense(Dense):
    """A Dense layer (the base layer's own kernel and bias Variables) with an IA³ vector."""

    def __init__(self, base: Dense, *, feedforward: bool):
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        self.feedforward = bool(feedforward)
        names = axis_names(base.kernel)
        n_in = len(self.in_shape)
        shape, axes = (self.in_shape, names[:n_in]) if self.feedforward else (self.out_shape, names[n_in:])
        self.ia3_scale = peft_param(IA3Param, jnp.ones(shape, jnp.float32), axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.ia3_scale[...].astype(self.dtype)
        if self.feedforward:
            return super().__call__(x.astype(self.dtype) * scale)
        return super().__call__(x) * scale

    def merged_weights(self) -> tuple[jax.Array, jax.Array | None]:
        """(kernel, bias) in float32 with the vector folded in: the layer's outputs without IA³."""
        kernel = self.kernel[...].astype(jnp.float32)
        scale = self.ia3_scale[...]
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        if self.feedforward:
            return kernel * scale.reshape(scale.shape + (1,) * len(self.out_shape)), bias
        return kernel * scale, None if bias is None else bias * scale


def apply_ia3(model, config: IA3Config, rngs: nnx.Rngs | None = None) -> None:
    """Replaces the targeted Dense layers of every block with IA3Dense, in place."""
    chosen = targets.select(model, Dense, config.target_modules, "target_modules")
    paths = {targets.dotted(targets.block_path(index) + path) for index, path, _ in chosen}
    feedforward = set()
    for pattern in config.feedforward_modules:
        hits = {p for p in paths if targets.matches(pattern, p)}
        if not hits:
            raise ConfigError(
                f"peft.feedforward_modules: pattern {pattern!r} matches none of the target modules "
                f"({', '.join(sorted({'.'.join(p.split('.')[3:]) for p in paths}))}); every feed-forward module "
                "must also be in peft.target_modules")
        feedforward |= hits
    for index, path, dense in chosen:
        full = targets.dotted(targets.block_path(index) + path)
        targets.replace(targets.blocks(model)[index], path, IA3Dense(dense, feedforward=full in feedforward))


def ia3_layers(model) -> list[tuple[tuple, IA3Dense]]:
    """(path from the model root, layer) of every IA3Dense of a model."""
    return [(tuple(path), m) for path, m in model.iter_modules() if isinstance(m, IA3Dense)]
