"""Added and special tokens: found in the text before the pipeline runs, as tokenizers does
(leftmost-longest, with the single_word, lstrip and rstrip rules)."""

from __future__ import annotations

import re

from .regex import WS_CHARS


def added_matcher(tokens: list[dict], normalize):
    """Regex matching the given added tokens, leftmost-longest (like the aho-corasick matcher)."""
    if not tokens:
        return None
    by_content: dict[str, dict] = {}
    for t in tokens:
        content = t["content"]
        if t.get("normalized") and normalize is not None:
            content = normalize(content)
        if content:
            by_content.setdefault(content, t)
    if not by_content:
        return None
    alts = sorted(by_content, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alts)), by_content


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def split_added(text: str, matcher) -> list[tuple[str, int | None]]:
    """`text` as (plain text, None) and ("", added token id) segments, in order."""
    if matcher is None or not text:
        return [(text, None)] if text else []
    rx, by_content = matcher
    out: list[tuple[str, int | None]] = []
    offset = 0
    for m in rx.finditer(text):
        start, stop = m.span()
        if start < offset:
            continue
        tok = by_content[m.group()]
        if tok.get("single_word"):
            if start > 0 and _is_word_char(text[start - 1]):
                continue
            if stop < len(text) and _is_word_char(text[stop]):
                continue
        if tok.get("lstrip"):
            while start > offset and text[start - 1] in WS_CHARS:
                start -= 1
        if tok.get("rstrip"):
            while stop < len(text) and text[stop] in WS_CHARS:
                stop += 1
        if offset < start:
            out.append((text[offset:start], None))
        out.append(("", tok["id"]))
        offset = stop
    if offset < len(text):
        out.append((text[offset:], None))
    return out
