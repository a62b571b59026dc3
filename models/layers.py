"""Parameterised building blocks with logical axis names on every parameter.

Every `nnx.Param` carries `out_sharding` metadata naming its logical axes (`'embed'`, `'mlp'`,
`'heads'`, ...). The names are metadata only (`eager_sharding=False`): sharding rules applied
later (flaxen.sharding) map them onto a device mesh without touching model code.

Activations get logical names too, at block boundaries: `constrain(x, ('batch', 'length', 'embed'))`.
It does nothing unless a trainer has entered `activation_sharding(resolve)`, where
`resolve(names, shape)` returns a `jax.sharding.Sharding`; then it pins `x` to that sharding with
`jax.lax.with_sharding_constraint`, so the compiler keeps e.g. the batch split over data-parallel
devices and the MLP hidden layer split over tensor-parallel devices between blocks.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (one per dimension)."""
    assert len(axes) == value.ndim, (axes, value.shape)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


_ACTIVATION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(resolve: Callable[[tuple[str | None, ...], tuple[int, ...]], jax.sharding.Sharding] | None):
    """While active (during tracing), `constrain` pins activations to `resolve(names, shape)`."""
    token = _ACTIVATION_SHARDING.set(resolve)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical axis names; identity outside `activation_sharding`."""
    resolve = _ACTIVATION_SHARDING.get()
    if resolve is None:
        return x
    return jax.lax.with_sharding_constraint(x, resolve(tuple(axes), tuple(x.shape)))


def _shape(features: int | Sequence[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [tokens, in] · kernel [in, out], with the backward pass written out.

    The kernel gradient is xᵀ · dy with x transposed explicitly. Left to autodiff, XLA on CPU
    transposed dy instead and fused that transpose with everything that produced dy: in a
    pre-LN Transformer dy is the residual-stream gradient, so each layer's output projections
    recomputed the gradient of every later layer (quadratic in depth; 40 % of a gpt_nano step).
    """
    return x @ kernel


def _matmul_forward(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_backward(residuals, dy):
    x, kernel = residuals
    return dy @ kernel.T, x.T @ dy


matmul.defvjp(_matmul_forward, _matmul_backward)


def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """tensordot(x, kernel, n_in) through `matmul`: x [..., *in], kernel [*in, *out] -> [..., *out]."""
    batch, out = x.shape[:x.ndim - n_in], kernel.shape[n_in:]
    flat = matmul(x.reshape(math.prod(batch), -1), kernel.reshape(math.prod(kernel.shape[:n_in]), -1))
    return flat.reshape(batch + out)


class Dense(nnx.Module):
    """y = x · kernel + bias, contracting the last `len(in_features)` axes of x.

    kernel: [*in_features, *out_features] named by `axes`; bias: [*out_features]. Multi-axis
    kernels keep attention heads explicit: query is `[embed, heads, head_dim]`, the output
    projection `[heads, head_dim, embed]`.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        init_std: float = 0.02,
        dtype=jnp.float32,
    ):
        self.in_shape = _shape(in_features)
        self.out_shape = _shape(out_features)
        self.dtype = dtype
        shape = self.in_shape + self.out_shape
        self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, jnp.float32), axes)
        if use_bias:
            self.bias = param(jnp.zeros(self.out_shape, jnp.float32), axes[len(self.in_shape):])
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = contract(x.astype(self.dtype), kernel, len(self.in_shape))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """A lookup table [num_embeddings, features]; `attend` uses it as an output projection.

    The lookup constrains the table to its logical names first, so a trainer that shards the
    table over FSDP gathers it before the lookup instead of resharding the lookup's output.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        dtype=jnp.float32,
    ):
        self.dtype = dtype
        table = init_std * jax.random.normal(rngs.params(), (num_embeddings, features), jnp.float32)
        self.embedding = param(table, axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = constrain(self.embedding[...], self.embedding.get_metadata().get("out_sharding", (None, None)))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., features] -> [..., num_embeddings] with the transposed table (tied output layer)."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 whatever the compute dtype (no bias
    with `use_bias=False`)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, use_bias: bool = True):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((features,), jnp.float32), ("embed",))
        self.bias = param(jnp.zeros((features,), jnp.float32), ("embed",)) if use_bias else None

    @jax.named_scope("norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(rng: jax.Array, shape: tuple[int, ...], keep: float) -> jax.Array:
    """Boolean mask with P(True) = keep, from a counter-based hash keyed by `rng`.

    Why not `jax.random.bernoulli`: on CPU, XLA generates random bits one element at a time
    (about 50 ns each), which made attention dropout the largest single cost of a BERT training
    step. Here two 32-bit seeds come from `rng` and every element hashes its own index, so the
    mask is one fused, multi-threaded elementwise loop (about 8x faster). Masks are a function of
    (rng, index) only: the same key gives the same mask on any mesh.
    """
    seeds = jax.random.bits(rng, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])
    return h < jnp.uint32(min(round(keep * 2.0**32), 2**32 - 1))


@jax.named_scope("dropout")
def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None (deterministic) or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = keep_mask(rng, x.shape, 1.0 - rate)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@jax.named_scope("activation")
def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


@jax.named_scope("activation")
def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)
