"""models.generate against a second code path (full recomputation without a cache), PyTorch
`generate` on the same random GPT-2, hand-computed / transformers top-k and top-p filters, and the
frequencies of sampled tokens against temperature and top-p as defined (binomial bounds at 5 sigma)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import models
from flaxen.errors import ConfigError
from models import generation
from models.gpt2 import GPT2Decoder

torch.set_num_threads(1)
NEW = 6
EOS = 98
PAD = 0


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 (wider init than the default so that greedy choices are well separated)."""
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2")
    torch_model.save_pretrained(path)
    return torch_model, models.load_pretrained(path, head="causal_lm")


@pytest.fixture(scope="module")
def prompts():
    """Left-padded prompts [3, 7] and their mask."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 98, size=(3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = PAD
    return ids, mask


@pytest.fixture(scope="module")
def full_logits(gpt2):
    """logits(tokens, mask) of the whole sequence without a cache (one compiled shape)."""
    _, model = gpt2

    @jax.jit
    def run(tokens, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return model(tokens, attention_mask=mask, position_ids=positions).logits

    return run


def _recompute_greedy(full_logits, ids, mask, new):
    """Greedy decoding by recomputing the full sequence at every step."""
    batch, prompt_len = ids.shape
    tokens = np.concatenate([ids, np.zeros((batch, new), np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.ones((batch, new), np.int32)], axis=1)
    for step in range(new):
        logits = np.asarray(full_logits(tokens, full_mask))
        tokens[:, prompt_len + step] = logits[:, prompt_len + step - 1].argmax(-1)
    return tokens


@pytest.fixture(scope="module")
def greedy(gpt2, prompts):
    _, model = gpt2
    ids, mask = prompts
    return np.asarray(models.generate(model, ids, mask, max_new_tokens=NEW))


def test_greedy_with_cache_equals_full_recomputation(greedy, full_logits, prompts):
    ids, mask = prompts
    assert greedy.shape == (3, 7 + NEW)
    np.testing.assert_array_equal(greedy, _recompute_greedy(full_logits, ids, mask, NEW))


def test_greedy_equals_pytorch_generate(greedy, gpt2, prompts):
    torch_model, _ = gpt2
    ids, mask = prompts
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                        do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                                        eos_token_id=None, pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(greedy, expected)


def test_eos_stops_and_pads(gpt2, prompts, greedy):
    torch_model, model = gpt2
    ids, mask = prompts
    eos = int(greedy[0, 7 + 1])
    out = np.asarray(models.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD))
    for row in range(3):
        new = list(greedy[row, 7:])
        stop = new.index(eos) + 1 if eos in new else NEW
        np.testing.assert_array_equal(out[row, :7 + stop], greedy[row, :7 + stop])
        assert (out[row, 7 + stop:] == PAD).all()
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                        do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                                        pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(out[:, :expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == PAD).all()


def test_decode_loop_is_not_retraced(gpt2, prompts, greedy, monkeypatch):
    """After the `greedy` call compiled this shape, new token values, EOS and pad ids reuse it."""
    _, model = gpt2
    ids, mask = prompts
    calls = []
    original = GPT2Decoder.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2Decoder, "__call__", counted)
    other = np.where(mask == 1, (ids * 7 + 3) % 97 + 1, PAD).astype(np.int32)
    out = models.generate(model, other, mask, max_new_tokens=NEW, eos_token_id=5, pad_token_id=1)
    models.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    assert not np.array_equal(np.asarray(out), greedy)
    assert calls == []
    model(jnp.asarray(ids[:, :1]))
    assert calls == [1]


def test_sampling_stays_in_top_k_and_follows_rng(gpt2, prompts, full_logits):
    _, model = gpt2
    ids, mask = prompts
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=3, top_p=0.9, temperature=0.7)
    first = np.asarray(models.generate(model, ids, mask, rng=jax.random.key(0), **kwargs))
    again = np.asarray(models.generate(model, ids, mask, rng=jax.random.key(0), **kwargs))
    other = np.asarray(models.generate(model, ids, mask, rng=jax.random.key(1), **kwargs))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    full_mask = np.concatenate([mask, np.ones((3, NEW), np.int32)], axis=1)
    logits = np.asarray(full_logits(first, full_mask))
    for step in range(NEW):
        top3 = np.argsort(-logits[:, 7 + step - 1], axis=-1)[:, :3]
        assert all(first[b, 7 + step] in top3[b] for b in range(3))


def test_top_k_and_top_p_by_hand():
    logits = jnp.log(jnp.array([0.05, 0.5, 0.15, 0.2, 0.1]))
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x))).tolist())
    assert kept(generation.top_k_filter(logits, 2)) == {1, 3}
    assert kept(generation.top_k_filter(logits, 1)) == {1}
    assert kept(generation.top_p_filter(logits, 0.6)) == {1, 3}
    assert kept(generation.top_p_filter(logits, 0.5)) == {1}
    assert kept(generation.top_p_filter(logits, 0.8)) == {1, 3, 2}
    assert kept(generation.top_p_filter(logits, 0.01)) == {1}
    np.testing.assert_array_equal(np.asarray(generation.top_p_filter(logits, 0.6))[[1, 3]], np.asarray(logits)[[1, 3]])


def test_top_k_and_top_p_match_transformers():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for k in (1, 5, 50):
        expected = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(generation.top_k_filter(jnp.asarray(logits), k)), expected)
    for p in (0.3, 0.75, 0.95):
        expected = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.isfinite(np.asarray(generation.top_p_filter(jnp.asarray(logits), p))),
                                      np.isfinite(expected))


def test_generate_argument_errors(gpt2, prompts):
    _, model = gpt2
    ids, mask = prompts
    right_padded = np.ones_like(mask)
    right_padded[1, -2:] = 0
    with pytest.raises(ConfigError, match="left-padded"):
        models.generate(model, ids, right_padded, max_new_tokens=2)
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings=64"):
        models.generate(model, ids, mask, max_new_tokens=60)
    with pytest.raises(ConfigError, match="needs an rng"):
        models.generate(model, ids, mask, max_new_tokens=2, do_sample=True)
    config = models.ModelConfig(vocab_size=99, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=37,
                                max_position_embeddings=64)
    encoder = nnx.eval_shape(lambda: models.build_model(config))
    with pytest.raises(ConfigError, match="head='causal_lm'"):
        models.generate(encoder, ids, mask, max_new_tokens=2)


# ----------------------------------------------------------------------------- sampling distribution


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """The top-p distribution by its definition: the smallest set of most likely tokens whose
    probabilities sum to at least p, renormalised; 0 elsewhere."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, p)) + 1  # first index where the sum reaches p
    kept = np.zeros_like(probs)
    kept[order[:size]] = probs[order[:size]]
    return kept / kept.sum()


@pytest.mark.parametrize("temperature, top_p", [(0.5, None), (2.0, None), (1.5, 0.7)])
def test_sampled_tokens_follow_temperature_and_top_p_by_definition(gpt2, prompts, full_logits, temperature, top_p):
    """The first sampled token of each prompt, drawn 6000 times: its frequencies match
    softmax(logits / temperature) (restricted to the top-p nucleus when top_p is given), with the
    logits from the cache-free forward pass. Every count within 5 binomial standard deviations of
    its expectation (+1 for the discreteness); tokens outside the nucleus never drawn."""
    _, model = gpt2
    ids, mask = prompts
    rows = 6000
    logits = np.asarray(full_logits(ids, mask), np.float64)[:, -1]
    tiled_ids, tiled_mask = np.repeat(ids, rows, axis=0), np.repeat(mask, rows, axis=0)
    out = np.asarray(models.generate(model, tiled_ids, tiled_mask, max_new_tokens=1, do_sample=True,
                                     temperature=temperature, top_p=top_p, rng=jax.random.key(3)))
    drawn = out[:, -1].reshape(len(ids), rows)
    for prompt in range(len(ids)):
        scaled = logits[prompt] / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if top_p is not None:
            probs = _nucleus(probs, top_p)
            assert 1 < np.count_nonzero(probs) < len(probs)
        counts = np.bincount(drawn[prompt], minlength=len(probs))
        expected = rows * probs
        bound = 5 * np.sqrt(rows * probs * (1 - probs)) + 1
        assert (counts[probs == 0] == 0).all(), np.flatnonzero(counts[probs == 0])
        assert (np.abs(counts - expected) <= bound).all(), (prompt, np.flatnonzero(np.abs(counts - expected) > bound))
        assert probs.max() < 0.9  # a spread distribution: the temperature's effect is visible
