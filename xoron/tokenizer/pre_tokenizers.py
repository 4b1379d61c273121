"""The pre-tokenizers of tokenizer.json (ByteLevel, Split, Digits, Sequence): text into the
pieces BPE runs on."""

from __future__ import annotations

import re

from .byte_level import to_byte_level
from .regex import GPT2_PATTERN, compile_regex, translate_regex


def _split(s: str, rx: re.Pattern, behavior: str, invert: bool) -> list[str]:
    """HuggingFace ``Split`` semantics on one piece."""
    segs: list[tuple[str, bool]] = []
    prev = 0
    for m in rx.finditer(s):
        a, b = m.span()
        if a == b:
            continue
        if prev < a:
            segs.append((s[prev:a], False))
        segs.append((s[a:b], True))
        prev = b
    if prev < len(s):
        segs.append((s[prev:], False))
    if invert:
        segs = [(t, not m) for t, m in segs]
    behavior = behavior.lower()
    if behavior == "isolated":
        return [t for t, _ in segs]
    if behavior == "removed":
        return [t for t, m in segs if not m]
    out: list[str] = []
    if behavior == "mergedwithprevious":
        for t, m in segs:
            if m and out:
                out[-1] += t
            else:
                out.append(t)
        return out
    if behavior == "mergedwithnext":
        carry = ""
        for t, m in segs:
            if m:
                carry += t
            else:
                out.append(carry + t)
                carry = ""
        if carry:
            out.append(carry)
        return out
    if behavior == "contiguous":
        last_match = False
        for t, m in segs:
            if m and last_match and out:
                out[-1] += t
            else:
                out.append(t)
            last_match = m
        return out
    raise ValueError(f"unsupported Split behavior {behavior!r}")


def build_pre_tokenizer(spec, steps: list, flags: dict) -> None:
    """Appends the steps of a tokenizer.json pre-tokenizer to `steps` (each str -> [str]);
    flags["byte_level"] is set when a ByteLevel step is among them."""
    t = spec.get("type")
    if t == "Sequence":
        for sub in spec.get("pretokenizers", []):
            build_pre_tokenizer(sub, steps, flags)
        return
    if t == "ByteLevel":
        flags["byte_level"] = True
        prefix = bool(spec.get("add_prefix_space", False))
        rx = compile_regex(GPT2_PATTERN) if spec.get("use_regex", True) else None

        def byte_level(s, prefix=prefix, rx=rx):
            if prefix and not s.startswith(" "):
                s = " " + s
            parts = _split(s, rx, "isolated", False) if rx is not None else [s]
            return [to_byte_level(p) for p in parts if p]
        steps.append(byte_level)
        return
    if t == "Split":
        pat = spec["pattern"]
        if "Regex" in pat:
            rx = compile_regex(pat["Regex"])
        else:
            rx = re.compile(re.escape(pat["String"]))
        behavior = spec.get("behavior", "Isolated")
        invert = bool(spec.get("invert", False))
        _split("", rx, behavior, invert)  # validates the behavior name
        steps.append(lambda s, rx=rx, b=behavior, inv=invert: _split(s, rx, b, inv))
        return
    if t == "Digits":
        rx = re.compile(translate_regex(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"))
        steps.append(lambda s, rx=rx: _split(s, rx, "isolated", False))
        return
    raise ValueError(
        f"unsupported pre-tokenizer {t!r} in tokenizer.json (only ByteLevel, Split, Digits and "
        f"Sequence are supported: this loader handles byte-level BPE tokenizers only)")
