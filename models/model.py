"""`Model`: a backbone (BertEncoder, RobertaEncoder or GPT2Decoder) with an optional task head.

The one callable flaxen trains and evaluates:
    out = model(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, deterministic=True, dropout_rng=None, cache=None, cache_index=None,
                output_attentions=False, output_hidden_states=False)
    out.last_hidden_state [batch, seq, embed]; out.pooler_output [batch, embed] | None;
    out.logits (per head) | None; out.start_logits, out.end_logits [batch, seq] ('qa') | None;
    out.hidden_states: with output_hidden_states, N + 1 arrays [batch, seq, embed] (the embedding
        output, then each layer's output; GPT-2's last is after its final LayerNorm) | None;
    out.attentions: with output_attentions, one [batch, heads, q_len, k_len] float32 array of
        softmax probabilities per layer (k_len includes a prefix-tuning prefix) | None.
Dropout is explicit and functional: no RNG state lives in the model; a training step passes
`dropout_rng` (e.g. fold_in(key, step)) with `deterministic=False`.

These follow Hugging Face's meanings. Exactly one of input_ids [batch, seq] and inputs_embeds
[batch, seq, embed] is given; inputs_embeds replaces the word-embedding lookup
`model.embed_tokens(input_ids)` (positions, token types and BERT's embedding LayerNorm still
apply), so `model(inputs_embeds=model.embed_tokens(ids))` equals `model(ids)` and gradients can
be taken with respect to the embeddings. The output flags are static Python bools: off, the
traced program is the same as without them; on, attention takes the explicit softmax path (the
fused kernel returns no probabilities), and with attention dropout in training the returned
probabilities are those before dropout.

The head is built and applied through its models.heads.HEADS entry; nothing here tests a head's
name, so a new head needs no change to this file.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.bert import ENCODERS
from models.config import ModelConfig
from models.errors import ConfigError
from models.gpt2 import GPT2Decoder
from models.heads import HEADS, lookup


@struct.dataclass
class ModelOutput:
    last_hidden_state: jax.Array
    pooler_output: Optional[jax.Array] = None
    logits: Optional[jax.Array] = None
    cache: Any = None
    start_logits: Optional[jax.Array] = None
    end_logits: Optional[jax.Array] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


class Model(nnx.Module):
    def __init__(self, config: ModelConfig, head: str | None = None, num_labels: int = 2, *, rngs: nnx.Rngs):
        if config.family == "t5":
            raise ConfigError("model.family='t5' is an encoder-decoder: build it with models.build_model(config, "
                              "'seq2seq_lm')")
        spec = lookup(head, config.family)
        self.config = config
        self.head_name = head
        self.num_labels = num_labels if spec.takes_labels else None
        if config.family in ENCODERS:
            self.backbone = ENCODERS[config.family](config, add_pooler=spec.uses_pooler(config.family), rngs=rngs)
        else:
            self.backbone = GPT2Decoder(config, rngs=rngs)
        self.head = spec.build(config, num_labels, rngs)

    def embed_tokens(self, input_ids):
        """The word-embedding lookup [batch, seq, embed] of input_ids [batch, seq]: what `inputs_embeds` replaces."""
        return self.backbone.embed_tokens(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 inputs_embeds=None, deterministic: bool = True, dropout_rng=None, cache=None, cache_index=None,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 head_positions_only: bool = False, masked_positions=None) -> ModelOutput:
        """The backbone, then the head. `head_positions_only` (a static bool): compute the last block
        only at the positions the head reads, when the head says which (HeadSpec.reads_pooled_only:
        BERT's pooled heads read position 0); the head's outputs are the same, `last_hidden_state`
        then holds those positions only. Training and evaluation steps ask for it (flaxen's
        seq_cls task): it skips 5/6 of the last block's work for classification.

        `masked_positions` [batch, m] (integer positions; heads with HeadSpec.positionwise, e.g.
        'mlm'): the head reads the final hidden states at these positions only, so its outputs are
        [batch, m, ...] (the full outputs gathered there) for m / seq of its work (BERT's
        masked_lm_positions: flaxen's mlm task trains the vocabulary projection at the masked
        tokens alone). None: the head at every position; `last_hidden_state` is always full."""
        if not deterministic and dropout_rng is None:
            raise ValueError("deterministic=False needs a dropout_rng")
        if masked_positions is not None and not HEADS[self.head_name].positionwise:
            raise ConfigError(f"masked_positions: head {self.head_name!r} does not read each position's hidden state "
                              "alone; heads that do: " + ", ".join(
                                  repr(name) for name, spec in HEADS.items() if spec.positionwise))
        rng = None if deterministic else dropout_rng
        backbone_rng = None if rng is None else jax.random.fold_in(rng, 0)
        head_rng = None if rng is None else jax.random.fold_in(rng, 1)
        extra = {} if cache is None else {"cache": cache, "cache_index": cache_index}
        if (head_positions_only and HEADS[self.head_name].reads_pooled_only and getattr(self.backbone, "pooler", None)
                is not None and cache is None and not output_hidden_states and not output_attentions):
            extra["first_position_only"] = True
        hidden, pooled, *rest = self.backbone(
            input_ids, attention_mask, token_type_ids, position_ids, dropout_rng=backbone_rng,
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, **extra,
        )
        new_cache = rest.pop(0) if cache is not None else None
        hidden_states = rest.pop(0) if output_hidden_states else None
        attentions = rest.pop(0) if output_attentions else None
        head_hidden = hidden
        if masked_positions is not None:
            head_hidden = jnp.take_along_axis(hidden, jnp.asarray(masked_positions, jnp.int32)[..., None], axis=1)
        outputs = HEADS[self.head_name].apply(self.head, head_hidden, pooled, self, attention_mask, input_ids,
                                              head_rng)
        outputs = {name: value.astype(jnp.float32) for name, value in outputs.items()}
        return ModelOutput(hidden, pooled, cache=new_cache, hidden_states=hidden_states, attentions=attentions,
                           **outputs)


def build_model(config: ModelConfig, head: str | None = None, num_labels: int = 2, *, rngs: nnx.Rngs | None = None,
                seed: int = 0) -> Model:
    """A randomly initialised model of `config` with the given head (a models.heads.HEADS name:
    'mlm', 'causal_lm', 'seq_cls', 'token_cls', 'qa'; None for the bare backbone; 'seq2seq_lm' for
    family 't5', which builds the encoder-decoder models.t5.T5 with its own call convention)."""
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    if config.family == "t5":
        from models.t5 import T5  # models.t5 imports this module

        return T5(config, head, num_labels, rngs=rngs)
    return Model(config, head, num_labels, rngs=rngs)
