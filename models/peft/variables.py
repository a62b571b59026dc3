"""Variable types of the parameters that PEFT methods add to a model.

Why: the train loop separates trainable from frozen weights with an nnx filter on variable
types (`nnx.split(model, trainable, ...)`), so every added parameter is a `PeftParam`. LoRA
factors are also `nnx.LoRAParam`, so filters written for Flax's own LoRA see them too.

Like the base model's parameters, each carries logical axis names (`out_sharding` metadata)
taken from the layer it adapts, so it follows that layer's sharding on a mesh. New logical
names: 'lora_rank', 'adapter', 'prefix', 'prefix_hidden', 'prompt' (unsharded unless a rule says
otherwise).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class PeftParam(nnx.Param):
    """A parameter added by a PEFT method (trainable while the base model is frozen)."""


class LoRAParam(PeftParam, nnx.LoRAParam):
    """LoRA factor: A [*in, lora_rank] or B [lora_rank, *out]."""


class AdapterParam(PeftParam):
    """Bottleneck adapter weight or bias."""


class PrefixParam(PeftParam):
    """Prefix-tuning key/value prefix or reparameterization weight."""


class PromptParam(PeftParam):
    """Prompt-tuning soft prompt [num_virtual_tokens, embed]."""


class IA3Param(PeftParam):
    """IA³ rescaling vector (of a layer's output features, or of a feed-forward layer's input)."""


def peft_param(cls: type[PeftParam], value: jax.Array, axes: Sequence[str | None]) -> PeftParam:
    """A `cls` parameter annotated with logical axis names, like models.layers.param."""
    assert len(axes) == value.ndim, (axes, value.shape)
    return cls(value, sharding_names=tuple(axes), eager_sharding=False)


def axis_names(variable: nnx.Variable) -> tuple:
    """Logical axis names of an existing parameter (None per axis where it has none)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names is not None else (None,) * variable[...].ndim


class Projection(nnx.Module):
    """x · kernel + bias with PEFT parameters of type `cls` (adapter and prefix MLP layers).

    kernel [in, *out], bias [*out], computed in `dtype`. The names `kernel` / `bias` follow the
    base layers, so conventions keyed on them (no weight decay on biases) apply here too.
    """

    def __init__(self, cls: type[PeftParam], kernel: jax.Array, axes: Sequence[str | None], *, dtype=jnp.float32):
        self.kernel = peft_param(cls, kernel, axes)
        self.bias = peft_param(cls, jnp.zeros(kernel.shape[1:], jnp.float32), axes[1:])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=1)
        return y + self.bias[...].astype(self.dtype)
