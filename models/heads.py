"""Task heads on top of an encoder or decoder's hidden states, and the one table describing them.

Why one table: `Model`, `models.hf` and models.peft ask what a head needs (which families have
it, BERT's pooler, num_labels) through `HEADS[name]` and never test a head's name, so a new head
is a module here plus one `HeadSpec` entry (and, to load and save it in Hugging Face layout, its
class and tensor names in the family's mapping, e.g. models/bert_hf.py).

Modules:
- MaskedLMHead: BERT's transform (dense, GELU, LayerNorm), then the tied word embedding plus an
  output bias: [batch, seq, embed] -> [batch, seq, vocab].
- CausalLMHead: the tied token embedding: [batch, seq, embed] -> [batch, seq, vocab].
- SequenceClassifier: dropout + dense on one vector per sequence (BERT's pooled output, or a
  decoder's last real token) -> [batch, num_labels]; num_labels=1 is regression.
- FirstTokenClassifier: RoBERTa's classification head on the first token (<s>) of [batch, seq,
  embed]: dropout, dense + tanh, dropout, `out_proj` -> [batch, num_labels] (in place of BERT's
  pooler + dense: the RoBERTa backbone builds no pooler for it).
- TokenClassifier: dropout + dense at every position -> [batch, seq, num_labels].
- QAHead: extractive question answering (Hugging Face's `qa_outputs`): dense, without
  dropout, at every position [batch, seq, embed] -> [batch, seq, 2]: answer start and end logits.
- Seq2SeqLMHead: T5's output layer on the decoder's hidden states [batch, tgt, embed] -> [batch,
  tgt, vocab]: the shared embedding transposed after scaling by hidden_size**-0.5
  (tie_word_embeddings) or its own bias-free lm_head.

Table: HEADS[name] -> HeadSpec, name None being the bare backbone (no head). `Model` builds
`spec.build(config, num_labels, rngs)` as `model.head` and takes its outputs from
`spec.apply(head, hidden, pooled, model, attention_mask, input_ids, rng)`, a dict of
ModelOutput fields ('logits', or 'start_logits' and 'end_logits'), each cast to float32.
input_ids is None when the model was called with inputs_embeds: heads must not need it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.errors import ConfigError
from models.layers import Dense, Embed, LayerNorm, dropout, gelu_exact, param


class MaskedLMHead(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, dt = config.hidden_size, config.compute_dtype
        self.transform = Dense(e, e, ("embed", "embed_out"), rngs=rngs, init_std=config.initializer_range, dtype=dt)
        self.norm = LayerNorm(e, eps=config.layer_norm_eps, dtype=dt)
        self.bias = param(jnp.zeros((config.vocab_size,), jnp.float32), ("vocab",))

    def __call__(self, hidden, embedding: Embed):
        h = self.norm(gelu_exact(self.transform(hidden)))
        return embedding.attend(h) + self.bias[...].astype(h.dtype)


class CausalLMHead(nnx.Module):
    """Holds no parameters: GPT-2 ties its output layer to the token embedding."""

    def __call__(self, hidden, embedding: Embed):
        return embedding.attend(hidden)


class SequenceClassifier(nnx.Module):
    def __init__(self, config: ModelConfig, num_labels: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.dense = Dense(config.hidden_size, num_labels, ("embed", "labels"), rngs=rngs, use_bias=use_bias,
                           init_std=config.initializer_range, dtype=config.compute_dtype)
        rate = config.classifier_dropout
        self.dropout_rate = config.hidden_dropout if rate is None else rate

    def __call__(self, vector, dropout_rng=None):
        return self.dense(dropout(vector, self.dropout_rate, dropout_rng))


class FirstTokenClassifier(nnx.Module):
    """RoBERTa's sequence classification head: hidden [batch, seq, embed] -> [batch, num_labels] from
    the first position: dropout, dense (embed -> embed) + tanh, dropout, out_proj (embed -> labels)."""

    def __init__(self, config: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
        e, std, dt = config.hidden_size, config.initializer_range, config.compute_dtype
        self.dense = Dense(e, e, ("embed", "embed_out"), rngs=rngs, init_std=std, dtype=dt)
        self.out_proj = Dense(e, num_labels, ("embed", "labels"), rngs=rngs, init_std=std, dtype=dt)
        rate = config.classifier_dropout
        self.dropout_rate = config.hidden_dropout if rate is None else rate

    def __call__(self, hidden, dropout_rng=None):
        rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
        x = jnp.tanh(self.dense(dropout(hidden[:, 0], self.dropout_rate, rngs[0])))
        return self.out_proj(dropout(x, self.dropout_rate, rngs[1]))


def _sequence_classifier(config: ModelConfig, num_labels: int, rngs: nnx.Rngs) -> nnx.Module:
    """The seq_cls module of a family: RoBERTa's own first-token head; BERT's dense on the pooled
    output; GPT-2's bias-free dense (Hugging Face's `score`) on the last real token."""
    if config.family == "roberta":
        return FirstTokenClassifier(config, num_labels, rngs=rngs)
    return SequenceClassifier(config, num_labels, use_bias=config.family == "bert", rngs=rngs)


class TokenClassifier(SequenceClassifier):
    """The same dense layer, applied at every position of [batch, seq, embed]."""


class QAHead(nnx.Module):
    """[batch, seq, embed] -> [batch, seq, 2]: at every position the logit of the answer span
    starting there (channel 0) and ending there (channel 1). No dropout, as in Hugging Face."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dense = Dense(config.hidden_size, 2, ("embed", "labels"), rngs=rngs,
                           init_std=config.initializer_range, dtype=config.compute_dtype)

    def __call__(self, hidden):
        return self.dense(hidden)


class Seq2SeqLMHead(nnx.Module):
    """T5's LM head: `lm_head` [embed, vocab] when config.tie_word_embeddings is False, else none
    (the shared embedding, with the decoder output scaled by hidden_size**-0.5 as in T5)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = config.hidden_size ** -0.5
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs, use_bias=False, init_std=1.0,
            dtype=config.compute_dtype)

    def __call__(self, hidden, embedding: Embed):
        if self.lm_head is None:
            return embedding.attend(hidden * self.scale)
        return self.lm_head(hidden)


def last_token(hidden, attention_mask):
    """hidden[b, last position where attention_mask[b] is 1] -> [batch, embed] (right padding)."""
    positions = jnp.arange(attention_mask.shape[1])
    last = jnp.max(jnp.where(attention_mask.astype(bool), positions, 0), axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What `Model`, `models.hf` and models.peft need to know about one head.

    families: the model families ('bert', 'roberta', 'gpt2', ...) that can have it.
    build(config, num_labels, rngs): the head module, or None (bare backbone).
    apply(head, hidden, pooled, model, attention_mask, input_ids, rng): {ModelOutput field: array}
        from the backbone's hidden [batch, seq, embed] and pooled [batch, embed] | None; rng is
        the head's dropout key (None when deterministic).
    pooler_families: the encoder families whose pooler (tanh(dense(h[:, 0]))) is built for this
        head, and read and written as Hugging Face's `bert.pooler` / `roberta.pooler`
        (`uses_pooler(family)`).
    takes_labels: num_labels sets the output size and id2label names the labels.
    ties_embedding: the output layer is the token embedding (Hugging Face tie_word_embeddings).
    generates: next-token logits of a decoder, which models.generate continues from.
    peft_task_type: Hugging Face PEFT's task_type for `export_hf_peft`; None: no export (the bare
        backbone exports with task_type null).
    reads_pooled_only: with BERT's pooler the head reads nothing but the pooled output (position 0's
        final hidden state), so `Model(..., head_positions_only=True)` runs the last block for that
        position alone.
    positionwise: the head's output at a position reads that position's hidden state alone (and no
        dropout key), so `Model(..., masked_positions=[batch, m])` applies it to the hidden states
        gathered at those positions only: the same outputs there, for m / seq of the head's work.
    """

    families: tuple[str, ...]
    build: Callable[[ModelConfig, int, nnx.Rngs], Optional[nnx.Module]]
    apply: Callable[..., dict[str, Any]]
    pooler_families: tuple[str, ...] = ()
    takes_labels: bool = False
    ties_embedding: bool = False
    generates: bool = False
    peft_task_type: Optional[str] = None
    reads_pooled_only: bool = False
    positionwise: bool = False

    def uses_pooler(self, family: str) -> bool:
        """Whether a `family` model with this head builds the encoder's pooler."""
        return family in self.pooler_families


def _no_output(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {}


def _masked_lm(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, model.backbone.embeddings.word)}


def _causal_lm(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, model.backbone.word)}


def _sequence(head, hidden, pooled, model, attention_mask, input_ids, rng):
    """RoBERTa's head reads the hidden states itself; else BERT's pooled output, else (decoders) the
    hidden state of each sequence's last real token (by attention_mask; without one, the last
    position, as Hugging Face does for inputs_embeds)."""
    if isinstance(head, FirstTokenClassifier):
        return {"logits": head(hidden, rng)}
    if pooled is None:
        mask = jnp.ones(hidden.shape[:2], jnp.int32) if attention_mask is None else attention_mask
        pooled = last_token(hidden, mask)
    return {"logits": head(pooled, rng)}


def _token(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, rng)}


def _qa(head, hidden, pooled, model, attention_mask, input_ids, rng):
    logits = head(hidden)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


def _seq2seq_lm(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, model.shared)}


HEADS: dict[Optional[str], HeadSpec] = {
    None: HeadSpec(
        families=("bert", "roberta", "gpt2"),
        build=lambda config, num_labels, rngs: None,
        apply=_no_output,
        pooler_families=("bert", "roberta"),
    ),
    "mlm": HeadSpec(
        families=("bert", "roberta"),
        build=lambda config, num_labels, rngs: MaskedLMHead(config, rngs=rngs),
        apply=_masked_lm,
        ties_embedding=True,
        positionwise=True,
    ),
    "causal_lm": HeadSpec(
        families=("gpt2",),
        build=lambda config, num_labels, rngs: CausalLMHead(),
        apply=_causal_lm,
        ties_embedding=True,
        generates=True,
        peft_task_type="CAUSAL_LM",
    ),
    "seq_cls": HeadSpec(
        families=("bert", "roberta", "gpt2"),
        build=_sequence_classifier,
        apply=_sequence,
        pooler_families=("bert",),
        takes_labels=True,
        peft_task_type="SEQ_CLS",
        reads_pooled_only=True,
    ),
    "token_cls": HeadSpec(
        families=("bert", "roberta", "gpt2"),
        build=lambda config, num_labels, rngs: TokenClassifier(config, num_labels, rngs=rngs),
        apply=_token,
        takes_labels=True,
        peft_task_type="TOKEN_CLS",
    ),
    "qa": HeadSpec(
        families=("bert", "roberta"),
        build=lambda config, num_labels, rngs: QAHead(config, rngs=rngs),
        apply=_qa,
        peft_task_type="QUESTION_ANS",
    ),
    "seq2seq_lm": HeadSpec(
        families=("t5",),
        build=lambda config, num_labels, rngs: Seq2SeqLMHead(config, rngs=rngs),
        apply=_seq2seq_lm,
    ),
}

# the head names (models.HEADS), without the bare backbone
NAMES = tuple(name for name in HEADS if name is not None)


def available(family: str) -> tuple[Optional[str], ...]:
    """The heads a `family` model can have (None: no head), in table order."""
    return tuple(name for name, spec in HEADS.items() if family in spec.families)


def lookup(head: Optional[str], family: str, *, kind: str = "family") -> HeadSpec:
    """HEADS[head], or ConfigError naming the heads `family` can have (`kind` names the family in
    the message: 'family' or 'model_type')."""
    supported = available(family)
    if head not in supported:
        raise ConfigError(f"head={head!r} is not available for {kind} {family!r}; expected one of "
                          f"{', '.join(repr(h) for h in supported)}")
    return HEADS[head]
