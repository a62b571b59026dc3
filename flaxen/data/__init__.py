"""flaxen's data layer: tfds builders for local files, tokenizers, grain loaders, quickstart data.

`DataConfig` (the Hydra schema of configs/data/*.yaml) is importable without loading tfds or grain;
everything else is loaded on first use.
"""
from flaxen.data.config import DataConfig, SyntheticConfig, TokenizerConfig, default_data_dir

__all__ = ["DataConfig", "SyntheticConfig", "TokenizerConfig", "default_data_dir"]
