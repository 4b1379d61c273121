"""Dependency-free loader for HuggingFace ``tokenizer.json`` files of the byte-level BPE kind.

Covers the GPT-2 / RoBERTa / Qwen2 / Qwen2.5 / Llama-3 family: a ``BPE`` model over the
GPT-2 byte<->unicode alphabet, a ``ByteLevel`` pre-tokenizer (optionally preceded by ``Split``
regex / ``Digits`` pre-tokenizers), a ``ByteLevel`` decoder, optional Unicode normalisers and
added/special tokens.  Only the Python standard library is used (no ``regex``, no
``tokenizers``), and the package imports nothing of xoron outside it, so it can be loaded on
its own by file path, without the built extension (tests/test_tokenizer.py shows how).

The ``\\p{L}`` / ``\\p{N}`` classes of the Oniguruma regexes in ``tokenizer.json`` are translated
into explicit Unicode ranges built from :mod:`unicodedata`, and ``\\s`` into the Unicode
White_Space set (Python's ``\\s`` also matches U+001C..U+001F, Oniguruma's does not), so
pre-tokenisation gives the same pieces as the Rust implementation.  BPE is applied by merge
rank; results are cached per pre-token piece.

One concern per module: byte_level (the GPT-2 byte alphabet), regex (Oniguruma to ``re``),
normalizers, pre_tokenizers, added_tokens, bpe (the model), post_processor, tokenizer (the
pipeline, encoding and decoding), encoding (what ``tokenizer(...)`` returns), stream_decoder,
files (reading tokenizer.json and tokenizer_config.json).

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

from .byte_level import bytes_to_unicode
from .encoding import Encoding
from .files import load_tokenizer
from .regex import GPT2_PATTERN, QWEN2_PATTERN, translate_regex
from .stream_decoder import StreamDecoder
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "Encoding", "StreamDecoder", "load_tokenizer", "bytes_to_unicode", "translate_regex",
           "GPT2_PATTERN", "QWEN2_PATTERN"]
