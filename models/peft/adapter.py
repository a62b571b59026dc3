"""Houlsby bottleneck adapters after the attention and MLP output projections (Houlsby et al. 2019).

    y = base(x);   y + up(act(down(y)))      down [embed, size] + [size], up [size, embed] + [embed]

The adapter wraps the block's output projections (`attention.out` and `output`), so it runs on
the sublayer's output before the residual add (and, in BERT, before the post-LN). `up` starts at
zero: the adapted model starts equal to the base model. Shapes: y [batch, seq, embed]; weights
carry the projection's output axis name and 'adapter'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dense
from models.peft import targets
from models.peft.config import AdapterConfig
from models.peft.variables import AdapterParam, Projection, axis_names

ADAPTED = ("attention.out", "output")
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "swish": jax.nn.swish,
}


class AdapterDense(Dense):
    """A Dense layer (the base layer's own kernel and bias Variables) followed by a residual bottleneck."""

    def __init__(self, base: Dense, *, size: int, activation: str, init_std: float, rngs: nnx.Rngs):
        if len(base.out_shape) != 1:
            raise ValueError(f"adapters need a Dense layer with one output axis, got out_shape={base.out_shape}")
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        (features,) = self.out_shape
        out_name = axis_names(base.kernel)[-1]
        down = init_std * jax.random.normal(rngs.params(), (features, size), jnp.float32)
        self.adapter_down = Projection(AdapterParam, down, (out_name, "adapter"), dtype=self.dtype)
        self.adapter_up = Projection(AdapterParam, jnp.zeros((size, features), jnp.float32), ("adapter", out_name),
                                     dtype=self.dtype)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y + self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(y)))


def apply_adapters(model, config: AdapterConfig, rngs: nnx.Rngs) -> None:
    """Wraps every block's attention output and MLP output projections with adapters, in place."""
    for index, path, dense in targets.select(model, Dense, ADAPTED, "adapter"):
        if ".".join(map(str, path)) not in ADAPTED:
            continue
        adapter = AdapterDense(dense, size=config.size, activation=config.activation, init_std=config.init_std,
                               rngs=rngs)
        targets.replace(targets.blocks(model)[index], path, adapter)
