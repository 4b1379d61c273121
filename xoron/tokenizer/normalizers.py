"""The Unicode normalisers of tokenizer.json (NFC, Lowercase, Strip, Replace, ...)."""

from __future__ import annotations

import unicodedata

from .describe import describe
from .regex import compile_regex


def build_normalizer(spec):
    """The tokenizer.json normalizer as a function str -> str (None: there is none)."""
    if spec is None:
        return None
    t = spec.get("type")
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s, form=t: unicodedata.normalize(form, s)
    if t == "Lowercase":
        return str.lower
    if t == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)

        def strip(s):
            if left:
                s = s.lstrip()
            if right:
                s = s.rstrip()
            return s
        return strip
    if t == "Prepend":
        pre = spec["prepend"]
        return lambda s: pre + s if s else s
    if t == "Replace":
        pat, content = spec["pattern"], spec["content"]
        if "String" in pat:
            return lambda s, a=pat["String"]: s.replace(a, content)
        rx = compile_regex(pat["Regex"])
        return lambda s: rx.sub(lambda _m: content, s)
    if t == "Sequence":
        parts = [build_normalizer(x) for x in spec.get("normalizers", [])]
        parts = [p for p in parts if p is not None]

        def seq(s):
            for p in parts:
                s = p(s)
            return s
        return seq
    raise ValueError(f"unsupported normalizer {describe(spec)!r} in tokenizer.json")
