"""BERT (and MiniLM) in Hugging Face layout: config.json translation and weight names of models/bert.py.

Registered with models.hf (`register`), which holds the shared loading and saving machinery.
transformers keys the backbone as `bert.` under a head and bare in `BertModel`; the pooler is read
and written when the head uses it (models.heads.HeadSpec.uses_pooler).
"""
from __future__ import annotations

from typing import Optional

from models.config import ModelConfig
from models.errors import CheckpointError
from models.heads import HEADS
from models.hf import Entry, HFFamily, HFHead, HFWeight, dense_entries, norm_entries, register, require

ACTIVATIONS = ("gelu",)


def check_encoder(hf: dict, source: str) -> None:
    """What the BERT-style encoder (BERT, RoBERTa) cannot build from a config.json: CheckpointError."""
    activation = hf.get("hidden_act", ACTIVATIONS[0])
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act={activation!r} is not supported for {hf.get('model_type')}; "
                              f"expected one of {', '.join(ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type={hf['position_embedding_type']!r} is not supported; expected 'absolute'"
        )
    if hf.get("is_decoder"):
        raise CheckpointError(f"{source}: is_decoder=true (causal {hf.get('model_type')}) is not supported")


def encoder_config(hf: dict, source: str, family: str, defaults: dict) -> ModelConfig:
    """The ModelConfig of a BERT-style config.json; `defaults` holds the family's values of absent keys."""
    check_encoder(hf, source)

    def get(key, field):
        return hf[key] if hf.get(key) is not None else defaults[field]

    return ModelConfig(
        family=family,
        vocab_size=require(hf, "vocab_size", source),
        hidden_size=require(hf, "hidden_size", source),
        num_layers=require(hf, "num_hidden_layers", source),
        num_heads=require(hf, "num_attention_heads", source),
        intermediate_size=require(hf, "intermediate_size", source),
        max_position_embeddings=get("max_position_embeddings", "max_position_embeddings"),
        type_vocab_size=get("type_vocab_size", "type_vocab_size"),
        layer_norm_eps=float(get("layer_norm_eps", "layer_norm_eps")),
        hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
        classifier_dropout=hf.get("classifier_dropout"),
        pad_token_id=get("pad_token_id", "pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pruned_heads=hf.get("pruned_heads") or None,
    )


def encoder_config_to_hf(config: ModelConfig, model_type: str) -> dict:
    """The architecture part of a BERT-style config.json."""
    return {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "classifier_dropout": config.classifier_dropout,
        "position_embedding_type": "absolute",
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": True,
    }


def encoder_backbone(config: ModelConfig, prefix: str, head: Optional[str]) -> list[Entry]:
    """The tensors of models.bert.BertEncoder in transformers' BertModel / RobertaModel names."""
    b, p = ("backbone",), prefix
    entries = [
        Entry(f"{p}embeddings.word_embeddings.weight", (b + ("embeddings", "word", "embedding"),)),
        Entry(f"{p}embeddings.position_embeddings.weight", (b + ("embeddings", "position", "embedding"),)),
        Entry(f"{p}embeddings.token_type_embeddings.weight", (b + ("embeddings", "token_type", "embedding"),)),
        *norm_entries(f"{p}embeddings.LayerNorm", b + ("embeddings", "norm")),
    ]
    for i in range(config.num_layers):
        hf, fx = f"{p}encoder.layer.{i}.", b + ("layers", i)
        for name in ("query", "key", "value"):
            entries += dense_entries(f"{hf}attention.self.{name}", fx + ("attention", name))
        entries += dense_entries(f"{hf}attention.output.dense", fx + ("attention", "out"))
        entries += norm_entries(f"{hf}attention.output.LayerNorm", fx + ("attention_norm",))
        entries += dense_entries(f"{hf}intermediate.dense", fx + ("intermediate",))
        entries += dense_entries(f"{hf}output.dense", fx + ("output",))
        entries += norm_entries(f"{hf}output.LayerNorm", fx + ("output_norm",))
    if HEADS[head].uses_pooler(config.family):
        entries += dense_entries(f"{p}pooler.dense", b + ("pooler", "dense"), required=False)
    return entries


DEFAULTS = {"max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}

register(HFFamily(
    family="bert",
    model_types=("bert",),
    config_from_hf=lambda hf, source: encoder_config(hf, source, "bert", DEFAULTS),
    config_to_hf=lambda config: encoder_config_to_hf(config, "bert"),
    backbone=encoder_backbone,
    prefix="bert.",
    heads={
        None: HFHead("BertModel"),
        "mlm": HFHead("BertForMaskedLM", (
            HFWeight("dense", "cls.predictions.transform.dense", ("transform",)),
            HFWeight("norm", "cls.predictions.transform.LayerNorm", ("norm",)),
            HFWeight("vector", "cls.predictions.bias", ("bias",), aliases=("cls.predictions.decoder.bias",)),
        )),
        "seq_cls": HFHead("BertForSequenceClassification", (HFWeight("dense", "classifier", ("dense",)),)),
        "token_cls": HFHead("BertForTokenClassification", (HFWeight("dense", "classifier", ("dense",)),)),
        "qa": HFHead("BertForQuestionAnswering", (HFWeight("dense", "qa_outputs", ("dense",)),)),
    },
    word_embedding="embeddings.word_embeddings.weight",
    tied=("cls.predictions.decoder.weight",),
    ignored=r"(bert\.)?embeddings\.position_ids|cls\.predictions\.decoder\.bias",
    input_names=("input_ids", "token_type_ids", "attention_mask"),
))
