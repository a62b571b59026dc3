"""Task heads on top of an encoder or decoder's hidden states, and the one table describing them.

Why one table: `Model`, `models.hf` and models.peft ask what a head needs (which families have
it, BERT's pooler, num_labels, its Hugging Face names) through `HEADS[name]` and never test a
head's name, so a new head is a module here plus one `HeadSpec` entry.

Modules:
- MaskedLMHead: BERT's transform (dense, GELU, LayerNorm), then the tied word embedding plus an
  output bias: [batch, seq, embed] -> [batch, seq, vocab].
- CausalLMHead: the tied token embedding: [batch, seq, embed] -> [batch, seq, vocab].
- SequenceClassifier: dropout + dense on one vector per sequence (BERT's pooled output, or a
  decoder's last real token) -> [batch, num_labels]; num_labels=1 is regression.
- TokenClassifier: dropout + dense at every position -> [batch, seq, num_labels].
- QAHead: extractive question answering (Hugging Face's `qa_outputs`): dense, without
  dropout, at every position [batch, seq, embed] -> [batch, seq, 2]: answer start and end logits.

Table: HEADS[name] -> HeadSpec, name None being the bare backbone (no head). `Model` builds
`spec.build(config, num_labels, rngs)` as `model.head` and takes its outputs from
`spec.apply(head, hidden, pooled, model, attention_mask, input_ids, rng)`, a dict of
ModelOutput fields ('logits', or 'start_logits' and 'end_logits'), each cast to float32.
input_ids is None when the model was called with inputs_embeds: heads must not need it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

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


def last_token(hidden, attention_mask):
    """hidden[b, last position where attention_mask[b] is 1] -> [batch, embed] (right padding)."""
    positions = jnp.arange(attention_mask.shape[1])
    last = jnp.max(jnp.where(attention_mask.astype(bool), positions, 0), axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class HFWeight:
    """One module or tensor of a head in Hugging Face layout, filling the head's parameters under `path`.

    kind: 'dense' (a torch Linear: `name`.weight [out, in], and `name`.bias unless bias=False),
    'norm' (a LayerNorm: `name`.weight, `name`.bias) or 'vector' (the one tensor `name`, also
    read under its `aliases`).
    """

    kind: str
    name: str
    path: tuple[str, ...]
    bias: bool = True
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What `Model`, `models.hf` and models.peft need to know about one head.

    families: the model families ('bert', 'gpt2') that can have it.
    build(config, num_labels, rngs): the head module, or None (bare backbone).
    apply(head, hidden, pooled, model, attention_mask, input_ids, rng): {ModelOutput field: array}
        from the backbone's hidden [batch, seq, embed] and pooled [batch, embed] | None; rng is
        the head's dropout key (None when deterministic).
    needs_pooler: BERT's pooler is built (and read and written as Hugging Face's `bert.pooler`).
    takes_labels: num_labels sets the output size and id2label names the labels.
    ties_embedding: the output layer is the token embedding (Hugging Face tie_word_embeddings).
    generates: next-token logits of a decoder, which models.generate continues from.
    hf_architectures: family -> the transformers class `save_pretrained` names in config.json.
    hf_weights: family -> the head's own tensors in Hugging Face layout (none if absent).
    peft_task_type: Hugging Face PEFT's task_type for `export_hf_peft`; None: no export (the bare
        backbone exports with task_type null).
    """

    families: tuple[str, ...]
    build: Callable[[ModelConfig, int, nnx.Rngs], Optional[nnx.Module]]
    apply: Callable[..., dict[str, Any]]
    hf_architectures: Mapping[str, str]
    hf_weights: Mapping[str, tuple[HFWeight, ...]] = dataclasses.field(default_factory=dict)
    needs_pooler: bool = False
    takes_labels: bool = False
    ties_embedding: bool = False
    generates: bool = False
    peft_task_type: Optional[str] = None


def _no_output(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {}


def _masked_lm(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, model.backbone.embeddings.word)}


def _causal_lm(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, model.backbone.word)}


def _sequence(head, hidden, pooled, model, attention_mask, input_ids, rng):
    """BERT's pooled output, else (decoders) the hidden state of each sequence's last real token
    (by attention_mask; without one, the last position, as Hugging Face does for inputs_embeds)."""
    if pooled is None:
        mask = jnp.ones(hidden.shape[:2], jnp.int32) if attention_mask is None else attention_mask
        pooled = last_token(hidden, mask)
    return {"logits": head(pooled, rng)}


def _token(head, hidden, pooled, model, attention_mask, input_ids, rng):
    return {"logits": head(hidden, rng)}


def _qa(head, hidden, pooled, model, attention_mask, input_ids, rng):
    logits = head(hidden)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


HEADS: dict[Optional[str], HeadSpec] = {
    None: HeadSpec(
        families=("bert", "gpt2"),
        build=lambda config, num_labels, rngs: None,
        apply=_no_output,
        hf_architectures={"bert": "BertModel", "gpt2": "GPT2Model"},
        needs_pooler=True,
    ),
    "mlm": HeadSpec(
        families=("bert",),
        build=lambda config, num_labels, rngs: MaskedLMHead(config, rngs=rngs),
        apply=_masked_lm,
        hf_architectures={"bert": "BertForMaskedLM"},
        hf_weights={"bert": (
            HFWeight("dense", "cls.predictions.transform.dense", ("transform",)),
            HFWeight("norm", "cls.predictions.transform.LayerNorm", ("norm",)),
            HFWeight("vector", "cls.predictions.bias", ("bias",), aliases=("cls.predictions.decoder.bias",)),
        )},
        ties_embedding=True,
    ),
    "causal_lm": HeadSpec(
        families=("gpt2",),
        build=lambda config, num_labels, rngs: CausalLMHead(),
        apply=_causal_lm,
        hf_architectures={"gpt2": "GPT2LMHeadModel"},
        ties_embedding=True,
        generates=True,
        peft_task_type="CAUSAL_LM",
    ),
    "seq_cls": HeadSpec(
        families=("bert", "gpt2"),
        build=lambda config, num_labels, rngs: SequenceClassifier(
            config, num_labels, use_bias=config.family == "bert", rngs=rngs),
        apply=_sequence,
        hf_architectures={"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"},
        hf_weights={"bert": (HFWeight("dense", "classifier", ("dense",)),),
                    "gpt2": (HFWeight("dense", "score", ("dense",), bias=False),)},
        needs_pooler=True,
        takes_labels=True,
        peft_task_type="SEQ_CLS",
    ),
    "token_cls": HeadSpec(
        families=("bert", "gpt2"),
        build=lambda config, num_labels, rngs: TokenClassifier(config, num_labels, rngs=rngs),
        apply=_token,
        hf_architectures={"bert": "BertForTokenClassification", "gpt2": "GPT2ForTokenClassification"},
        hf_weights={"bert": (HFWeight("dense", "classifier", ("dense",)),),
                    "gpt2": (HFWeight("dense", "classifier", ("dense",)),)},
        takes_labels=True,
        peft_task_type="TOKEN_CLS",
    ),
    "qa": HeadSpec(
        families=("bert",),
        build=lambda config, num_labels, rngs: QAHead(config, rngs=rngs),
        apply=_qa,
        hf_architectures={"bert": "BertForQuestionAnswering"},
        hf_weights={"bert": (HFWeight("dense", "qa_outputs", ("dense",)),)},
        peft_task_type="QUESTION_ANS",
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
