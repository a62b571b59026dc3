"""models.t5 against transformers' PyTorch T5ForConditionalGeneration (f32, CPU).

Tiny randomly initialised T5 v1.0 (relu MLP, tied output layer scaled by d_model**-0.5) and v1.1
(gated-GELU, untied lm_head) models, both with d_kv != d_model / num_heads, few relative position
buckets (so short sequences reach the logarithmic buckets) and unequal encoder/decoder depths,
written by transformers and read with models.load_pretrained: encoder states and logits on padded
batches, save_pretrained read back by transformers, the cached decoder step by step against the
full call, parameter counts (configs/model/t5_*.yaml and the tiny ones), logical axis names,
explicit dropout and remat, and ConfigError / CheckpointError messages.
"""
import dataclasses
import json
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

import models
from models import ModelConfig
from models.attention import causal_mask, padding_mask
from models.errors import CheckpointError, ConfigError
from models.t5 import T5, _run_block, relative_position_bucket, shift_right

torch.set_num_threads(1)
TOL = 1e-4
CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "model")

TINY = {
    "v1_0": ModelConfig(family="t5", vocab_size=61, hidden_size=32, num_layers=2, num_decoder_layers=3, num_heads=4,
                        d_kv=6, intermediate_size=40, relative_attention_num_buckets=8,
                        relative_attention_max_distance=20, feed_forward_proj="relu", tie_word_embeddings=True,
                        layer_norm_eps=1e-6, hidden_dropout=0.1, attention_dropout=0.1),
    "v1_1": ModelConfig(family="t5", vocab_size=61, hidden_size=32, num_layers=3, num_decoder_layers=2, num_heads=4,
                        d_kv=10, intermediate_size=40, relative_attention_num_buckets=8,
                        relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False, layer_norm_eps=1e-6, hidden_dropout=0.1, attention_dropout=0.1),
}
# source [2, 11] and target [2, 9] with right padding in the second row of each
SOURCE_MASK = np.array([[1] * 11, [1] * 7 + [0] * 4], np.int32)
TARGET_MASK = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)


def _hf_config(config: ModelConfig) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.hidden_size, d_kv=config.head_dim, d_ff=config.intermediate_size,
        num_layers=config.num_layers, num_decoder_layers=config.decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.hidden_dropout,
        layer_norm_epsilon=config.layer_norm_eps, feed_forward_proj=config.feed_forward_proj,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def _untie(hf_model):
    """transformers 5 builds T5ForConditionalGeneration with lm_head sharing the embedding even for
    tie_word_embeddings=False (only the d_model**-0.5 scaling goes); from_pretrained unties them when
    the checkpoint's lm_head differs, as google/t5-v1_1 checkpoints do. Do that here."""
    if not hf_model.config.scale_decoder_outputs:
        hf_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf_model.shared.weight))
    return hf_model


def _torch_model(config: ModelConfig, seed: int):
    """A random T5ForConditionalGeneration of `config`: T5's initialisation, then every parameter
    perturbed (RMS norm scales away from 1)."""
    torch.manual_seed(seed)
    hf_model = _untie(transformers.T5ForConditionalGeneration(_hf_config(config)))
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1])).add_(1.0 if p.ndim == 1 else 0.0)
    return hf_model.eval()


def _params(model) -> dict:
    return {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def _batch(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    source = rng.integers(2, config.vocab_size, SOURCE_MASK.shape).astype(np.int32) * SOURCE_MASK
    labels = np.where(TARGET_MASK == 1, rng.integers(2, config.vocab_size, TARGET_MASK.shape), -100).astype(np.int32)
    return source, np.asarray(shift_right(labels)), labels


def _torch_outputs(hf_model, source, target):
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(source, dtype=torch.long), attention_mask=torch.tensor(SOURCE_MASK),
                       decoder_input_ids=torch.tensor(target, dtype=torch.long),
                       decoder_attention_mask=torch.tensor(TARGET_MASK))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    """(config, torch model, its directory written by transformers, the flaxen model load_pretrained reads from it)."""
    config = TINY[request.param]
    hf_model = _torch_model(config, seed=len(request.param))
    path = str(tmp_path_factory.mktemp(f"t5_{request.param}"))
    hf_model.save_pretrained(path)
    return config, hf_model, path, models.load_pretrained(path, "seq2seq_lm")


def test_relative_position_buckets_equal_transformers():
    relative = np.arange(-600, 601)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            ours = relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional=bidirectional,
                                            num_buckets=buckets, max_distance=distance)
            np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_shift_right_equals_transformers():
    labels = np.array([[5, 6, 7, 1], [8, 1, -100, -100]])
    hf_model = transformers.T5ForConditionalGeneration(_hf_config(TINY["v1_0"]))
    expected = hf_model._shift_right(torch.tensor(labels)).numpy()
    np.testing.assert_array_equal(np.asarray(shift_right(labels)), expected)
    model = nnx.eval_shape(lambda: models.build_model(TINY["v1_0"], "seq2seq_lm"))
    assert model.decoder_start_token_id == 0
    np.testing.assert_array_equal(np.asarray(model.shift_right(labels)), expected)


def test_outputs_equal_transformers_with_padding(pair):
    """Encoder states and logits at every position, padded rows included, ≤ 1e-4."""
    config, hf_model, _, model = pair
    source, target, _ = _batch(config)
    encoder_expected, logits_expected = _torch_outputs(hf_model, source, target)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, *args: nnx.merge(graphdef, s)(*args))(
        state, jnp.asarray(source), jnp.asarray(SOURCE_MASK), jnp.asarray(target), jnp.asarray(TARGET_MASK))
    assert out.logits.dtype == jnp.float32 and out.logits.shape == (2, 9, config.vocab_size)
    np.testing.assert_allclose(np.asarray(out.encoder_last_hidden_state), encoder_expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.logits), logits_expected, atol=TOL, rtol=0)


def test_load_reads_every_tensor_of_a_transformers_checkpoint(pair):
    """load_pretrained fills every parameter (it refuses otherwise) from tensors of the
    transformers-written file: all of them but the tied copies of shared.weight."""
    config, _, path, model = pair
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        stored = set(f.keys())
    written = set(models.hf.state_dict(model))
    assert written == stored - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    assert ("lm_head.weight" in written) == (not config.tie_word_embeddings)
    assert model.config == dataclasses.replace(config, use_bias=False)
    assert dict(model.hf_metadata) == {"eos_token_id": 1, "pad_token_id": 0}


def test_save_pretrained_loads_in_transformers_with_the_same_outputs(pair, tmp_path):
    config, hf_model, _, model = pair
    path = models.save_pretrained(model, tmp_path / "saved")
    with open(os.path.join(path, "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == ["T5ForConditionalGeneration"]
    assert (written["eos_token_id"], written["pad_token_id"], written["decoder_start_token_id"]) == (1, 0, 0)
    assert written["tie_word_embeddings"] is config.tie_word_embeddings
    reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == config.tie_word_embeddings
    assert reloaded.num_parameters() == _count(model)
    source, target, _ = _batch(config, seed=2)
    for expected, actual in zip(_torch_outputs(hf_model, source, target), _torch_outputs(reloaded.eval(), source,
                                                                                          target)):
        np.testing.assert_array_equal(actual, expected)
    again = models.load_pretrained(path, "seq2seq_lm")
    for (p, a), (q, b) in zip(sorted(_params(model).items()), sorted(_params(again).items())):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_hf_config_round_trip_and_errors():
    from models.t5_hf import config_from_hf, config_to_hf

    for config in TINY.values():
        assert config_from_hf(config_to_hf(config), "config.json") == dataclasses.replace(config, use_bias=False)
    # transformers 5 writes an untied model as tie_word_embeddings=true, scale_decoder_outputs=false
    hf = {**config_to_hf(TINY["v1_1"]), "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert config_from_hf(hf, "config.json").tie_word_embeddings is False
    for change, key in (({"feed_forward_proj": "gated-silu"}, "feed_forward_proj"),
                        ({"decoder_start_token_id": 5}, "decoder_start_token_id"),
                        ({"d_kv": None}, "d_kv")):
        with pytest.raises(CheckpointError, match=key):
            config_from_hf({**config_to_hf(TINY["v1_0"]), **change}, "config.json")


def test_cached_decoding_equals_the_full_decoder(pair):
    """A 3-token prefill then one token per step (jitted, traced cache_index, a cache longer than
    the target) gives the full decoder call's hidden states and logits."""
    config, _, _, model = pair
    source, target, _ = _batch(config, seed=1)
    source, mask, target = jnp.asarray(source), jnp.asarray(SOURCE_MASK), jnp.asarray(target)
    target_mask = jnp.asarray(TARGET_MASK)
    graphdef, state = nnx.split(model)

    def encode_decode(state):
        model = nnx.merge(graphdef, state)
        encoder = model.encode(source, mask)
        return encoder, model.decode(target, encoder, mask, target_mask)

    encoder, full = jax.jit(encode_decode)(state)
    length, max_length = target.shape[1], target.shape[1] + 3
    cache_mask = jnp.asarray(np.pad(TARGET_MASK, ((0, 0), (0, 3))))

    @jax.jit
    def step(state, tokens, cache, index):
        out = nnx.merge(graphdef, state).decode(tokens, encoder, mask, cache_mask, cache=cache, cache_index=index)
        return out.last_hidden_state, out.logits, out.cache

    cache = model.init_cache(2, max_length, encoder, mask)
    assert [tuple(cache[0][k].shape) for k in ("self_key", "self_value", "cross_key", "cross_value")] == [
        (2, max_length, config.num_heads, config.head_dim)] * 2 + [(2, 11, config.num_heads, config.head_dim)] * 2
    hidden, logits = [], []
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, length)]:
        h, lg, cache = step(state, target[:, start:stop], cache, jnp.int32(start))
        hidden.append(h)
        logits.append(lg)
    np.testing.assert_allclose(np.concatenate(hidden, 1), full.last_hidden_state, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(logits, 1), full.logits, atol=1e-5, rtol=0)


def _count(model) -> int:
    return sum(math.prod(v.shape) for v in _params(model).values())


def _transformers_count(config: ModelConfig) -> int:
    """T5ForConditionalGeneration's num_parameters() on the meta device (lm_head untied as
    from_pretrained leaves a v1.1 checkpoint; see _untie)."""
    with torch.device("meta"):
        return _untie(transformers.T5ForConditionalGeneration(_hf_config(config))).num_parameters()


@pytest.mark.parametrize("size,published", [("t5_tiny", None), ("t5_small", 60_506_624), ("t5_v1_1_small", 76_961_152),
                                            ("v1_0", None), ("v1_1", None)])
def test_parameter_count_equals_transformers(size, published):
    """configs/model/t5_*.yaml (and the published counts of t5-small and t5-v1_1-small) and the tiny
    test models, counted from shapes (nnx.eval_shape; torch's meta device)."""
    if size in TINY:
        config = TINY[size]
    else:
        values = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, f"{size}.yaml")))
        config = ModelConfig.from_dict(values)
    ours = _count(nnx.eval_shape(lambda: models.build_model(config, "seq2seq_lm")))
    assert ours == _transformers_count(config)
    if published is not None:
        assert ours == published


@pytest.mark.parametrize("variant", sorted(TINY))
def test_every_param_has_logical_axis_names_of_its_rank(variant):
    params = _params(nnx.eval_shape(lambda: models.build_model(TINY[variant], "seq2seq_lm")))
    assert params
    for path, variable in params.items():
        names = variable.get_metadata().get("out_sharding")
        assert isinstance(names, tuple) and len(names) == len(variable.shape), (path, names, variable.shape)
        assert all(isinstance(n, str) and n for n in names), (path, names)


def test_dropout_is_explicit_and_remat_keeps_outputs_and_gradients():
    """Dropout: the same key gives the same logits, another key or deterministic=True others.
    Remat: the whole model's logits are unchanged, and a decoder block's gradients (parameters
    and input, dropout on) equal those without it. A one-layer v1.1 model keeps compiling short."""
    config = dataclasses.replace(TINY["v1_1"], num_layers=1, num_decoder_layers=1)
    source, target, _ = (jnp.asarray(a) for a in _batch(config))
    mask, target_mask = jnp.asarray(SOURCE_MASK), jnp.asarray(TARGET_MASK)
    key = jax.random.key(3)
    logits = {}
    for remat in (False, True):
        graphdef, state = nnx.split(models.build_model(dataclasses.replace(config, remat=remat), "seq2seq_lm", seed=5))
        forward = jax.jit(lambda s, rng: nnx.merge(graphdef, s)(source, mask, target, target_mask,
                                                                  deterministic=False, dropout_rng=rng).logits)
        logits[remat] = forward(state, key)
    np.testing.assert_array_equal(logits[True], logits[False])
    assert not np.allclose(forward(state, jax.random.key(4)), logits[True])
    model = nnx.merge(graphdef, state)
    assert not np.allclose(jax.jit(lambda s: nnx.merge(graphdef, s)(source, mask, target, target_mask).logits)(state),
                           logits[True])
    with pytest.raises(ValueError, match="dropout_rng"):
        model(source, mask, target, deterministic=False)

    block = model.decoder.layers[0]
    encoder = jax.random.normal(jax.random.key(1), (2, 11, config.hidden_size))
    x = jax.random.normal(jax.random.key(2), (2, 9, config.hidden_size))
    bias = model.decoder.position_bias(jnp.arange(9), 9)
    self_mask = causal_mask(target_mask, jnp.arange(9))
    block_graph, block_state = nnx.split(block)

    def block_loss(variables, x, remat):
        out, _ = _run_block(nnx.merge(block_graph, variables), remat, x, bias, self_mask, encoder, None,
                            padding_mask(mask), key)
        return jnp.sum(jnp.sin(out))

    grads = [jax.jit(jax.grad(block_loss, argnums=(0, 1)), static_argnums=2)(block_state, x, remat)
             for remat in (False, True)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("values,key", [
    ({"feed_forward_proj": "gated-silu"}, "model.feed_forward_proj"),
    ({"d_kv": 0}, "model.d_kv"),
    ({"relative_attention_num_buckets": 2}, "model.relative_attention_num_buckets"),
    ({"relative_attention_max_distance": 4}, "model.relative_attention_max_distance"),
    ({"family": "bert", "d_kv": 16}, "model.d_kv"),
    ({"family": "gpt2", "tie_word_embeddings": False}, "model.tie_word_embeddings"),
])
def test_bad_t5_keys_are_config_errors_naming_the_key(values, key):
    base = dict(family="t5", hidden_size=32, num_heads=4) if values.get("family", "t5") == "t5" else {}
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**{**base, **values})


def test_t5_is_built_by_build_model_with_its_seq2seq_lm_head():
    assert isinstance(nnx.eval_shape(lambda: models.build_model(TINY["v1_0"], "seq2seq_lm")), T5)
    with pytest.raises(ConfigError, match="seq2seq_lm"):
        models.build_model(TINY["v1_0"], None)
    with pytest.raises(ConfigError, match="build_model"):
        models.Model(TINY["v1_0"], "seq2seq_lm", rngs=nnx.Rngs(0))
