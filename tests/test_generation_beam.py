"""models.generate's beam search and encoder-decoder generation.

GPT-2 (num_beams > 1, and greedy through the same entry point): equal token for token to PyTorch
`generate` on the same random model, for left-padded prompts of different lengths, with and
without EOS, several length penalties (positive, zero, negative) and every early_stopping mode;
exhaustive search when num_beams = vocab_size; one compiled loop for all traced settings; option
errors.
T5 (v1.0 relu/tied and v1.1 gated-GELU/untied): greedy with the encoder run once and the decoder's
cache equals recomputing the whole model every step; greedy and beam search equal PyTorch
`T5ForConditionalGeneration.generate` on padded sources; sampling stays in the top-k and follows
the seed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import models
from models.errors import ConfigError
from models.gpt2 import GPT2Decoder

torch.set_num_threads(1)
NEW = 8
BEAMS = 4
PAD = 1  # nonzero: Hugging Face's beam search fills after EOS with the EOS token when pad_token_id is 0


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 without a configured EOS (each call names its own), wide init so that the
    scores of competing beams are well separated."""
    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=PAD, initializer_range=0.3)
    torch.manual_seed(0)
    torch_model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2_beam")
    torch_model.save_pretrained(path)
    return torch_model, models.load_pretrained(path, head="causal_lm")


@pytest.fixture(scope="module")
def prompts():
    """Left-padded prompts [3, 6] of lengths 6, 4 and 2."""
    rng = np.random.default_rng(2)
    ids = rng.integers(2, 61, size=(3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _torch_generate(torch_model, ids, mask, **kwargs):
    with torch.no_grad():
        return torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                    do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, **kwargs).numpy()


@pytest.fixture(scope="module")
def eos(gpt2, prompts):
    """An EOS that the beams meet: the most frequent new token of the best beams without EOS."""
    torch_model, _ = gpt2
    ids, mask = prompts
    expected = _torch_generate(torch_model, ids, mask, num_beams=BEAMS, eos_token_id=None)
    return int(np.bincount(expected[:, ids.shape[1]:].ravel()).argmax())


def _assert_equal_to_torch(out, expected, prompt_len):
    """`out` [batch, prompt_len + NEW] holds PyTorch's (possibly shorter) output, then pad tokens."""
    assert out.shape == (expected.shape[0], prompt_len + NEW)
    np.testing.assert_array_equal(out[:, :expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == PAD).all()


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, with_eos", [
    (1, 1.0, False, False),
    (1, 1.0, False, True),
    (BEAMS, 1.0, False, False),
    (BEAMS, 1.0, False, True),
    (BEAMS, 2.0, True, True),
    (BEAMS, 0.5, False, True),
    (BEAMS, -1.0, True, True),
    (BEAMS, 0.8, "never", True),
    (BEAMS, -0.5, "never", True),
    (BEAMS, 0.0, True, False),
])
def test_equals_pytorch_generate(gpt2, prompts, eos, num_beams, length_penalty, early_stopping, with_eos):
    """[batch, prompt_len + NEW]: what PyTorch generates (its output stops at the longest returned
    hypothesis), then pad tokens; after a hypothesis' EOS only pad tokens."""
    torch_model, model = gpt2
    ids, mask = prompts
    eos_token_id = eos if with_eos else None
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                  eos_token_id=eos_token_id)
    expected = _torch_generate(torch_model, ids, mask, **kwargs)
    out = np.asarray(models.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs))
    _assert_equal_to_torch(out, expected, ids.shape[1])
    new = out[:, ids.shape[1]:]
    if with_eos and num_beams > 1:
        # the EOS path is exercised: some hypothesis that ends in EOS is returned, pad tokens after it
        assert (new == eos).any()
    for row in new:
        hits = np.flatnonzero(row == eos) if with_eos else []
        if len(hits):
            assert (row[hits[0] + 1:] == PAD).all()


def test_as_many_beams_as_tokens_is_exhaustive_search(gpt2, prompts):
    """With num_beams = vocab_size, two new tokens, no EOS and length_penalty=0, beam search keeps
    every first token and so returns the best of all vocab² continuations: the argmax of their
    summed log-probabilities under the cache-free model, computed here for every pair."""
    _, model = gpt2
    ids, mask = prompts
    vocab = model.config.vocab_size
    out = np.asarray(models.generate(model, ids, mask, max_new_tokens=2, num_beams=vocab, length_penalty=0.0))
    rows, prompt_len = ids.shape
    first = np.tile(np.arange(vocab, dtype=np.int32), rows)
    tokens = np.concatenate([np.repeat(ids, vocab, axis=0), first[:, None]], axis=1)
    full_mask = np.concatenate([np.repeat(mask, vocab, axis=0), np.ones((rows * vocab, 1), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    logits = jax.jit(lambda t, m, p: model(t, m, position_ids=p).logits)(tokens, full_mask, positions)
    logp = np.asarray(jax.nn.log_softmax(logits[:, -2:], axis=-1), np.float64)  # [rows * vocab, 2, vocab]
    total = logp[np.arange(rows * vocab), 0, first][:, None] + logp[:, 1]  # first token + every second token
    best = total.reshape(rows, vocab * vocab).argmax(-1)
    np.testing.assert_array_equal(out[:, prompt_len:], np.stack([best // vocab, best % vocab], axis=1))
    np.testing.assert_array_equal(out[:, :prompt_len], ids)


def test_beam_loop_is_not_retraced(gpt2, prompts, eos, monkeypatch):
    """After the parametrised calls compiled the beam loop, new prompts, EOS, pad, length_penalty
    and early_stopping values reuse it."""
    _, model = gpt2
    ids, mask = prompts
    models.generate(model, ids, mask, max_new_tokens=NEW, num_beams=BEAMS, pad_token_id=PAD)
    calls = []
    original = GPT2Decoder.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2Decoder, "__call__", counted)
    other = np.where(mask == 1, (ids * 7 + 3) % 59 + 2, PAD).astype(np.int32)
    for length_penalty, early_stopping in ((0.7, True), (1.3, "never"), (-2.0, False)):
        models.generate(model, other, mask, max_new_tokens=NEW, num_beams=BEAMS, eos_token_id=eos, pad_token_id=3,
                        length_penalty=length_penalty, early_stopping=early_stopping)
    assert calls == []


def test_option_errors(gpt2, prompts):
    _, model = gpt2
    ids, mask = prompts
    with pytest.raises(ConfigError, match="num_beams=4 with do_sample=True"):
        models.generate(model, ids, mask, max_new_tokens=2, num_beams=4, do_sample=True, seed=0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="num_beams must be a positive integer"):
            models.generate(model, ids, mask, max_new_tokens=2, num_beams=bad)
    for bad in (float("nan"), float("inf"), "1.0", None):
        with pytest.raises(ConfigError, match="length_penalty must be a finite number"):
            models.generate(model, ids, mask, max_new_tokens=2, num_beams=2, length_penalty=bad)
    for bad in ("always", 1, None):
        with pytest.raises(ConfigError, match="early_stopping must be True, False or 'never'"):
            models.generate(model, ids, mask, max_new_tokens=2, num_beams=2, early_stopping=bad)
    with pytest.raises(ConfigError, match="decoder_start_token_id applies to encoder-decoder models only"):
        models.generate(model, ids, mask, max_new_tokens=2, decoder_start_token_id=0)
    with pytest.raises(ConfigError, match="either rng or seed"):
        models.generate(model, ids, mask, max_new_tokens=2, do_sample=True, seed=0, rng=np.zeros(2))


# ----------------------------------------------------------------------------- encoder-decoder (T5)

T5_NEW = 7
T5_PAD = 2  # nonzero, as PAD


def _t5_config(feed_forward_proj: str) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=61, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=feed_forward_proj == "relu",
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=None,
    )


@pytest.fixture(scope="module", params=["relu", "gated-gelu"], ids=["t5_v1_0", "t5_v1_1"])
def t5(request, tmp_path_factory):
    """A random T5ForConditionalGeneration (v1.0: relu, tied output layer; v1.1: gated GELU, own
    lm_head) without a configured EOS, every parameter perturbed so that choices are well separated,
    and the same model in flaxen (save_pretrained / models.load_pretrained)."""
    torch.manual_seed(len(request.param))
    torch_model = transformers.T5ForConditionalGeneration(_t5_config(request.param))
    if not torch_model.config.tie_word_embeddings:
        torch_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(torch_model.shared.weight))
    with torch.no_grad():
        for p in torch_model.parameters():
            p.normal_(0.0, 1.0 / np.sqrt(p.shape[-1])).add_(1.0 if p.ndim == 1 else 0.0)
    torch_model.eval()
    path = tmp_path_factory.mktemp(f"t5_{request.param}")
    torch_model.save_pretrained(path)
    return torch_model, models.load_pretrained(path, head="seq2seq_lm")


@pytest.fixture(scope="module")
def sources():
    """Sources [3, 9], right-padded to lengths 9, 6 and 3."""
    rng = np.random.default_rng(3)
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return (rng.integers(3, 61, mask.shape) * mask).astype(np.int32), mask


def _t5_torch_generate(torch_model, ids, mask, **kwargs):
    with torch.no_grad():
        return torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                    do_sample=False, max_new_tokens=T5_NEW, pad_token_id=T5_PAD, **kwargs).numpy()


@pytest.mark.parametrize("t5", ["relu"], indirect=True, ids=["t5_v1_0"])
def test_t5_greedy_with_cache_equals_full_recomputation(t5, sources):
    """Greedy with the encoder run once and the decoder's cache equals argmax decoding that calls the
    whole model (encoder and decoder, no cache) on the decoder sequence at every step. The decoder
    input has a fixed length (one compiled shape): causal attention keeps the tokens not chosen yet
    from affecting the logits read at the current position."""
    _, model = t5
    ids, mask = sources
    out = np.asarray(models.generate(model, ids, mask, max_new_tokens=T5_NEW))
    logits_of = jax.jit(lambda decoder: model(jnp.asarray(ids), jnp.asarray(mask), decoder).logits)
    decoder = np.zeros((3, T5_NEW), np.int32)
    decoder[:, 0] = model.decoder_start_token_id
    expected = decoder.copy()
    for step in range(T5_NEW):
        token = np.asarray(logits_of(decoder)[:, step].argmax(-1), np.int32)
        if step + 1 < T5_NEW:
            decoder[:, step + 1] = token
    expected = np.concatenate([decoder, token[:, None]], axis=1)
    assert out.shape == (3, 1 + T5_NEW)
    np.testing.assert_array_equal(out, expected)
    assert len(set(out[:, 1:].ravel().tolist())) > 3  # not one repeated token


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, with_eos", [
    (1, 1.0, False, False),
    (1, 1.0, False, True),
    (BEAMS, 1.0, False, False),
    (BEAMS, 2.0, True, True),
    (BEAMS, 0.5, False, True),
    (BEAMS, 0.8, "never", True),
])
def test_t5_equals_pytorch_generate(t5, sources, num_beams, length_penalty, early_stopping, with_eos):
    """[batch, 1 + max_new_tokens]: the decoder start token, then what PyTorch generates (its output
    may stop earlier), then pad tokens. The EOS is the most frequent new token of the same search
    without EOS."""
    torch_model, model = t5
    ids, mask = sources
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=None)
    if with_eos:
        plain = _t5_torch_generate(torch_model, ids, mask, **kwargs)
        eos = kwargs["eos_token_id"] = int(np.bincount(plain[:, 1:].ravel()).argmax())
    expected = _t5_torch_generate(torch_model, ids, mask, **kwargs)
    out = np.asarray(models.generate(model, ids, mask, max_new_tokens=T5_NEW, pad_token_id=T5_PAD, **kwargs))
    assert out.shape == (3, 1 + T5_NEW)
    np.testing.assert_array_equal(out[:, :expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == T5_PAD).all()
    if with_eos:  # the EOS matters: a returned hypothesis ends with it, or the search chose differently
        assert (out[:, 1:] == eos).any() or not np.array_equal(expected, plain)


@pytest.mark.parametrize("t5", ["relu"], indirect=True, ids=["t5_v1_0"])
def test_t5_sampling_stays_in_top_k_and_follows_seed(t5, sources):
    """Sampled tokens are among the 3 most likely under the cache-free model; a seed repeats them."""
    _, model = t5
    ids, mask = sources
    kwargs = dict(max_new_tokens=T5_NEW, do_sample=True, top_k=3, temperature=2.0)
    first = np.asarray(models.generate(model, ids, mask, seed=0, **kwargs))
    np.testing.assert_array_equal(first, np.asarray(models.generate(model, ids, mask, seed=0, **kwargs)))
    assert not np.array_equal(first, np.asarray(models.generate(model, ids, mask, seed=1, **kwargs)))
    logits = np.asarray(jax.jit(lambda *args: model(*args).logits)(ids, mask, first[:, :-1]))
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (first[:, 1:, None] == top3).any(-1).all()


@pytest.mark.parametrize("t5", ["relu"], indirect=True, ids=["t5_v1_0"])
def test_t5_option_errors(t5, sources):
    _, model = t5
    ids, mask = sources
    empty = mask.copy()
    empty[2] = 0
    with pytest.raises(ConfigError, match="every source row needs at least one token"):
        models.generate(model, ids, empty, max_new_tokens=2)
    with pytest.raises(ConfigError, match="decoder_start_token_id must be a token id in \\[0, 61\\)"):
        models.generate(model, ids, mask, max_new_tokens=2, decoder_start_token_id=61)
    with pytest.raises(ConfigError, match="length_penalty must be a finite number"):
        models.generate(model, ids, mask, max_new_tokens=2, num_beams=2, length_penalty=float("-inf"))
