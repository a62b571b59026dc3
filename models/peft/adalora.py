"""AdaLoRA: an SVD-form low-rank update beside frozen Dense layers (Zhang et al. 2023), laid out
as Hugging Face PEFT's AdaLoRA layers.

    y = x · W + b + scaling · ((dropout(x) · A) ⊙ E) · B        scaling = lora_alpha / (init_r + 1e-5)

A [*in, r] holds the right singular vectors (PEFT's lora_A [r, in], transposed), E [r] the
singular values (PEFT's lora_E [r, 1]) and B [r, *out] the left singular vectors (PEFT's lora_B
[out, r], transposed); r = init_r and, as in PEFT, the scaling divides by init_r (PEFT's `ranknum`)
for the whole run, however many singular values the budget keeps. E starts at zero, so the adapted
model starts equal to the base model; A and B start normal with standard deviation 0.02.

The rank budget does not live here: pruning a singular value sets its E entry to zero, which
flaxen's AdaLoRA update rule does during training (flaxen/adalora.py), with the orthogonality
regulariser `orthogonality(model_or_factors)` it adds to the gradients.

LoRA dropout uses the LoRA layers' mechanism (models.peft.lora): the block scopes a dropout key
that the layers inside read, one stream per layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dense
from models.peft.config import AdaLoRAConfig
from models.peft.lora import adapt_block_dense, low_rank_update
from models.peft.variables import PeftParam, axis_names, peft_param

INIT_STD = 0.02


class AdaLoRAParam(PeftParam):
    """AdaLoRA factor: A [*in, lora_rank], E [lora_rank] or B [lora_rank, *out]."""


class AdaLoRADense(Dense):
    """A Dense layer (the base layer's own kernel and bias Variables) plus AdaLoRA's A, E, B."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout_rate: float, stream: int, rngs: nnx.Rngs):
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        names = axis_names(base.kernel)
        n_in = len(self.in_shape)
        a = INIT_STD * jax.random.normal(rngs.params(), self.in_shape + (rank,), jnp.float32)
        b = INIT_STD * jax.random.normal(rngs.params(), (rank,) + self.out_shape, jnp.float32)
        self.lora_a = peft_param(AdaLoRAParam, a, names[:n_in] + ("lora_rank",))
        self.lora_e = peft_param(AdaLoRAParam, jnp.zeros((rank,), jnp.float32), ("lora_rank",))
        self.lora_b = peft_param(AdaLoRAParam, b, ("lora_rank",) + names[n_in:])
        self.alpha = float(alpha)
        self.ranknum = float(rank)
        self.dropout_rate = float(dropout_rate)
        self.stream = int(stream)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    @property
    def rank(self) -> int:
        return self.lora_e.shape[0]

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.lora_a[...].reshape(-1, self.rank) * self.lora_e[...][None, :]
        b = self.lora_b[...].reshape(self.rank, -1)
        return super().__call__(x) + low_rank_update(self, x, a.astype(self.dtype), b.astype(self.dtype))

    def delta(self) -> jax.Array:
        """scaling · (A ⊙ E) · B in float32, shaped like the kernel [*in, *out]."""
        a = self.lora_a[...].reshape(-1, self.rank) * self.lora_e[...][None, :]
        b = self.lora_b[...].reshape(self.rank, -1)
        return (self.scaling * (a @ b)).reshape(self.kernel.shape)


def apply_adalora(model, config: AdaLoRAConfig, rngs: nnx.Rngs) -> None:
    """Replaces the targeted Dense layers of every block with AdaLoRADense, in place."""
    adapt_block_dense(model, config.target_modules, lambda dense, stream: AdaLoRADense(
        dense, rank=config.init_r, alpha=config.lora_alpha, dropout_rate=config.lora_dropout, stream=stream,
        rngs=rngs))


def adalora_layers(model) -> list[tuple[tuple, AdaLoRADense]]:
    """(path from the model root, layer) of every AdaLoRADense of a model, in model order."""
    return [(tuple(path), m) for path, m in model.iter_modules() if isinstance(m, AdaLoRADense)]


def orthogonality(factors) -> jax.Array:
    """Hugging Face PEFT's AdaLoRA regulariser: the mean over every A and B of ‖Q Qᵀ - I‖_F
    (Q = A as [r, in]) and ‖Pᵀ P - I‖_F (P = B as [out, r]); Frobenius norms, not squared.

    factors: a model, or a sequence of (A [*in, r], B [r, *out]) arrays. The norm's gradient is
    taken as 0 where the difference is exactly 0 (as PyTorch's)."""
    if isinstance(factors, nnx.Module):
        factors = [(layer.lora_a[...], layer.lora_b[...]) for _, layer in adalora_layers(factors)]
    terms = []
    for a, b in factors:
        r = a.shape[-1]
        q = a.reshape(-1, r).astype(jnp.float32)
        p = b.reshape(r, -1).astype(jnp.float32)
        eye = jnp.eye(r, dtype=jnp.float32)
        terms += [_frobenius(q.T @ q - eye), _frobenius(p @ p.T - eye)]
    if not terms:
        return jnp.zeros((), jnp.float32)
    return sum(terms) / len(terms)


def _frobenius(x: jax.Array) -> jax.Array:
    squares = jnp.sum(jnp.square(x))
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)
