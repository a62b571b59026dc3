"""T5 in Hugging Face layout: config.json translation and weight names of models/t5.py.

Registered with models.hf (`register`), which holds the shared loading and saving machinery. The
one head, 'seq2seq_lm', is transformers' T5ForConditionalGeneration. Its tensors have no prefix:
`shared.weight` is the token embedding (`encoder.embed_tokens.weight` and
`decoder.embed_tokens.weight` are the same tensor and are neither read nor written); each stack's
first block holds the relative position bias table
(`{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight` [buckets, heads]); a
decoder block's sublayers are layer.0 self-attention, layer.1 cross-attention (EncDecAttention),
layer.2 the MLP (DenseReluDense: wi, or wi_0 and wi_1, then wo).

The output layer: with tie_word_embeddings the decoder output, scaled by d_model**-0.5, meets the
shared embedding and `lm_head.weight` is not read; without it `lm_head.weight` is the untied output
layer (read from `shared.weight` when a checkpoint leaves it out, which is how transformers ties
it). transformers 5 writes the choice as `scale_decoder_outputs` (and always
tie_word_embeddings=true); that key wins over tie_word_embeddings when present. flaxen writes
tie_word_embeddings, which every transformers version reads.
"""
from __future__ import annotations

from typing import Optional

from models.config import FEED_FORWARD_PROJ, ModelConfig
from models.errors import CheckpointError
from models.hf import Entry, HFFamily, HFHead, dense_entries, register, require


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    projection = hf.get("feed_forward_proj", "relu")
    if projection not in FEED_FORWARD_PROJ:
        raise CheckpointError(f"{source}: feed_forward_proj={projection!r} is not supported for t5; expected one of "
                              f"{', '.join(FEED_FORWARD_PROJ)}")
    if hf.get("is_decoder") or hf.get("is_encoder_decoder", True) is False:
        raise CheckpointError(f"{source}: is_decoder / is_encoder_decoder=false (a T5 stack alone) is not supported; "
                              "expected an encoder-decoder (T5ForConditionalGeneration)")
    pad = hf.get("pad_token_id")
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    if start is not None and start != pad:
        raise CheckpointError(f"{source}: decoder_start_token_id={start} differs from pad_token_id={pad}; flaxen's "
                              "T5 starts decoding with the pad token")
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    layers = require(hf, "num_layers", source)
    dropout = float(hf.get("dropout_rate", 0.1))
    return ModelConfig(
        family="t5",
        vocab_size=require(hf, "vocab_size", source),
        hidden_size=require(hf, "d_model", source),
        num_layers=layers,
        num_decoder_layers=hf.get("num_decoder_layers") or layers,
        num_heads=require(hf, "num_heads", source),
        d_kv=require(hf, "d_kv", source),
        intermediate_size=require(hf, "d_ff", source),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=projection,
        tie_word_embeddings=tied is not False,
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        hidden_dropout=dropout,
        attention_dropout=dropout,
        pad_token_id=pad,
        use_bias=False,
    )


def config_to_hf(config: ModelConfig) -> dict:
    """T5Config's keys; dropout_rate is hidden_dropout (T5 has one rate, used for attention too)."""
    return {
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.hidden_size,
        "d_kv": config.head_dim,
        "d_ff": config.intermediate_size,
        "num_layers": config.num_layers,
        "num_decoder_layers": config.decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.hidden_dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "feed_forward_proj": config.feed_forward_proj,
        "tie_word_embeddings": config.tie_word_embeddings,
        "is_encoder_decoder": True,
        "initializer_factor": 1.0,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": 1,
        "decoder_start_token_id": config.pad_token_id,
    }


def _norm(name: str, path: tuple) -> Entry:
    return Entry(f"{name}.weight", (path + ("scale",),))


def _attention(name: str, path: tuple) -> list[Entry]:
    return [entry for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
            for entry in dense_entries(f"{name}.{theirs}", path + (ours,), bias=False)]


def backbone(config: ModelConfig, prefix: str, head: Optional[str]) -> list[Entry]:
    """The tensors of models.t5.T5 (its untied lm_head included) in transformers' names."""
    entries = [Entry(f"{prefix}shared.weight", (("shared", "embedding"),))]
    mlp_weights = ("wi_0", "wi_1", "wo") if config.feed_forward_proj == "gated-gelu" else ("wi", "wo")
    for stack, depth in (("encoder", config.num_layers), ("decoder", config.decoder_layers)):
        entries.append(Entry(f"{prefix}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             ((stack, "position_bias", "embedding", "embedding"),)))
        for i in range(depth):
            hf, fx = f"{prefix}{stack}.block.{i}.layer.", (stack, "layers", i)
            sublayers = [("attention", "0.SelfAttention", "0")]
            if stack == "decoder":
                sublayers.append(("cross_attention", "1.EncDecAttention", "1"))
            for ours, theirs, index in sublayers:
                entries += _attention(f"{hf}{theirs}", fx + (ours,))
                entries.append(_norm(f"{hf}{index}.layer_norm", fx + (f"{ours}_norm",)))
            mlp = f"{hf}{len(sublayers)}."
            for name in mlp_weights:
                entries += dense_entries(f"{mlp}DenseReluDense.{name}", fx + ("mlp", name), bias=False)
            entries.append(_norm(f"{mlp}layer_norm", fx + ("mlp_norm",)))
        entries.append(_norm(f"{prefix}{stack}.final_layer_norm", (stack, "final_norm")))
    if not config.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", (("head", "lm_head", "kernel"),), "linear",
                             aliases=(f"{prefix}shared.weight",)))
    return entries


register(HFFamily(
    family="t5",
    model_types=("t5",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    backbone=backbone,
    prefix="",
    heads={"seq2seq_lm": HFHead("T5ForConditionalGeneration")},
    word_embedding="shared.weight",
    ignored=r"(encoder|decoder)\.embed_tokens\.weight|decoder\.block\.0\.layer\.1\.EncDecAttention\."
            r"relative_attention_bias\.weight",
))
