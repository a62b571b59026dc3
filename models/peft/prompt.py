"""Prompt tuning (Lester et al. 2021): learned input embeddings prepended to every sequence.

`num_virtual_tokens` vectors [V, embed] (a `PromptParam`) are put before the word embeddings of
the input, as Hugging Face PEFT's PROMPT_TUNING does: the backbone then sees V + T positions,
adds position embeddings 0 .. V + T - 1 (and BERT's token type 0 at the virtual positions), and
every real token may attend to the prompt (the attention mask gains V ones on the left).

The backbone (BertEncoder or GPT2Decoder) becomes a subclass of its own class that holds the same
modules and parameters under the same paths plus `prompt_embeddings`, so base parameter paths
(Hugging Face names, checkpoints, sharding rules) do not change. Its call builds the input
embeddings (`embed_tokens(input_ids)`, or the caller's `inputs_embeds`), prepends the prompt and
calls the base backbone with `inputs_embeds`; it then drops the virtual positions from the
hidden states it returns, so task heads and losses see the caller's T positions:
- token-level heads (token_cls, qa, mlm, causal_lm) give [batch, T, ...], the logits Hugging Face
  PEFT's model gives at positions V .. V + T - 1 (PEFT returns all V + T; its labels would need
  V leading -100s);
- BERT's pooled output is taken, as in PEFT, at position 0: the first virtual token;
- a decoder's sequence classifier reads the last real token of the caller's attention mask;
- with `output_hidden_states` every hidden state is [batch, T, embed]; with `output_attentions`
  the probabilities are [batch, heads, T, V + T] (the key axis holds the prompt first, as prefix
  tuning's does).
Given `position_ids` [batch, T] become V + position_ids after 0 .. V - 1 for the prompt.

Generation: `init_cache` makes the cache V positions longer; the call with `cache_index=0` (a
Python int: models.generate's prefill) writes the prompt and the input into the cache, later calls
(decode steps) read it at cache_index + V.

Initialisation (`prompt_tuning_init`): `random` draws N(0, init_std²) (init_std 1.0 is PEFT's
torch Embedding default); `text` takes the word embeddings of `prompt_tuning_init_text`'s token ids
as the run's tokenizer gives them (special tokens included, as PEFT's `tokenizer(text)`), repeated
or cut to V ids.
"""
from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.bert import check_inputs
from models.errors import ConfigError
from models.peft import targets
from models.peft.config import PromptTuningConfig
from models.peft.variables import PromptParam, peft_param


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids `tokenizer` gives `text`: a callable text -> ids, or a Hugging Face tokenizer
    (its `input_ids`)."""
    ids = tokenizer(text)
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def init_token_ids(ids: list[int], num_virtual_tokens: int) -> list[int]:
    """`ids` repeated or cut to `num_virtual_tokens` ids (Hugging Face PEFT's TEXT initialisation)."""
    if not ids:
        raise ConfigError("peft.prompt_tuning_init_text: the tokenizer gives no token ids for the text")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


class PromptBackbone:
    """Mixin for a backbone class: prepends `prompt_embeddings` [V, embed] to the input embeddings.

    Built by `prompt_backbone_class`; `__init__` adopts an existing backbone's attributes (its
    modules and parameters, unchanged), so nothing is re-initialised and parameter paths stay the same.
    """

    def __init__(self, backbone: nnx.Module, prompt: jax.Array):
        targets.adopt(self, backbone)
        self.num_virtual_tokens = int(prompt.shape[0])
        self.prompt_embeddings = peft_param(PromptParam, prompt, ("prompt", "embed"))

    def init_cache(self, batch: int, max_len: int):
        """The base cache for max_len + V positions (the prompt's keys and values come first)."""
        total = max_len + self.num_virtual_tokens
        if total > self.config.max_position_embeddings:
            raise ConfigError(f"peft.num_virtual_tokens={self.num_virtual_tokens}: {self.num_virtual_tokens} virtual "
                              f"tokens + {max_len} positions exceed max_position_embeddings="
                              f"{self.config.max_position_embeddings}")
        return super().init_cache(batch, total)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 inputs_embeds=None, cache=None, cache_index=None, output_attentions: bool = False, **kwargs):
        batch, seq = check_inputs(input_ids, inputs_embeds)
        v = self.num_virtual_tokens
        extra = {"output_attentions": output_attentions}
        if attention_mask is not None:
            ones = jnp.ones((batch, v), attention_mask.dtype)
            attention_mask = jnp.concatenate([ones, attention_mask], axis=1)
        prepend = cache is None or (isinstance(cache_index, int) and cache_index == 0)
        if cache is not None:
            extra.update(cache=cache, cache_index=cache_index if prepend else cache_index + v)
        if not prepend:  # a decode step: the prompt is in the cache already
            if position_ids is not None:
                position_ids = position_ids + v
            return super().__call__(input_ids, attention_mask, token_type_ids, position_ids,
                                    inputs_embeds=inputs_embeds, **extra, **kwargs)
        if seq + v > self.config.max_position_embeddings:
            raise ConfigError(f"peft.num_virtual_tokens={v}: {v} virtual tokens + {seq} input positions exceed "
                              f"max_position_embeddings={self.config.max_position_embeddings}")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        prompt = jnp.broadcast_to(self.prompt_embeddings[...].astype(embeds.dtype), (batch,) + self.prompt_embeddings.shape)
        embeds = jnp.concatenate([prompt, embeds], axis=1)
        if token_type_ids is not None:
            token_type_ids = jnp.concatenate([jnp.zeros((batch, v), token_type_ids.dtype), token_type_ids], axis=1)
        if position_ids is not None:
            first = jnp.broadcast_to(jnp.arange(v, dtype=position_ids.dtype), (batch, v))
            position_ids = jnp.concatenate([first, position_ids + v], axis=1)
        out = super().__call__(None, attention_mask, token_type_ids, position_ids, inputs_embeds=embeds,
                               **extra, **kwargs)
        hidden, pooled, *rest = out
        if kwargs.get("output_hidden_states"):
            index = 1 if cache is not None else 0
            rest[index] = tuple(h[:, v:] for h in rest[index])
        if output_attentions:
            rest[-1] = tuple(p[:, :, v:] for p in rest[-1])
        return (hidden[:, v:], pooled, *rest)


_backbone_classes: dict[type, type] = {}


def prompt_backbone_class(cls: type) -> type:
    """`Prompt<Backbone>`: the backbone class `cls` with the PromptBackbone mixin (one class per backbone class)."""
    if cls not in _backbone_classes:
        _backbone_classes[cls] = types.new_class(
            f"Prompt{cls.__name__}", (PromptBackbone, cls), {},
            lambda ns: ns.update({"__module__": __name__, "__doc__": f"{cls.__name__} with a learned soft prompt."}),
        )
    return _backbone_classes[cls]


def initial_prompt(model, config: PromptTuningConfig, rngs: nnx.Rngs, tokenizer: Callable | None,
                   restoring: bool) -> jax.Array:
    """The prompt's initial values [V, embed] (float32)."""
    shape = (config.num_virtual_tokens, model.config.hidden_size)
    if config.prompt_tuning_init == "text" and not restoring:
        if tokenizer is None:
            raise ConfigError(
                "peft.prompt_tuning_init='text' needs the run's tokenizer to turn peft.prompt_tuning_init_text into "
                "token ids: pass peft.apply(..., tokenizer=...)")
        ids = init_token_ids(text_token_ids(tokenizer, config.prompt_tuning_init_text), config.num_virtual_tokens)
        vocab = model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"peft.prompt_tuning_init_text: token id {bad[0]} is outside the model's vocabulary "
                              f"(vocab_size={vocab}); use the tokenizer the model was trained with")
        return model.embed_tokens(jnp.asarray(ids, jnp.int32)[None])[0].astype(jnp.float32)
    return config.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)


def apply_prompt(model, config: PromptTuningConfig, rngs: nnx.Rngs, *, tokenizer: Callable | None = None,
                 restoring: bool = False) -> None:
    """Makes the model's backbone a prompt-tuned one, in place."""
    prompt = initial_prompt(model, config, rngs, tokenizer, restoring)
    model.backbone = prompt_backbone_class(type(model.backbone))(model.backbone, prompt)


def prompt_backbone(model) -> PromptBackbone | None:
    """The model's backbone if prompt tuning is applied, else None."""
    return model.backbone if isinstance(model.backbone, PromptBackbone) else None
