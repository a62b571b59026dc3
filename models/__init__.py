"""flaxen's models: Flax NNX BERT-family encoders and GPT-2-family decoders with task heads.

Knows nothing about training and imports nothing from flaxen (errors: models.errors). Public surface:
    ModelConfig, Model, ModelOutput, build_model(config, head=None, num_labels=2, rngs=...)
    load_pretrained(path, head=None, **head_kwargs), save_pretrained(model, path)
    HEADS: the head names ('mlm', 'causal_lm', 'seq_cls', 'token_cls', 'qa'; what each needs is
    its models.heads.HEADS entry); FAMILIES: 'bert', 'gpt2'
    generate(model, input_ids, ...), minilm_path()
"""
from models.config import FAMILIES, ModelConfig
from models.generation import generate
from models.heads import NAMES as HEADS
from models.hf import load_pretrained, save_pretrained
from models.model import Model, ModelOutput, build_model
from models.pretrained import minilm_path

__all__ = [
    "FAMILIES",
    "HEADS",
    "ModelConfig",
    "Model",
    "ModelOutput",
    "build_model",
    "load_pretrained",
    "save_pretrained",
    "generate",
    "minilm_path",
]
