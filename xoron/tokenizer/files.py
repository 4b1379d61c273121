"""Reading a tokenizer from its files: tokenizer.json and, beside it, tokenizer_config.json."""

from __future__ import annotations

import json
import os

from .tokenizer import Tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the folder containing one).

    A ``tokenizer_config.json`` next to it, when present, supplies ``eos_token``/``bos_token``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or "model" not in spec:
        raise ValueError(f"{path} is not a HuggingFace tokenizer.json (no 'model' entry)")
    config = None
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = None
    return Tokenizer(spec, source=path, config=config)
