"""Model outputs beyond logits: hidden states, attention probabilities, inputs_embeds.

The reference is PyTorch transformers in f32 on CPU with eager attention (the implementation
that returns attention probabilities): tiny randomly initialised BERT and GPT-2 models (every
parameter perturbed, built by tests/test_models_hf.py's helpers) saved with transformers' own
save_pretrained and loaded with models.load_pretrained. Also: asking for nothing costs nothing
(with the flags off only the fused attention kernel is traced), prefix tuning's prefix shows in
the probabilities, and gradients with respect to inputs_embeds equal torch's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_models_hf
import torch
import transformers
from flax import nnx
from test_models_hf import TOL, _bert_config, _gpt2_config, _max_diff, _perturbed

import models
from models import attention, peft

torch.set_num_threads(1)
EXACT = 1e-6
CLASSES = {
    ("bert", None): transformers.BertModel,
    ("gpt2", "causal_lm"): transformers.GPT2LMHeadModel,
    ("gpt2", "seq_cls"): transformers.GPT2ForSequenceClassification,
}
batch = test_models_hf.batch  # the right-padded batch fixture [3, 11] with token types, shared
TINY = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 37,
        "max_position_embeddings": 16}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(family, head) -> (torch model with eager attention, the flaxen model loaded from its save_pretrained)."""
    out = {}
    for i, ((family, head), cls) in enumerate(CLASSES.items()):
        torch_model = _perturbed(cls, (_bert_config if family == "bert" else _gpt2_config)(), seed=10 + i)
        torch_model.set_attn_implementation("eager")
        path = tmp_path_factory.mktemp(f"{family}_{head}")
        torch_model.save_pretrained(path)
        out[family, head] = torch_model, models.load_pretrained(str(path), head=head)
    return out


def _torch(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}, output_attentions=True,
                     output_hidden_states=True)


def _inputs(family, batch):
    """Right-padded ids, mask (and BERT's token types) as int64 numpy."""
    ids, mask, types = batch
    return dict(input_ids=ids, attention_mask=mask, **({"token_type_ids": types} if family == "bert" else {}))


def _flaxen(model, **inputs):
    ints = {k: np.asarray(v, np.int32) for k, v in inputs.items() if k != "inputs_embeds"}
    extra = {"inputs_embeds": inputs["inputs_embeds"]} if "inputs_embeds" in inputs else {}
    return model(**ints, **extra, output_attentions=True, output_hidden_states=True)


def _compare_extras(ours, theirs, mask):
    """Every layer's hidden states at real positions and attention rows of real queries (all keys)."""
    real = mask.astype(bool)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        assert mine.shape == (3, 11, 32)
        assert _max_diff(mine, reference, real) <= TOL
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for mine, reference in zip(ours.attentions, theirs.attentions):
        assert mine.shape == (3, 4, 11, 11) and mine.dtype == jnp.float32
        rows = np.broadcast_to(real[:, None, :, None], mine.shape)
        assert _max_diff(mine, reference, rows) <= TOL
        assert np.all(np.asarray(mine)[np.broadcast_to(~real[:, None, None, :], mine.shape)] == 0)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family,head", [("bert", None), ("gpt2", "causal_lm")])
def test_hidden_states_and_attentions_equal_transformers(pairs, batch, family, head):
    torch_model, model = pairs[family, head]
    inputs = _inputs(family, batch)
    ours, theirs = _flaxen(model, **inputs), _torch(torch_model, **inputs)
    _compare_extras(ours, theirs, inputs["attention_mask"])
    # Hugging Face's last hidden state is the model's output (GPT-2: after the final LayerNorm)
    assert np.array_equal(ours.hidden_states[-1], ours.last_hidden_state)
    if family == "gpt2":
        assert _max_diff(ours.logits, theirs.logits, inputs["attention_mask"].astype(bool)) <= TOL


@pytest.mark.parametrize("family,head", [("bert", None), ("gpt2", "causal_lm")])
def test_inputs_embeds_equal_transformers(pairs, batch, family, head):
    torch_model, model = pairs[family, head]
    inputs = _inputs(family, batch)
    del inputs["input_ids"]
    inputs["inputs_embeds"] = np.random.default_rng(1).normal(0.0, 0.5, (3, 11, 32)).astype(np.float32)
    ours, theirs = _flaxen(model, **inputs), _torch(torch_model, **inputs)
    _compare_extras(ours, theirs, inputs["attention_mask"])
    real = inputs["attention_mask"].astype(bool)
    if family == "bert":
        assert _max_diff(ours.last_hidden_state, theirs.last_hidden_state, real) <= TOL
        assert _max_diff(ours.pooler_output, theirs.pooler_output) <= TOL
    else:
        assert _max_diff(ours.logits, theirs.logits, real) <= TOL


def test_gpt2_sequence_classifier_with_inputs_embeds(pairs, batch):
    """Without a mask both take the last position (transformers cannot find padding in
    embeddings); with a mask flaxen takes the last real token, as it does from input_ids."""
    torch_model, model = pairs["gpt2", "seq_cls"]
    ids, mask, _ = batch
    embeds = np.asarray(model.embed_tokens(jnp.asarray(ids, jnp.int32)))
    with torch.no_grad():
        expected = torch_model(inputs_embeds=torch.tensor(embeds)).logits
    assert _max_diff(model(inputs_embeds=embeds).logits, expected) <= TOL
    from_ids = model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    from_embeds = model(inputs_embeds=embeds, attention_mask=jnp.asarray(mask, jnp.int32)).logits
    assert _max_diff(from_embeds, from_ids) <= EXACT
    with torch.no_grad():
        reference = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert _max_diff(from_embeds, reference) <= TOL


@pytest.mark.parametrize("family,head", [("bert", None), ("gpt2", "causal_lm")])
def test_gradient_with_respect_to_embeddings_equals_torch(pairs, batch, family, head):
    """The attribution use: d(output)/d(inputs_embeds) at model.embed_tokens(ids)."""
    torch_model, model = pairs[family, head]
    inputs = _inputs(family, batch)
    ids = jnp.asarray(inputs.pop("input_ids"), jnp.int32)
    ints = {k: jnp.asarray(v, jnp.int32) for k, v in inputs.items()}
    embeds = model.embed_tokens(ids)
    assert embeds.shape == (3, 11, 32)
    plain, replaced = model(ids, **ints), model(inputs_embeds=embeds, **ints)
    assert _max_diff(replaced.last_hidden_state, plain.last_hidden_state) <= EXACT

    def score(out):
        return out.pooler_output[:, 0].sum() if family == "bert" else out.logits[:, 3, 7].sum()

    ours = jax.grad(lambda e: score(model(inputs_embeds=e, **ints)))(embeds)
    leaf = torch.tensor(np.asarray(embeds), requires_grad=True)
    score(torch_model(inputs_embeds=leaf, **{k: torch.tensor(v) for k, v in inputs.items()})).backward()
    assert _max_diff(ours, leaf.grad) <= TOL
    assert float(np.abs(np.asarray(ours)).max()) > 0


def test_exactly_one_of_input_ids_and_inputs_embeds(pairs):
    _, model = pairs["bert", None]
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=jnp.ones((1, 4), jnp.int32))


# ----------------------------------------------------------------------------- no cost when off


@pytest.mark.parametrize("family,head,remat,method", [
    ("bert", "seq_cls", True, None), ("gpt2", "causal_lm", False, "prefix"), ("gpt2", "seq_cls", True, "lora"),
])
def test_flags_off_keep_the_fused_kernel_and_on_give_the_same_logits(family, head, remat, method, monkeypatch):
    # the fused kernel (jax.nn.dot_product_attention) as on accelerators; on CPU the explicit path is the default
    model = models.build_model(models.ModelConfig(family=family, remat=remat, attention_implementation="xla", **TINY),
                               head)
    if method is not None:
        peft.apply(model, {"name": method})
    ids = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % 50
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    # off (no attention dropout): only the fused kernel is traced, never the explicit softmax path
    with monkeypatch.context() as patch:
        patch.setattr(attention, "attention_probabilities",
                      lambda *a: pytest.fail("the flags off traced the explicit softmax path"))
        graphdef, state = nnx.split(model)
        jax.jit(lambda state: nnx.merge(graphdef, state)(ids, mask).logits).lower(state)
    for deterministic in (True, False):
        call = functools.partial(model, ids, mask, deterministic=deterministic, dropout_rng=jax.random.key(3))
        off, on = call(), call(output_attentions=True, output_hidden_states=True)
        assert off.hidden_states is None and off.attentions is None
        assert _max_diff(on.logits, off.logits) <= EXACT
        for probs in on.attentions:  # before attention dropout, also when training
            assert np.allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


def test_remat_gradients_through_the_extras():
    """With remat the extras come out of the checkpointed blocks; their gradients equal the plain model's."""
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 50
    grads = []
    for remat in (False, True):
        model = models.build_model(models.ModelConfig(family="bert", remat=remat, **TINY), "token_cls")
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            out = nnx.merge(graphdef, state)(ids, output_attentions=True, output_hidden_states=True,
                                             deterministic=False, dropout_rng=jax.random.key(0))
            return out.logits.sum() + jnp.square(out.attentions[0]).sum() + out.hidden_states[1].sum()

        grads.append([np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(state))])
    # as tests/test_models_remat.py: rtol 1e-5 per entry, floor 1e-6 of the gradient's scale
    floor = 1e-6 * max(np.abs(g).max() for g in grads[0])
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=floor)


# ----------------------------------------------------------------------------- prefix tuning and the cache


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_prefix_attentions_cover_prefix_and_sequence(family):
    model = models.build_model(models.ModelConfig(family=family, **TINY), None)
    peft.apply(model, {"name": "prefix", "length": 3})
    ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5) % 50
    mask = jnp.array([[1] * 5, [1] * 3 + [0] * 2], jnp.int32)
    out = model(ids, mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    for probs in out.attentions:
        probs = np.asarray(probs)
        assert probs.shape == (2, 4, 5, 3 + 5)
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(probs[..., :3] > 0)
        assert np.all(probs[1, :, :, 3 + 3:] == 0)


def test_gpt2_cache_call_returns_extras_over_the_cache():
    """A prefill into a longer cache gives the no-cache probabilities on the prompt's keys and 0 after."""
    model = models.build_model(models.ModelConfig(family="gpt2", **TINY), "causal_lm")
    ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5) % 50
    plain = model(ids, output_attentions=True, output_hidden_states=True)
    cache = model.backbone.init_cache(2, 8)
    cached = model(ids, jnp.ones((2, 8), jnp.int32), cache=cache, cache_index=0, output_attentions=True,
                   output_hidden_states=True)
    assert cached.cache is not None
    for mine, reference in zip(cached.hidden_states, plain.hidden_states):
        assert _max_diff(mine, reference) <= 1e-5
    for mine, reference in zip(cached.attentions, plain.attentions):
        assert mine.shape == (2, 4, 5, 8)
        assert _max_diff(mine[..., :5], reference) <= 1e-5
        assert np.all(np.asarray(mine[..., 5:]) == 0)
