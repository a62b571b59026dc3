"""RoBERTa in Hugging Face layout: config.json translation and weight names of models.bert.RobertaEncoder.

Registered with models.hf (`register`), which holds the shared loading and saving machinery. The
encoder's tensors are BERT's (models/bert_hf.py) under the prefix `roberta.`; the heads differ:
RobertaForMaskedLM's `lm_head` (dense, GELU, layer_norm, decoder tied to the word embedding, bias)
and RobertaForSequenceClassification's `classifier.dense` + `classifier.out_proj` on the first
token (no pooler). A RoBERTa config.json's defaults are transformers' RobertaConfig defaults.
"""
from __future__ import annotations

from models.bert_hf import encoder_backbone, encoder_config, encoder_config_to_hf
from models.hf import HFFamily, HFHead, HFWeight, register

DEFAULTS = {"max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 1}

register(HFFamily(
    family="roberta",
    model_types=("roberta",),
    config_from_hf=lambda hf, source: encoder_config(hf, source, "roberta", DEFAULTS),
    config_to_hf=lambda config: encoder_config_to_hf(config, "roberta"),
    backbone=encoder_backbone,
    prefix="roberta.",
    heads={
        None: HFHead("RobertaModel"),
        "mlm": HFHead("RobertaForMaskedLM", (
            HFWeight("dense", "lm_head.dense", ("transform",)),
            HFWeight("norm", "lm_head.layer_norm", ("norm",)),
            HFWeight("vector", "lm_head.bias", ("bias",), aliases=("lm_head.decoder.bias",)),
        )),
        "seq_cls": HFHead("RobertaForSequenceClassification", (
            HFWeight("dense", "classifier.dense", ("dense",)),
            HFWeight("dense", "classifier.out_proj", ("out_proj",)),
        )),
        "token_cls": HFHead("RobertaForTokenClassification", (HFWeight("dense", "classifier", ("dense",)),)),
        "qa": HFHead("RobertaForQuestionAnswering", (HFWeight("dense", "qa_outputs", ("dense",)),)),
    },
    word_embedding="embeddings.word_embeddings.weight",
    tied=("lm_head.decoder.weight",),
    ignored=r"(roberta\.)?embeddings\.(position_ids|token_type_ids)|lm_head\.decoder\.bias",
))
