"""flaxen's data layer: tfds builders for local files, tokenizers, grain loaders, quickstart data.

`DataConfig` (the Hydra schema of configs/data/*.yaml) is importable without loading tfds or grain;
everything else is loaded on first use.
"""
from flaxen.data.config import DataConfig, SyntheticConfig, TokenizerConfig, default_data_dir

__all__ = ["DataConfig", "SyntheticConfig", "TokenizerConfig", "default_data_dir"]

_LAZY = {
    "load_task_data": "flaxen.data.pipeline", "TaskData": "flaxen.data.pipeline", "Loader": "flaxen.data.pipeline",
    "as_data_config": "flaxen.data.pipeline",
    "Tokenizer": "flaxen.data.tokenizers", "load_tokenizer": "flaxen.data.tokenizers",
    "char_tokenizer": "flaxen.data.tokenizers", "word_tokenizer": "flaxen.data.tokenizers",
    "train_tokenizer": "flaxen.data.tokenizers",
    "prepare": "flaxen.data.builders", "prepared_root": "flaxen.data.builders",
    "unigram_entropy": "flaxen.data.synthetic",
}
__all__ += sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flaxen.data' has no attribute {name!r}")
