"""The tokenizer as transformers users call it, and streaming text (issue 11 item 8)."""
import io
import os

import numpy as np
import pytest
from conftest import make_model

import xoron

DEMO = os.path.join(os.path.dirname(xoron.__file__), "demo")
TEXT = "Café 😀 naïve 中文"


@pytest.fixture(scope="module")
def tok():
    if not os.path.exists(os.path.join(DEMO, "tokenizer.json")):
        pytest.skip("xoron/demo/tokenizer.json is not there")
    return xoron.load_tokenizer(DEMO)


def test_public_names_of_the_tokenizer_package(tok):
    """xoron.tokenizer is a package of one module per concern; its names stay where they were."""
    from xoron.tokenizer import (GPT2_PATTERN, QWEN2_PATTERN, Encoding, StreamDecoder, Tokenizer, bytes_to_unicode,
                                 load_tokenizer, translate_regex)
    assert isinstance(tok, Tokenizer) and isinstance(load_tokenizer(DEMO), Tokenizer)
    assert isinstance(tok("Hi"), Encoding)
    assert isinstance(tok.stream_decoder(), StreamDecoder)
    assert xoron.streaming.StreamDecoder is StreamDecoder
    assert len(bytes_to_unicode()) == 256 and translate_regex(GPT2_PATTERN) and translate_regex(QWEN2_PATTERN)


def test_call_pads_on_the_left_with_a_mask(tok):
    texts = ["Once upon a time", "Hi"]
    enc = tok(texts, padding=True, return_tensors="np")
    a, b = tok.encode(texts[0], add_special_tokens=True), tok.encode(texts[1], add_special_tokens=True)
    assert enc.input_ids.shape == (2, len(a)) and enc["attention_mask"].shape == (2, len(a))
    assert enc.input_ids.dtype == np.int64
    np.testing.assert_array_equal(enc.input_ids[1, len(a) - len(b):], b)
    assert (enc.input_ids[1, :len(a) - len(b)] == tok.pad_token_id).all()
    np.testing.assert_array_equal(enc.attention_mask[1], [0] * (len(a) - len(b)) + [1] * len(b))
    right = tok(texts, padding=True, return_tensors="np", padding_side="right")
    np.testing.assert_array_equal(right.input_ids[1, :len(b)], b)
    tok.padding_side = "right"
    try:
        np.testing.assert_array_equal(tok(texts, padding=True, return_tensors="np").input_ids, right.input_ids)
    finally:
        tok.padding_side = "left"
    assert tok("Hi").input_ids == b and tok("Hi").attention_mask == [1] * len(b)
    assert tok(texts).input_ids == [a, b]


def test_call_max_length_truncation_and_torch(tok):
    enc = tok(["Once upon a time there was", "Hi"], padding="max_length", truncation=True, max_length=3,
              return_tensors="np")
    assert enc.input_ids.shape == (2, 3)
    torch = pytest.importorskip("torch")
    pt = tok(["Once upon a time", "Hi"], padding=True, return_tensors="pt")
    assert isinstance(pt.input_ids, torch.Tensor) and pt.input_ids.dtype == torch.int64
    moved = pt.to("cpu")
    assert set(moved) == {"input_ids", "attention_mask"} and moved.attention_mask.device.type == "cpu"
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        enc.to("cpu")


@pytest.mark.parametrize("kw, err, match", [
    (dict(return_tensors="tf"), ValueError, "return_tensors"),
    (dict(padding="sometimes"), ValueError, "padding"),
    (dict(truncation=True), ValueError, "max_length"),
    (dict(max_length=0, truncation=True), ValueError, "max_length"),
    (dict(padding=True, padding_side="middle"), ValueError, "padding_side"),
    (dict(return_tensors="np"), ValueError, "padding=True"),
    (dict(not_an_option=1), TypeError, "not_an_option"),
])
def test_call_bad_arguments(tok, kw, err, match):
    with pytest.raises(err, match=match):
        tok(["Once upon a time", "Hi"], **kw)
    with pytest.raises(TypeError, match="string"):
        tok(3)


def test_batch_decode_and_skip_special_tokens(tok):
    eos = tok.eos_token_id
    rows = [tok.encode("Hello there") + [eos], [eos] * 2 + tok.encode("Hi")]
    got = tok.batch_decode(rows, skip_special_tokens=True)
    assert got == ["Hello there", "Hi"]
    padded = tok(["Hello there", "Hi"], padding=True, return_tensors="np").input_ids
    assert tok.batch_decode(padded, skip_special_tokens=True) == ["Hello there", "Hi"]
    assert tok.batch_decode(rows)[0].endswith(tok.id_to_token(eos))


def test_streaming_prints_characters_split_across_tokens(tok):
    ids = tok.encode(TEXT)
    assert any(not _valid_utf8(tok.token_bytes(i)) for i in ids), "the text must split a character"
    m = make_model(dict(vocab_size=len(tok)), seed=1)
    prompt = np.array([tok.encode("Once")])
    t = prompt.shape[1]

    def steer(seqs, scores):  # the model writes TEXT, then EOS
        step = seqs.shape[1] - t
        scores = np.full_like(scores, -1e9)
        scores[:, ids[step] if step < len(ids) else tok.eos_token_id] = 0.0
        return scores

    buf = io.StringIO()
    out = m.model.generate(prompt, max_new_tokens=len(ids) + 1, do_sample=False, logits_processor=steer,
                           eos_token_id=tok.eos_token_id, streamer=xoron.TextStreamer(tok, skip_prompt=True,
                                                                                      skip_special_tokens=True,
                                                                                      file=buf))
    assert buf.getvalue() == TEXT + "\n"
    assert tok.batch_decode(out[:, t:], skip_special_tokens=True) == [TEXT]
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in m.model.generate_stream(prompt, max_new_tokens=len(ids), do_sample=False,
                                                           logits_processor=steer)]
    assert "".join(pieces) + dec.flush() == TEXT and "\ufffd" not in "".join(pieces)
    with pytest.raises(ValueError, match="one row"):
        xoron.TextStreamer(tok).put(np.zeros((2, 3), np.int64))


def _valid_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_generate_takes_the_encoding_unpacked(tok):
    m = make_model(dict(vocab_size=len(tok)), seed=2)
    texts = ["Once upon a time", "Hi"]
    out = m.model.generate(**tok(texts, padding=True, return_tensors="np"), max_new_tokens=4, do_sample=False)
    for row, text in enumerate(texts):
        alone = m.model.generate(tok(text, return_tensors="np").input_ids, max_new_tokens=4, do_sample=False)
        np.testing.assert_array_equal(out[row, -4:], alone[0, -4:])
