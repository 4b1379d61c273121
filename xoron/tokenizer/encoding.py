"""What Tokenizer(...) returns: a transformers-style encoding, as lists, numpy arrays or torch
tensors."""

from __future__ import annotations


class Encoding(dict):
    """What Tokenizer(...) returns: a dict that also reads as attributes (enc.input_ids)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        """The torch tensors moved to `device` (return_tensors="pt"), as BatchEncoding.to does."""
        if not all(hasattr(v, "to") and hasattr(v, "device") for v in self.values()):
            raise TypeError("Encoding.to(device) moves torch tensors: encode with return_tensors='pt'")
        return Encoding({k: v.to(device) for k, v in self.items()})


def as_tensors(rows: list, kind: str):
    if kind == "np":
        import numpy as np
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    try:
        import torch
    except ImportError:
        raise ImportError("return_tensors='pt' needs torch; use return_tensors='np' without it") from None
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)
