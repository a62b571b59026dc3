"""Model structure against independent references: parameter counts of every configs/model size
against transformers (and the published BERT-base / GPT-2 small counts), logical axis names on
every parameter, and the shared attention against a numpy softmax reference."""
import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from omegaconf import OmegaConf

from models import Model, ModelConfig
from models.attention import causal_mask, dot_product_attention, padding_mask
from models.heads import available
from models.hf import config_to_hf
from models.layers import dropout

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "model")
PUBLISHED = {"bert_base": 109_482_240, "gpt2_small": 124_439_808}
# sizes of families with a bare backbone (T5 has only its seq2seq_lm head: tests/test_models_t5.py counts those)
SIZES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
               if None in available(OmegaConf.load(p).family))


def _abstract(config, head=None, num_labels=2):
    return nnx.eval_shape(lambda: Model(config, head, num_labels, rngs=nnx.Rngs(0)))


def _count(model):
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_equals_transformers(size):
    values = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, f"{size}.yaml")))
    config = ModelConfig.from_dict(values)
    hf = config_to_hf(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        reference = transformers.AutoModel.from_config(hf_config)
    expected = sum(p.numel() for p in reference.parameters())
    assert _count(_abstract(config)) == expected
    if size in PUBLISHED:
        assert expected == PUBLISHED[size]


TINY = {
    "bert": ModelConfig(family="bert", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                        max_position_embeddings=64),
    "gpt2": ModelConfig(family="gpt2", vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                        max_position_embeddings=64, layer_norm_eps=1e-5),
}


@pytest.mark.parametrize("family,head", [(f, h) for f in TINY for h in available(f)])
def test_every_param_has_logical_axis_names_of_its_rank(family, head):
    params = [(p, v) for p, v in nnx.iter_graph(_abstract(TINY[family], head, 3)) if isinstance(v, nnx.Param)]
    assert params
    for path, variable in params:
        names = variable.get_metadata().get("out_sharding")
        assert isinstance(names, tuple) and len(names) == len(variable.shape), (path, names, variable.shape)
        assert all(isinstance(n, str) and n for n in names), (path, names)


def _reference_attention(q, k, v, mask, keep=None, rate=0.0):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.asarray(mask), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if keep is not None:
        probs = np.where(np.asarray(keep), probs / (1.0 - rate), 0.0)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def test_attention_paths_match_numpy_reference():
    q, k, v = np.random.default_rng(0).normal(size=(3, 2, 5, 3, 4)).astype(np.float32)
    key = jax.random.key(0)
    attention_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for mask in (padding_mask(attention_mask), causal_mask(attention_mask, jnp.arange(5))):
        real = np.asarray(attention_mask, bool)
        for implementation in (None, "xla"):  # CPU: the explicit path, and jax.nn.dot_product_attention's
            fused = np.asarray(dot_product_attention(q, k, v, mask, implementation=implementation))
            np.testing.assert_allclose(fused[real], _reference_attention(q, k, v, mask)[real], atol=1e-5, rtol=0)
        rate = 0.25
        with_dropout = np.asarray(dot_product_attention(q, k, v, mask, dropout_rate=rate, dropout_rng=key))
        keep = np.asarray(dropout(jnp.ones((2, 3, 5, 5)), rate, key)) > 0
        expected = _reference_attention(q, k, v, mask, keep, rate)
        np.testing.assert_allclose(with_dropout[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("x_shape,kernel_shape,n_in", [((6, 5, 8), (8, 2, 3), 1), ((6, 5, 2, 3), (2, 3, 8), 2)])
def test_dense_contraction_backward_equals_autodiff(x_shape, kernel_shape, n_in):
    """models.layers.contract (Dense's product, hand-written backward) against autodiff of tensordot."""
    from models.layers import contract

    kx, kk, kd = jax.random.split(jax.random.key(0), 3)
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
    dy = jax.random.normal(kd, x_shape[:len(x_shape) - n_in] + kernel_shape[n_in:])
    results = [jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.tanh(f(x, k)) * dy), argnums=(0, 1)))(x, kernel)
               for f in (lambda x, k: contract(x, k, n_in), lambda x, k: jnp.tensordot(x, k, n_in))]
    (ours, our_grads), (theirs, their_grads) = results
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for g, h in zip(our_grads, their_grads):
        np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-5)
