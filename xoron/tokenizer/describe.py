"""Names of tokenizer.json components for error messages."""

from __future__ import annotations


def describe(obj) -> str:
    """A component of tokenizer.json named for an error message: its type, with its parts."""
    if obj is None:
        return "null"
    if isinstance(obj, dict):
        t = obj.get("type")
        for key in ("normalizers", "pretokenizers", "decoders", "processors"):
            if isinstance(obj.get(key), list):
                return f"{t}[{', '.join(describe(x) for x in obj[key])}]"
        return str(t)
    return type(obj).__name__
