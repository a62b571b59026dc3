"""BERT-family encoder (BERT, MiniLM, RoBERTa): embeddings, post-LN blocks, pooler.

input_ids [batch, seq] -> word + position + token-type embeddings -> LayerNorm -> N x
(attention -> add & LayerNorm -> MLP with exact GELU -> add & LayerNorm) -> hidden states
[batch, seq, embed]; the pooler is tanh(dense(h[:, 0])). Parameter names follow the Hugging Face
layout closely so that models.hf maps them one to one.

RoBERTa (`RobertaEncoder`, family 'roberta') is the same encoder numbering positions as fairseq
does: a padding token (input_ids == pad_token_id) gets position pad_token_id, the others
pad_token_id + 1, + 2, ... counting only non-padding tokens (so max_position_embeddings must exceed
pad_token_id + the longest input); with inputs_embeds, pad_token_id + 1 .. pad_token_id + seq.
A model with one token type (type_vocab_size 1, RoBERTa) reads every position as type 0, so the
type 1 of a tokenizer's pair template cannot index past its one-row table.

`inputs_embeds` [batch, seq, embed] replaces the word-embedding lookup (position and token-type
embeddings and the LayerNorm still apply). `output_hidden_states` / `output_attentions` (static
bools) add, as in Hugging Face, the embedding output and every layer's output, and every layer's
attention probabilities [batch, heads, seq, k_len]; off, the traced program is unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import SelfAttention, padding_mask
from models.config import ModelConfig
from models.errors import ConfigError
from models.layers import Dense, Embed, LayerNorm, constrain, dropout, gelu_exact

ACTIVATION = ("batch", "length", "embed")


class BertEmbeddings(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        std, dt = config.initializer_range, config.compute_dtype
        self.word = Embed(config.vocab_size, config.hidden_size, ("vocab", "embed"), rngs=rngs, init_std=std, dtype=dt)
        self.position = Embed(
            config.max_position_embeddings, config.hidden_size, ("position", "embed"), rngs=rngs, init_std=std, dtype=dt
        )
        self.token_type = Embed(
            config.type_vocab_size, config.hidden_size, ("token_type", "embed"), rngs=rngs, init_std=std, dtype=dt
        )
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, input_ids, token_type_ids, position_ids, *, dropout_rng=None, inputs_embeds=None):
        """inputs_embeds [batch, seq, embed], when given, stands in for the lookup of input_ids."""
        words = self.word(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.word.dtype)
        x = words + self.position(position_ids) + self.token_type(token_type_ids)
        return dropout(self.norm(x), self.dropout_rate, dropout_rng)


class BertLayer(nnx.Module):
    """One post-LN Transformer block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
        e, m, std, dt = config.hidden_size, config.intermediate_size, config.initializer_range, config.compute_dtype
        self.attention = SelfAttention(config, rngs=rngs, num_heads=config.heads_in_layer(layer))
        self.attention_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.intermediate = Dense(e, m, ("embed", "mlp"), rngs=rngs, init_std=std, dtype=dt, use_bias=config.use_bias)
        self.output = Dense(m, e, ("mlp", "embed"), rngs=rngs, init_std=std, dtype=dt, use_bias=config.use_bias)
        self.output_norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt, use_bias=config.use_bias)
        self.dropout_rate = config.hidden_dropout

    def __call__(self, x, mask, dropout_rng=None, output_attentions: bool = False, query_length: int | None = None):
        """x [batch, seq, embed] -> the same shape, or (it, attention probabilities) with output_attentions.
        `query_length`: only the first positions are computed (they attend to all keys): [batch,
        query_length, embed]."""
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        h, _, *probs = self.attention(x, mask, dropout_rng=rngs[0], output_attentions=output_attentions,
                                      **({} if query_length is None else {"query_length": query_length}))
        if query_length is not None:
            x = x[:, :query_length]
        x = self.attention_norm(x + dropout(h, self.dropout_rate, rngs[1]))
        h = self.output(constrain(gelu_exact(self.intermediate(x)), ("batch", "length", "mlp")))
        x = self.output_norm(x + dropout(h, self.dropout_rate, rngs[2]))
        return (x, probs[0]) if output_attentions else x


class BertPooler(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e = config.hidden_size
        self.dense = Dense(e, e, ("embed", "embed_out"), rngs=rngs, init_std=config.initializer_range,
                           dtype=config.compute_dtype)

    def __call__(self, hidden):
        return jnp.tanh(self.dense(hidden[:, 0]))


def check_inputs(input_ids, inputs_embeds) -> tuple[int, int]:
    """(batch, seq) of the one of input_ids [batch, seq] / inputs_embeds [batch, seq, embed] given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    return input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]


class BertEncoder(nnx.Module):
    """Embeddings + blocks (+ pooler). Returns (hidden [batch, seq, embed], pooled [batch, embed] | None),
    then, when asked, the tuple of hidden states (embedding output, then each layer's output; N + 1
    arrays [batch, seq, embed]) and the tuple of attention probabilities (one [batch, heads, seq, seq]
    float32 array per layer), in that order."""

    def __init__(self, config: ModelConfig, *, add_pooler: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs, layer=i) for i in range(config.num_layers)])
        self.pooler = BertPooler(config, rngs=rngs) if add_pooler else None

    def embed_tokens(self, input_ids):
        """The word-embedding lookup [batch, seq, embed] that `inputs_embeds` replaces."""
        return self.embeddings.word(input_ids)

    def default_position_ids(self, input_ids, batch: int, seq: int):
        """Position ids [batch, seq] when the caller gives none: 0 .. seq - 1."""
        return jnp.broadcast_to(jnp.arange(seq), (batch, seq))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *, dropout_rng=None,
                 inputs_embeds=None, output_hidden_states: bool = False, output_attentions: bool = False,
                 first_position_only: bool = False):
        """`first_position_only`: the last block computes position 0 alone (what the pooler reads);
        the hidden state returned is then [batch, 1, embed]."""
        batch, seq = check_inputs(input_ids, inputs_embeds)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if token_type_ids is None or self.config.type_vocab_size == 1:
            token_type_ids = jnp.zeros((batch, seq), jnp.int32)
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, batch, seq)
        rng = (lambda i: None) if dropout_rng is None else (lambda i: jax.random.fold_in(dropout_rng, i))
        x = self.embeddings(input_ids, token_type_ids, position_ids, dropout_rng=rng(0), inputs_embeds=inputs_embeds)
        x = constrain(x, ACTIVATION)
        mask = padding_mask(attention_mask)
        hidden_states, attentions = [x], []
        for i, layer in enumerate(self.layers):
            first_only = first_position_only and i == len(self.layers) - 1
            x = run_block(layer, x, mask, rng(i + 1), remat=self.config.remat, output_attentions=output_attentions,
                          **({"query_length": 1} if first_only else {}))
            if output_attentions:
                x, probs = x
                attentions.append(probs)
            x = constrain(x, ACTIVATION)
            hidden_states.append(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        return (x, pooled) + extras(hidden_states, attentions, output_hidden_states, output_attentions)


class RobertaEncoder(BertEncoder):
    """BERT's encoder with RoBERTa's position numbering (Hugging Face's
    create_position_ids_from_input_ids): pad tokens at pad_token_id, the others from pad_token_id + 1."""

    def __init__(self, config: ModelConfig, *, add_pooler: bool = True, rngs: nnx.Rngs):
        if config.pad_token_id + 1 >= config.max_position_embeddings:
            raise ConfigError(
                f"model.pad_token_id={config.pad_token_id}: RoBERTa numbers positions from pad_token_id + 1, which "
                f"needs model.max_position_embeddings > {config.pad_token_id + 1} (got "
                f"{config.max_position_embeddings}); use a tokenizer with a small pad id"
            )
        super().__init__(config, add_pooler=add_pooler, rngs=rngs)

    def default_position_ids(self, input_ids, batch: int, seq: int):
        pad = self.config.pad_token_id
        if input_ids is None:  # inputs_embeds: no way to tell padding apart, as in Hugging Face
            return jnp.broadcast_to(jnp.arange(pad + 1, seq + pad + 1), (batch, seq))
        real = (input_ids != pad).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + pad


# family -> encoder class (models.model.Model builds the backbone of these families from it)
ENCODERS = {"bert": BertEncoder, "roberta": RobertaEncoder}


def extras(hidden_states, attentions, output_hidden_states: bool, output_attentions: bool) -> tuple:
    """The backbone outputs after (hidden, pooled): (hidden_states tuple,) and/or (attentions tuple,), as asked."""
    return (((tuple(hidden_states),) if output_hidden_states else ())
            + ((tuple(attentions),) if output_attentions else ()))


def run_block(block, x, mask, dropout_rng, *, remat: bool, output_attentions: bool = False, **kwargs):
    """Calls a block, rematerialising its activations in the backward pass when `remat`; with
    `output_attentions` the block's (output, attention probabilities) pass through the checkpoint.

    Remat is `jax.checkpoint` over the block as a pure function of its variables: the block's
    variables may come from different traces (trained parameters from inside `jax.grad`, frozen
    ones such as a PEFT model's base weights from the enclosing `jit`), which `nnx.remat` refuses
    to mix ("Cannot mutate Param from a different trace level")."""
    if remat:
        graphdef, variables = nnx.split(block)

        def apply(variables, x, mask, dropout_rng):
            return nnx.merge(graphdef, variables)(x, mask, dropout_rng, output_attentions=output_attentions, **kwargs)

        return jax.checkpoint(apply)(variables, x, mask, dropout_rng)
    return block(x, mask, dropout_rng, output_attentions=output_attentions, **kwargs)
