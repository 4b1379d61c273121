"""Oniguruma regexes of tokenizer.json translated to Python ``re``.

The ``\\p{L}`` / ``\\p{N}`` classes become explicit Unicode ranges built from :mod:`unicodedata`,
and ``\\s`` the Unicode White_Space set (Python's ``\\s`` also matches U+001C..U+001F,
Oniguruma's does not), so pre-tokenisation gives the same pieces as the Rust implementation.
"""

from __future__ import annotations

import re
import unicodedata

# Unicode White_Space (= Oniguruma's \s for UTF-8 text; Rust's char::is_whitespace)
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000)]
WS_CHARS = frozenset(chr(c) for lo, hi in WHITE_SPACE for c in range(lo, hi + 1))

_CATEGORY_RANGES: dict[str, list[tuple[int, int]]] | None = None

_PROPERTY_ALIASES = {
    "letter": "L", "cased_letter": "LC", "uppercase_letter": "Lu", "lowercase_letter": "Ll",
    "titlecase_letter": "Lt", "modifier_letter": "Lm", "other_letter": "Lo",
    "mark": "M", "combining_mark": "M", "nonspacing_mark": "Mn", "spacing_mark": "Mc",
    "enclosing_mark": "Me", "number": "N", "decimal_number": "Nd", "letter_number": "Nl",
    "other_number": "No", "punctuation": "P", "punct": "P", "connector_punctuation": "Pc",
    "dash_punctuation": "Pd", "open_punctuation": "Ps", "close_punctuation": "Pe",
    "initial_punctuation": "Pi", "final_punctuation": "Pf", "other_punctuation": "Po",
    "symbol": "S", "math_symbol": "Sm", "currency_symbol": "Sc", "modifier_symbol": "Sk",
    "other_symbol": "So", "separator": "Z", "space_separator": "Zs", "line_separator": "Zl",
    "paragraph_separator": "Zp", "other": "C", "control": "Cc", "cntrl": "Cc", "format": "Cf",
    "surrogate": "Cs", "private_use": "Co", "unassigned": "Cn",
}


def _category_ranges() -> dict[str, list[tuple[int, int]]]:
    """Code point ranges of every Unicode general category, computed on first use and kept:
    it walks every code point (benchmarks/RESULTS.md has the time it takes)."""
    global _CATEGORY_RANGES
    if _CATEGORY_RANGES is None:
        out: dict[str, list[tuple[int, int]]] = {}
        category = unicodedata.category
        prev = category("\0")
        start = 0
        for cp in range(1, 0x110000):
            c = category(chr(cp))
            if c != prev:
                out.setdefault(prev, []).append((start, cp - 1))
                prev, start = c, cp
        out.setdefault(prev, []).append((start, 0x10FFFF))
        _CATEGORY_RANGES = out
    return _CATEGORY_RANGES


def _property_ranges(name: str, pattern: str) -> list[tuple[int, int]]:
    key = name.strip().replace(" ", "_").replace("-", "_")
    cat = _PROPERTY_ALIASES.get(key.lower(), key)
    cats = _category_ranges()
    if cat == "LC":
        wanted = ["Lu", "Ll", "Lt"]
    elif len(cat) == 1 and cat in "LMNPSZC":
        wanted = [c for c in cats if c[0] == cat]
    elif len(cat) == 2 and cat[0] in "LMNPSZC" and cat[1].islower():
        wanted = [cat]
    else:
        raise ValueError(f"unsupported Unicode property \\p{{{name}}} in pre-tokenizer regex {pattern!r}")
    ranges = sorted(r for c in wanted for r in cats.get(c, []))
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _class_body(ranges) -> str:
    parts = []
    for lo, hi in ranges:
        parts.append(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}")
    return "".join(parts)


def _word_ranges(pattern: str) -> list[tuple[int, int]]:
    # Oniguruma \w: Letter | Mark | Decimal_Number | Connector_Punctuation
    r = []
    for p in ("L", "M", "Nd", "Pc"):
        r += _property_ranges(p, pattern)
    return sorted(r)


def translate_regex(pattern: str) -> str:
    """Translate an Oniguruma/Rust-style regex (as found in tokenizer.json) to Python ``re``.

    ``\\p{..}`` / ``\\P{..}`` become explicit code point classes, ``\\s`` / ``\\S`` use the
    Unicode White_Space set and ``\\w`` / ``\\W`` Oniguruma's definition.  Negated escapes inside
    a bracket expression, POSIX brackets and nested classes are not supported (ValueError).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    class_start = False

    def prop(j: int) -> tuple[str, int]:
        if j < n and pattern[j] == "{":
            k = pattern.find("}", j)
            if k < 0:
                raise ValueError(f"unterminated \\p{{...}} in regex {pattern!r}")
            return pattern[j + 1:k], k + 1
        return pattern[j:j + 1], j + 1

    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e in "pP":
                name, j = prop(i + 2)
                negate = e == "P"
                if name.startswith("^"):
                    name, negate = name[1:], not negate
                body = _class_body(_property_ranges(name, pattern))
                if in_class:
                    if negate:
                        raise ValueError(f"negated \\P{{..}} inside [...] is not supported: {pattern!r}")
                    out.append(body)
                else:
                    out.append(("[^" if negate else "[") + body + "]")
                i = j
            elif e in "sS":
                body = _class_body(WHITE_SPACE)
                if in_class:
                    if e == "S":
                        raise ValueError(f"\\S inside [...] is not supported: {pattern!r}")
                    out.append(body)
                else:
                    out.append(("[^" if e == "S" else "[") + body + "]")
                i += 2
            elif e in "wW":
                body = _class_body(_word_ranges(pattern))
                if in_class:
                    if e == "W":
                        raise ValueError(f"\\W inside [...] is not supported: {pattern!r}")
                    out.append(body)
                else:
                    out.append(("[^" if e == "W" else "[") + body + "]")
                i += 2
            elif e == "h":
                out.append("0-9a-fA-F" if in_class else "[0-9a-fA-F]")
                i += 2
            elif e == "z":
                out.append("\\Z")
                i += 2
            elif e == "x" and i + 2 < n and pattern[i + 2] == "{":
                k = pattern.find("}", i)
                out.append(f"\\U{int(pattern[i + 3:k], 16):08x}")
                i = k + 1
            else:
                out.append(pattern[i:i + 2])
                i += 2
            class_start = False
            continue
        if in_class:
            if c == "[" and not class_start:
                if pattern.startswith("[:", i):
                    raise ValueError(f"POSIX bracket expressions are not supported: {pattern!r}")
                raise ValueError(f"nested character classes are not supported: {pattern!r}")
            if c == "&" and pattern.startswith("&&", i):
                raise ValueError(f"class intersection (&&) is not supported: {pattern!r}")
            if c == "]" and not class_start:
                in_class = False
            out.append(c)
            class_start = class_start and c == "^"
            i += 1
            continue
        if c == "[":
            in_class = True
            class_start = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


_COMPILED: dict[str, re.Pattern] = {}


def compile_regex(pattern: str) -> re.Pattern:
    """translate_regex, compiled once per pattern (a ValueError names a pattern re rejects)."""
    rx = _COMPILED.get(pattern)
    if rx is None:
        try:
            rx = re.compile(translate_regex(pattern))
        except re.error as exc:
            raise ValueError(f"cannot translate pre-tokenizer regex {pattern!r}: {exc}") from None
        _COMPILED[pattern] = rx
    return rx


GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
