"""Dependency-free loader for HuggingFace ``tokenizer.json`` files of the byte-level BPE kind.

Covers the GPT-2 / RoBERTa / Qwen2 / Qwen2.5 / Llama-3 family: a ``BPE`` model over the
GPT-2 byte<->unicode alphabet, a ``ByteLevel`` pre-tokenizer (optionally preceded by ``Split``
regex / ``Digits`` pre-tokenizers), a ``ByteLevel`` decoder, optional Unicode normalisers and
added/special tokens.  Only the Python standard library is used (no ``regex``, no
``tokenizers``), so the module can be imported on its own by file path.

The ``\\p{L}`` / ``\\p{N}`` classes of the Oniguruma regexes in ``tokenizer.json`` are translated
into explicit Unicode ranges built from :mod:`unicodedata`, and ``\\s`` into the Unicode
White_Space set (Python's ``\\s`` also matches U+001C..U+001F, Oniguruma's does not), so
pre-tokenisation gives the same pieces as the Rust implementation.  BPE is applied by merge
rank; results are cached per pre-token piece.

    >>> tok = load_tokenizer("path/to/tokenizer.json")   # or the folder that holds it
    >>> ids = tok.encode("Once upon a time")
    >>> tok.decode(ids)
    'Once upon a time'
    >>> sd = StreamDecoder(tok)
    >>> "".join(sd.push(i) for i in ids) + sd.flush()
    'Once upon a time'

Unsupported files (Unigram/WordPiece/WordLevel models, SentencePiece-style BPE with a
Metaspace pre-tokenizer, unknown normalisers ...) raise :class:`ValueError` naming what was
found.

Known limit: character classes and Unicode normalisation come from the running Python's
:mod:`unicodedata` (Unicode 14.0 on Python 3.11), while ``tokenizers`` uses its own tables.
Code points whose properties differ between those Unicode versions (letters of scripts added
after Unicode 14, e.g. CJK Extension H, or new compatibility decompositions) can be split
differently; for all other text the token ids are identical.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import unicodedata

__all__ = ["Tokenizer", "Encoding", "StreamDecoder", "load_tokenizer", "bytes_to_unicode"]

# --------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode map
# --------------------------------------------------------------------------------------------


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


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# str.translate table applied to ``s.encode("utf-8").decode("latin-1")``
_LATIN1_TO_MAPPED = {b: c for b, c in _BYTE_TO_CHAR.items()}


def _to_byte_level(s: str) -> str:
    return s.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_MAPPED)


# --------------------------------------------------------------------------------------------
# Unicode classes for translating Oniguruma regexes to Python ``re``
# --------------------------------------------------------------------------------------------

# Unicode White_Space (= Oniguruma's \s for UTF-8 text; Rust's char::is_whitespace)
_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000)]
_WS_CHARS = frozenset(chr(c) for lo, hi in _WHITE_SPACE for c in range(lo, hi + 1))

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
                body = _class_body(_WHITE_SPACE)
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


def _compile(pattern: str) -> re.Pattern:
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


# --------------------------------------------------------------------------------------------
# tokenizer.json components
# --------------------------------------------------------------------------------------------


def _describe(obj) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, dict):
        t = obj.get("type")
        for key in ("normalizers", "pretokenizers", "decoders", "processors"):
            if isinstance(obj.get(key), list):
                return f"{t}[{', '.join(_describe(x) for x in obj[key])}]"
        return str(t)
    return type(obj).__name__


def _build_normalizer(spec):
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
        rx = _compile(pat["Regex"])
        return lambda s: rx.sub(lambda _m: content, s)
    if t == "Sequence":
        parts = [_build_normalizer(x) for x in spec.get("normalizers", [])]
        parts = [p for p in parts if p is not None]

        def seq(s):
            for p in parts:
                s = p(s)
            return s
        return seq
    raise ValueError(f"unsupported normalizer {_describe(spec)!r} in tokenizer.json")


def _build_pre_tokenizer(spec, steps: list, flags: dict) -> None:
    t = spec.get("type")
    if t == "Sequence":
        for sub in spec.get("pretokenizers", []):
            _build_pre_tokenizer(sub, steps, flags)
        return
    if t == "ByteLevel":
        flags["byte_level"] = True
        prefix = bool(spec.get("add_prefix_space", False))
        rx = _compile(GPT2_PATTERN) if spec.get("use_regex", True) else None

        def byte_level(s, prefix=prefix, rx=rx):
            if prefix and not s.startswith(" "):
                s = " " + s
            parts = _split(s, rx, "isolated", False) if rx is not None else [s]
            return [_to_byte_level(p) for p in parts if p]
        steps.append(byte_level)
        return
    if t == "Split":
        pat = spec["pattern"]
        if "Regex" in pat:
            rx = _compile(pat["Regex"])
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


def _added_matcher(tokens: list[dict], normalize):
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


def _split_added(text: str, matcher) -> list[tuple[str, int | None]]:
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
            while start > offset and text[start - 1] in _WS_CHARS:
                start -= 1
        if tok.get("rstrip"):
            while stop < len(text) and text[stop] in _WS_CHARS:
                stop += 1
        if offset < start:
            out.append((text[offset:start], None))
        out.append(("", tok["id"]))
        offset = stop
    if offset < len(text):
        out.append((text[offset:], None))
    return out


_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>", "<eos>",
                   "<|eos|>", "<|end|>", "[EOS]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")


class Tokenizer:
    """A byte-level BPE tokenizer loaded from a HuggingFace ``tokenizer.json``."""

    def __init__(self, spec: dict, source: str = "<dict>", config: dict | None = None):
        self.source = source
        model = spec.get("model") or {}
        mtype = model.get("type")
        if mtype is None and "merges" in model and "vocab" in model:
            mtype = "BPE"
        if mtype != "BPE":
            raise ValueError(
                f"unsupported tokenizer model type {mtype!r} in {source}: only byte-level BPE "
                f"(GPT-2 / Qwen2.5 style) tokenizer.json files are supported")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(
                f"unsupported BPE options in {source}: continuing_subword_prefix="
                f"{model.get('continuing_subword_prefix')!r}, end_of_word_suffix={model.get('end_of_word_suffix')!r}")

        # --- vocabulary -------------------------------------------------------------------------
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # very old format: [[token, score], ...]
            vocab = {t[0]: i for i, t in enumerate(vocab)}
        self._vocab: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self._id_to_token: dict[int, str] = {v: k for k, v in self._vocab.items()}
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(model.get("merges") or []):
            if isinstance(m, str):
                parts = m.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"bad merge {m!r} in {source}")
                a, b = parts
            else:
                a, b = m
            self._ranks.setdefault((a, b), rank)
        self._ignore_merges = bool(model.get("ignore_merges", False))
        self._byte_fallback = bool(model.get("byte_fallback", False))
        self._fuse_unk = bool(model.get("fuse_unk", False))
        unk = model.get("unk_token")
        self._unk_id = self._vocab.get(unk) if unk is not None else None

        # --- added tokens -----------------------------------------------------------------------
        self.added_tokens: list[dict] = [dict(t) for t in spec.get("added_tokens") or []]
        self._added_by_content: dict[str, int] = {}
        for t in self.added_tokens:
            self._added_by_content[t["content"]] = int(t["id"])
            self._id_to_token[int(t["id"])] = t["content"]  # added tokens win, as in tokenizers
        self.special_ids: frozenset[int] = frozenset(int(t["id"]) for t in self.added_tokens if t.get("special"))

        # --- pipeline ---------------------------------------------------------------------------
        self._normalize = _build_normalizer(spec.get("normalizer"))
        self._pre_steps: list = []
        flags: dict = {}
        pre = spec.get("pre_tokenizer")
        if pre is not None:
            _build_pre_tokenizer(pre, self._pre_steps, flags)
        if not flags.get("byte_level"):
            raise ValueError(
                f"{source} is a BPE tokenizer without a ByteLevel pre-tokenizer (pre_tokenizer: "
                f"{_describe(pre)}, decoder: {_describe(spec.get('decoder'))}); only byte-level "
                f"BPE (GPT-2 / Qwen2.5 style) is supported")
        dec = spec.get("decoder")
        dec_types = [d.get("type") for d in dec.get("decoders", [])] if dec and dec.get("type") == "Sequence" \
            else ([dec.get("type")] if dec else [])
        if any(t != "ByteLevel" for t in dec_types):
            raise ValueError(f"unsupported decoder {_describe(dec)!r} in {source} (expected ByteLevel)")
        self._raw_matcher = _added_matcher([t for t in self.added_tokens if not t.get("normalized")], None)
        self._norm_matcher = _added_matcher([t for t in self.added_tokens if t.get("normalized")],
                                            self._normalize)
        self._post = spec.get("post_processor")

        self._cache: dict[str, list[int]] = {}
        self._bytes_cache: dict[int, bytes] = {}
        ids = list(self._id_to_token)
        self.vocab_size: int = (max(ids) + 1) if ids else 0

        # --- special ids --------------------------------------------------------------------------
        config = config or {}
        self.eos_token_id: int | None = self._find_special(config.get("eos_token"), _EOS_CANDIDATES, last=True)
        self.bos_token_id: int | None = self._find_special(config.get("bos_token"), _BOS_CANDIDATES, last=False)
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        # padded positions are masked out, so without a pad token the EOS token serves
        self.pad_token_id: int | None = self.token_to_id(pad) if isinstance(pad, str) else None
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        side = config.get("padding_side", "left")
        self.padding_side: str = side if side in ("left", "right") else "left"  # left: ready for generate()

    # ------------------------------------------------------------------------------------------
    def _find_special(self, configured, candidates, last: bool) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            tid = self.token_to_id(configured)
            if tid is not None:
                return tid
        tmpl = self._template_specials()
        if tmpl:
            if last and tmpl[1] is not None:
                return tmpl[1]
            if not last and tmpl[0] is not None:
                return tmpl[0]
        for name in candidates:
            if name in self._added_by_content:
                return self._added_by_content[name]
        for name in candidates:
            if name in self._vocab:
                return self._vocab[name]
        return None

    def _template_specials(self):
        """(first, last) special token ids that the post-processor wraps a sequence in."""
        post = self._post
        if not post:
            return None
        procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
        first = last = None
        for p in procs:
            t = p.get("type")
            if t == "TemplateProcessing":
                single = p.get("single") or []
                specials = p.get("special_tokens") or {}

                def sid(item):
                    st = item.get("SpecialToken")
                    if not st:
                        return None
                    ids = (specials.get(st["id"]) or {}).get("ids") or []
                    return ids[0] if ids else self.token_to_id(st["id"])
                if single and sid(single[0]) is not None:
                    first = sid(single[0])
                if single and sid(single[-1]) is not None:
                    last = sid(single[-1])
            elif t in ("BertProcessing", "RobertaProcessing"):
                first, last = p["cls"][1], p["sep"][1]
        return first, last

    def _post_process(self, ids: list[int]) -> list[int]:
        post = self._post
        if not post:
            return ids
        procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
        for p in procs:
            t = p.get("type")
            if t == "TemplateProcessing":
                specials = p.get("special_tokens") or {}
                out: list[int] = []
                for item in p.get("single") or []:
                    if "Sequence" in item:
                        out.extend(ids)
                    else:
                        name = item["SpecialToken"]["id"]
                        sp = specials.get(name)
                        if sp and sp.get("ids"):
                            out.extend(int(x) for x in sp["ids"])
                        elif self.token_to_id(name) is not None:
                            out.append(self.token_to_id(name))
                ids = out
            elif t in ("BertProcessing", "RobertaProcessing"):
                ids = [p["cls"][1]] + ids + [p["sep"][1]]
            elif t == "ByteLevel":
                pass
            else:
                raise ValueError(f"unsupported post_processor {t!r} (use add_special_tokens=False)")
        return ids

    # ------------------------------------------------------------------------------------------
    def _bpe(self, word: str) -> list[int]:
        vocab = self._vocab
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        symbols = list(word)
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_pair = r, pair
            if best_pair is None:
                break
            a, b = best_pair
            merged = a + b
            out = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        ids: list[int] = []
        prev_unk = False
        for s in symbols:
            tid = vocab.get(s)
            if tid is not None:
                ids.append(tid)
                prev_unk = False
                continue
            if self._byte_fallback:
                fb = [vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if all(x is not None for x in fb):
                    ids.extend(fb)
                    prev_unk = False
                    continue
            if self._unk_id is not None:
                if not (self._fuse_unk and prev_unk):
                    ids.append(self._unk_id)
                prev_unk = True
            # no unk token: the symbol is dropped, as in tokenizers
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._bpe(piece)
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _pre_tokenize(self, s: str) -> list[str]:
        pieces = [s]
        for step in self._pre_steps:
            nxt: list[str] = []
            for p in pieces:
                nxt.extend(step(p))
            pieces = nxt
        return pieces

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.  Added/special tokens written in the text are recognised;
        ``add_special_tokens`` applies the post-processor (e.g. a BOS from TemplateProcessing)."""
        ids: list[int] = []
        encode_piece = self._encode_piece
        for seg, tid in _split_added(text, self._raw_matcher):
            if tid is not None:
                ids.append(tid)
                continue
            if self._normalize is not None:
                seg = self._normalize(seg)
            for seg2, tid2 in _split_added(seg, self._norm_matcher):
                if tid2 is not None:
                    ids.append(tid2)
                    continue
                for piece in self._pre_tokenize(seg2):
                    if piece:
                        ids.extend(encode_piece(piece))
        if add_special_tokens:
            ids = self._post_process(ids)
        return ids

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None,
                 add_special_tokens=True, return_attention_mask=True, padding_side=None):
        """transformers-style encoding: {"input_ids", "attention_mask"} for a string or a list
        of strings. padding=True/"longest" pads to the longest row, "max_length" to
        max_length, on `padding_side` (default self.padding_side, "left": ready for
        generate()); truncation=True cuts rows to max_length. return_tensors: None (lists),
        "np" (int64 arrays) or "pt" (torch tensors)."""
        single = isinstance(text, str)
        if not single and not (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (False, True, "longest_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        truncate = truncation in (True, "longest_first")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if (truncate or padding == "max_length") and max_length is None:
            raise ValueError("truncation=True and padding='max_length' need max_length")
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if truncate:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token (nor an EOS token to pad with): "
                                 "set tokenizer.pad_token_id first")
            for i, r in enumerate(rows):
                fill = max(width - len(r), 0)
                pads, zeros = [self.pad_token_id] * fill, [0] * fill
                rows[i], masks[i] = (pads + r, zeros + masks[i]) if side == "left" else (r + pads, masks[i] + zeros)
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("the rows have different lengths: give padding=True to return tensors")
            rows, masks = _as_tensors(rows, return_tensors), _as_tensors(masks, return_tensors)
        elif single:
            rows, masks = rows[0], masks[0]
        enc = Encoding(input_ids=rows)
        if return_attention_mask:
            enc["attention_mask"] = masks
        return enc

    # ------------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token decodes to (b"" for unknown ids)."""
        b = self._bytes_cache.get(token_id)
        if b is None:
            tok = self._id_to_token.get(int(token_id))
            if tok is None:
                b = b""
            elif all(c in _CHAR_TO_BYTE for c in tok):
                b = bytes(_CHAR_TO_BYTE[c] for c in tok)
            else:  # e.g. an added token written in plain text: its own UTF-8 (as tokenizers does)
                b = tok.encode("utf-8", "surrogatepass")
            self._bytes_cache[token_id] = b
        return b

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = self.special_ids
        buf = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special:
                continue
            buf += self.token_bytes(i)
        return buf.decode("utf-8", "replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """decode() of each row of a list of id lists, a 2-D array or a 2-D tensor."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder: push(token_id) gives the text each token completes."""
        return StreamDecoder(self, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token.get(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        tid = self._added_by_content.get(token)
        return tid if tid is not None else self._vocab.get(token)

    def get_vocab(self) -> dict[str, int]:
        v = dict(self._vocab)
        v.update(self._added_by_content)
        return v

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"eos_token_id={self.eos_token_id})")


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


def _as_tensors(rows: list, kind: str):
    if kind == "np":
        import numpy as np
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    try:
        import torch
    except ImportError:
        raise ImportError("return_tensors='pt' needs torch; use return_tensors='np' without it") from None
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the text completed by that token.

    Bytes of a UTF-8 sequence split across tokens are held back until the sequence is complete;
    invalid bytes come out as U+FFFD.  Call ``flush()`` at the end for any incomplete tail.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def reset(self) -> None:
        self._decoder.reset()


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
