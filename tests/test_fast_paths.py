"""The train step's fast paths against the plain computation. Model(..., head_positions_only=True):
BERT's pooled heads read position 0 alone, so the last block computes that position only. The logits and every parameter's gradient equal the full computation
(f32, 1e-5), with padding, with PEFT methods that change the block (LoRA, prefix, adapters), with
remat and pruned heads; the compiled train step does fewer FLOPs; heads that read every position
and calls asking for hidden states are computed in full."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import peft

TINY = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 37,
        "max_position_embeddings": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0}
IDS = (jnp.arange(14, dtype=jnp.int32).reshape(2, 7) * 7) % 50
MASK = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)


def _loss_and_grads(model, **kwargs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(IDS, MASK, **kwargs)
        return jnp.sum(out.logits ** 2), out.logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


@pytest.mark.parametrize("method,remat,pruned", [(None, False, None), ("lora", True, None), ("prefix", False, None),
                                                 ("adapter", False, {1: [0, 2]})])
def test_first_position_only_equals_the_full_computation(method, remat, pruned):
    model = models.build_model(models.ModelConfig(family="bert", remat=remat, pruned_heads=pruned, **TINY), "seq_cls",
                               num_labels=3)
    if method is not None:
        peft.apply(model, {"name": method})
    full_logits, full_grads = _loss_and_grads(model)
    logits, grads = _loss_and_grads(model, head_positions_only=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits), atol=1e-5, rtol=1e-5)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(full_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_first_position_only_compiles_to_fewer_flops_and_keeps_outputs_where_asked():
    model = models.build_model(models.ModelConfig(family="bert", **TINY), "seq_cls", num_labels=2)
    graphdef, state = nnx.split(model)

    def flops(**kwargs):
        lowered = jax.jit(lambda s: nnx.merge(graphdef, s)(IDS, MASK, **kwargs).logits).lower(state)
        return lowered.compile().cost_analysis()["flops"]

    assert flops(head_positions_only=True) < 0.85 * flops()
    out = model(IDS, MASK, head_positions_only=True)
    assert out.last_hidden_state.shape == (2, 1, 32)
    # asking for hidden states (or attentions) computes every position
    out = model(IDS, MASK, head_positions_only=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 7, 32) and len(out.hidden_states) == 3
    # a head that reads every position ignores the request
    tagger = models.build_model(models.ModelConfig(family="bert", **TINY), "token_cls", num_labels=3)
    assert tagger(IDS, MASK, head_positions_only=True).logits.shape == (2, 7, 3)

