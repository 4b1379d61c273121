"""Tests for the dependency-free tokenizer loader, the package ``xoron/tokenizer/``.

The package is imported by file path so these tests run without building the extension (as
tools/train_tokenizer.py loads it); test_standalone_import_needs_no_extension checks that.  The
comparisons against HuggingFace ``tokenizers`` run only when that package is installed.
"""

import importlib.util
import json
import os
import random
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, "xoron", "demo", "tokenizer.json")


def _load_module():
    name = "xoron_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = os.path.join(REPO, "xoron", "tokenizer")
    spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


xt = _load_module()

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

ROUND_TRIP = [
    "Once upon a time",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Café naïve façade, Ærøskøbing, São Paulo, Dvořák, Łódź",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "line one\nline two\r\n\nline four\n\n\n",
    "multiple   spaces\t\ttabs   and trailing spaces   ",
    "   leading spaces",
    "Numbers 1234567890, 3.14159, ½ Ⅻ ٣٤٥",
    "Greek Ελληνικά, Cyrillic Кириллица, Arabic العربية, Hebrew עברית",
    "Contractions: don't, I'LL, we've, she'd, they're, it's",
    "Symbols: ~!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/ « » — – … ©",
    "odd whitespace:\u00a0nbsp\u3000ideographic\u2028ls\u0085nel\x1cfs\x1dgs",
    "",
    " ",
    "\n",
]


def _varied_texts(n=300, seed=1234):
    """Deterministic pseudo-random strings mixing scripts, digits, punctuation and whitespace."""
    rng = random.Random(seed)
    words = ["the", "The", "THE", "king", "Elizabeth", "don't", "I'm", "WE'VE", "x", "ab", "café",
             "naïve", "e\u0301", "Ångström", "中文", "日本語", "한국어", "Москва", "αβγ", "العربية", "😀",
             "👍🏽", "🇫🇷", "👨‍👩‍👧", "12", "3", "12345", "٣٤", "½", "Ⅻ", "3.14", "$100", "#tag", "@user",
             "<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello world", "<|mask|>", "...", "--",
             "?!", "\"quoted\"", "'s", "(paren)", "a_b", "\u200b", "\ufeff", "\x00", "\x7f", "\ud7ff"]
    seps = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000",
            "\x1c", "\x1f", "\x85", "\u2028", "", ",", ". "]
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        parts = []
        for _ in range(k):
            parts.append(rng.choice(words))
            parts.append(rng.choice(seps))
        if rng.random() < 0.3:
            parts.insert(0, rng.choice(seps))
        out.append("".join(parts))
    return out


VARIED = _varied_texts()


# ------------------------------------------------------------------------------------------------
# The shipped demo tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    if not os.path.isfile(DEMO_TOKENIZER):
        pytest.skip("xoron/demo/tokenizer.json not built (run tools/train_tokenizer.py)")
    return xt.load_tokenizer(DEMO_TOKENIZER)


def test_demo_metadata(demo):
    assert demo.eos_token_id == 0
    assert demo.id_to_token(0) == "<|endoftext|>"
    assert demo.token_to_id("<|endoftext|>") == 0
    assert 4096 <= demo.vocab_size <= 8192
    assert len(demo) == demo.vocab_size
    assert demo.special_ids == frozenset({0})
    assert demo.id_to_token(demo.vocab_size + 10) is None
    assert demo.token_to_id("no such token") is None
    # a directory holding tokenizer.json also works
    assert xt.load_tokenizer(os.path.dirname(DEMO_TOKENIZER)).vocab_size == demo.vocab_size


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_demo_round_trip(demo, text):
    ids = demo.encode(text)
    assert all(isinstance(i, int) and 0 <= i < demo.vocab_size for i in ids)
    assert demo.decode(ids) == text


def test_demo_round_trip_varied(demo):
    import unicodedata
    for text in VARIED:
        assert demo.decode(demo.encode(text)) == unicodedata.normalize("NFC", text)


def test_demo_nfc_normalizer(demo):
    decomposed = "Cafe\u0301"  # NFD
    assert demo.encode(decomposed) == demo.encode("Caf\u00e9")
    assert demo.decode(demo.encode(decomposed)) == "Caf\u00e9"


def test_demo_special_tokens(demo):
    ids = demo.encode("The end.<|endoftext|>Once upon a time")
    assert ids.count(0) == 1
    assert demo.decode(ids) == "The end.<|endoftext|>Once upon a time"
    assert demo.decode(ids, skip_special_tokens=True) == "The end.Once upon a time"
    # the ByteLevel post-processor adds nothing
    assert demo.encode("hello", add_special_tokens=True) == demo.encode("hello")


def test_demo_compresses_english(demo):
    text = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife.")
    assert len(demo.encode(text)) < len(text) / 3


def test_stream_decoder(demo):
    for text in ROUND_TRIP + VARIED[:50]:
        ids = demo.encode(text)
        sd = xt.StreamDecoder(demo)
        pieces = [sd.push(i) for i in ids]
        assert "".join(pieces) + sd.flush() == demo.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_split_utf8(demo):
    # single-byte tokens of a 4-byte emoji: nothing comes out until the last byte
    byte_ids = [demo.token_to_id(xt.bytes_to_unicode()[b]) for b in "😀".encode()]
    assert None not in byte_ids
    sd = xt.StreamDecoder(demo)
    assert [sd.push(i) for i in byte_ids] == ["", "", "", "😀"]
    assert sd.flush() == ""
    # an incomplete tail is flushed as U+FFFD
    sd = xt.StreamDecoder(demo)
    assert sd.push(byte_ids[0]) == ""
    assert sd.flush() == "\ufffd"
    # skipping special tokens
    sd = xt.StreamDecoder(demo, skip_special_tokens=True)
    assert sd.push(0) == ""
    assert xt.StreamDecoder(demo).push(0) == "<|endoftext|>"


def test_long_text_round_trips_and_repeats(demo):
    # the second encode goes through the word cache the first one filled
    text = " ".join(ROUND_TRIP) * 50
    ids = demo.encode(text)
    assert demo.decode(ids) == text
    assert demo.encode(text) == ids


# ------------------------------------------------------------------------------------------------
# Unsupported files
# ------------------------------------------------------------------------------------------------


def _write(tmp_path, spec, name="tokenizer.json"):
    p = tmp_path / name
    p.write_text(json.dumps(spec), encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("model,needle", [
    ({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}, "Unigram"),
    ({"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}, "WordPiece"),
    ({"type": "WordLevel", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}, "WordLevel"),
])
def test_unsupported_models(tmp_path, model, needle):
    path = _write(tmp_path, {"version": "1.0", "added_tokens": [], "normalizer": None,
                             "pre_tokenizer": None, "post_processor": None, "decoder": None,
                             "model": model})
    with pytest.raises(ValueError, match=needle):
        xt.load_tokenizer(path)


def test_sentencepiece_style_bpe_rejected(tmp_path):
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
            "post_processor": None, "decoder": {"type": "Metaspace"},
            "model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1}, "merges": [], "byte_fallback": True}}
    with pytest.raises(ValueError, match="Metaspace"):
        xt.load_tokenizer(_write(tmp_path, spec))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        xt.load_tokenizer(str(tmp_path))


def test_standalone_import_needs_no_extension(tmp_path):
    """Loaded by file path (as tools/train_tokenizer.py does) the package imports nothing of
    xoron, so it works in a checkout whose extension is not built."""
    import subprocess
    code = f"""
import importlib.util, os, sys
package = {os.path.join(REPO, "xoron", "tokenizer")!r}
spec = importlib.util.spec_from_file_location("standalone_tok", os.path.join(package, "__init__.py"),
                                              submodule_search_locations=[package])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
tok = mod.load_tokenizer({DEMO_TOKENIZER!r}) if os.path.isfile({DEMO_TOKENIZER!r}) else None
text = "Once upon a time, caf\u00e9 \U0001F600"
assert tok is None or tok.decode(tok.encode(text)) == text
assert mod.translate_regex(r"\\p{{N}}").startswith("[")
leaked = sorted(n for n in sys.modules if n == "xoron" or n.startswith("xoron."))
assert not leaked, leaked
print("ok", sorted(n for n in sys.modules if n.startswith("standalone_tok.")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "standalone_tok.bpe" in out.stdout


def test_regex_translation_whitespace():
    import re
    rx = re.compile(xt.translate_regex(r"\s+"))
    assert rx.fullmatch(" \t\n\u00a0\u3000\u2028\x85")
    assert rx.search("\x1c\x1d\x1e\x1f") is None  # not White_Space (Python's own \s says yes)
    rx = re.compile(xt.translate_regex(r"[^\s\p{L}\p{N}]+"))
    assert rx.fullmatch("!?,.\x1c")
    assert rx.search("aé中1½ ") is None
    with pytest.raises(ValueError):
        xt.translate_regex(r"\p{Han}")


# ------------------------------------------------------------------------------------------------
# Agreement with HuggingFace tokenizers
# ------------------------------------------------------------------------------------------------


def _assert_same_ids(ours, ref, texts, add_special_tokens=False):
    for text in texts:
        want = ref.encode(text, add_special_tokens=add_special_tokens).ids
        got = ours.encode(text, add_special_tokens=add_special_tokens)
        assert got == want, f"token ids differ for {text!r}"
        assert ours.decode(got) == ref.decode(want, skip_special_tokens=False), text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True), text


def test_demo_matches_tokenizers(demo):
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(DEMO_TOKENIZER)
    assert ref.get_vocab_size() == demo.vocab_size
    _assert_same_ids(demo, ref, ROUND_TRIP + VARIED)


def _train_text():
    base = ROUND_TRIP + VARIED[:100] + [
        "Once upon a time there was a little girl who lived in a village near the forest. "
        "Whenever she went out, the little girl wore a red riding cloak, so everyone in the "
        "village called her Little Red Riding Hood. 1999 2024 3.14 \u00bd"] * 5
    return base


def _build_byte_level_bpe(tmp_path, style, merges_as_strings=False):
    """Train a small byte-level BPE with the tokenizers library in the given style."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    tok = Tokenizer(models.BPE())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if style in ("qwen2", "llama3"):
        regex = QWEN2_REGEX if style == "qwen2" else LLAMA3_REGEX
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif style == "gpt2-prefix":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    elif style == "digits":
        tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        raise AssertionError(style)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_train_text(), trainer=trainer)
    if style == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken("<|mask|>", lstrip=True, rstrip=True, special=True)])
        tok.add_tokens([AddedToken("hello world", normalized=True, special=False)])
    elif style == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A <|im_end|>", pair="<|im_start|> $A <|im_end|> $B:1 <|im_end|>:1",
            special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>")),
                            ("<|im_end|>", tok.token_to_id("<|im_end|>"))])
    path = tmp_path / f"{style}.json"
    tok.save(str(path))
    if merges_as_strings:
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        path = tmp_path / f"{style}-str.json"
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("style", ["qwen2", "llama3", "gpt2-prefix", "digits"])
def test_matches_tokenizers_small_bpe(tmp_path, style):
    tokenizers = pytest.importorskip("tokenizers")
    path = _build_byte_level_bpe(tmp_path, style)
    ref = tokenizers.Tokenizer.from_file(path)
    ours = xt.load_tokenizer(path)
    assert ours.vocab_size == ref.get_vocab_size()
    _assert_same_ids(ours, ref, ROUND_TRIP + VARIED)
    if style == "llama3":
        _assert_same_ids(ours, ref, ROUND_TRIP[:5], add_special_tokens=True)
        assert ours.eos_token_id == ref.token_to_id("<|im_end|>")  # from the template
        assert ours.bos_token_id == ref.token_to_id("<|im_start|>")
    else:
        assert ours.eos_token_id == ref.token_to_id("<|endoftext|>")


def test_qwen2_merges_as_strings(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = _build_byte_level_bpe(tmp_path, "qwen2", merges_as_strings=True)
    spec = json.loads(open(path, encoding="utf-8").read())
    assert isinstance(spec["model"]["merges"][0], str)
    ref = tokenizers.Tokenizer.from_file(path)
    ours = xt.load_tokenizer(path)
    _assert_same_ids(ours, ref, ROUND_TRIP + VARIED[:100])


def test_tokenizer_config_eos(tmp_path):
    pytest.importorskip("tokenizers")
    path = _build_byte_level_bpe(tmp_path, "qwen2")
    folder = tmp_path / "model"
    folder.mkdir()
    os.replace(path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = xt.load_tokenizer(str(folder))
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
