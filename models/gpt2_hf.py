"""GPT-2 in Hugging Face layout: config.json translation and weight names of models/gpt2.py.

Registered with models.hf (`register`), which holds the shared loading and saving machinery.
GPT-2's Conv1D weights are [in, out] ('conv1d' entries); its fused attention `c_attn` [embed,
3 * embed] fills query, key and value. transformers keys the backbone as `transformer.` under a
head and bare in `GPT2Model`; the output layer `lm_head.weight` is the token embedding.
"""
from __future__ import annotations

from typing import Optional

from models.config import ModelConfig
from models.errors import CheckpointError
from models.hf import Entry, HFFamily, HFHead, HFWeight, dense_entries, norm_entries, register, require

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    activation = hf.get("activation_function", ACTIVATIONS[0])
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_function={activation!r} is not supported for gpt2; expected one "
                              f"of {', '.join(ACTIVATIONS)}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise CheckpointError(
            f"{source}: only scale_attn_weights=true and scale_attn_by_inverse_layer_idx=false are supported"
        )
    hidden = require(hf, "n_embd", source)
    pad = hf.get("pad_token_id")
    return ModelConfig(
        family="gpt2",
        vocab_size=require(hf, "vocab_size", source),
        hidden_size=hidden,
        num_layers=require(hf, "n_layer", source),
        num_heads=require(hf, "n_head", source),
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions", 1024),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout=float(hf.get("attn_pdrop", 0.1)),
        classifier_dropout=hf.get("classifier_dropout"),
        pad_token_id=pad if pad is not None else (hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else 0),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pruned_heads=hf.get("pruned_heads") or None,
    )


def config_to_hf(config: ModelConfig) -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.hidden_dropout,
        "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout,
        "classifier_dropout": config.classifier_dropout,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
    }


def backbone(config: ModelConfig, prefix: str, head: Optional[str]) -> list[Entry]:
    """The tensors of models.gpt2.GPT2Decoder in transformers' GPT2Model names."""
    b, p = ("backbone",), prefix
    entries = [
        Entry(f"{p}wte.weight", (b + ("word", "embedding"),)),
        Entry(f"{p}wpe.weight", (b + ("position", "embedding"),)),
    ]
    for i in range(config.num_layers):
        hf, fx = f"{p}h.{i}.", b + ("layers", i)
        qkv = tuple(fx + ("attention", name) for name in ("query", "key", "value"))
        entries += norm_entries(f"{hf}ln_1", fx + ("attention_norm",))
        entries.append(Entry(f"{hf}attn.c_attn.weight", tuple(q + ("kernel",) for q in qkv), "conv1d"))
        entries.append(Entry(f"{hf}attn.c_attn.bias", tuple(q + ("bias",) for q in qkv), "copy"))
        entries += dense_entries(f"{hf}attn.c_proj", fx + ("attention", "out"), kind="conv1d")
        entries += norm_entries(f"{hf}ln_2", fx + ("mlp_norm",))
        entries += dense_entries(f"{hf}mlp.c_fc", fx + ("intermediate",), kind="conv1d")
        entries += dense_entries(f"{hf}mlp.c_proj", fx + ("output",), kind="conv1d")
    entries += norm_entries(f"{p}ln_f", b + ("final_norm",))
    return entries


register(HFFamily(
    family="gpt2",
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    backbone=backbone,
    prefix="transformer.",
    heads={
        None: HFHead("GPT2Model"),
        "causal_lm": HFHead("GPT2LMHeadModel"),
        "seq_cls": HFHead("GPT2ForSequenceClassification", (HFWeight("dense", "score", ("dense",), bias=False),)),
        "token_cls": HFHead("GPT2ForTokenClassification", (HFWeight("dense", "classifier", ("dense",)),)),
    },
    word_embedding="wte.weight",
    tied=("lm_head.weight",),
    ignored=r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",
))
