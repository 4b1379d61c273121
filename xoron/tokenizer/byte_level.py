"""The GPT-2 byte-level alphabet: every byte value written as one printable character, so
that BPE runs on text and any byte sequence survives."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 map from each byte value to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = bytes_to_unicode()  # also the str.translate table of latin-1 text, byte by byte
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def to_byte_level(s: str) -> str:
    """The text's UTF-8 bytes, each written as its character of the GPT-2 map."""
    return s.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_TO_CHAR)
