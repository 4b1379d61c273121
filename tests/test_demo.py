"""The packaged demo model (xoron/demo): it loads, generates reproducibly, and the engine's
held-out perplexity equals the PyTorch implementation's (xoron/torch_reference.py).

tests/data/heldout_sample.txt is an 18 KB excerpt of the held-out split (one Jane Austen
chapter, part of one King James chapter); the model never saw it in training.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import xoron

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(os.path.abspath(xoron.__file__)), "demo")
SAMPLE = os.path.join(HERE, "data", "heldout_sample.txt")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model():
    return xoron.MoELlamaForCausalLM.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def tok():
    return xoron.load_tokenizer(DEMO)


def _weight_files():
    index = os.path.join(DEMO, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(DEMO, v) for v in json.load(f)["weight_map"].values()})
    return [os.path.join(DEMO, "model.safetensors")]


def _windows(tok, n=4, t=256):
    """n non-overlapping windows of t tokens spread evenly over the held-out sample."""
    with open(SAMPLE, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read()), dtype=np.int64)
    assert len(ids) >= n * t
    starts = np.linspace(0, len(ids) - t, n).astype(int)
    return np.stack([ids[s:s + t] for s in starts])


def test_demo_checkpoint_is_the_architecture(model):
    with open(os.path.join(DEMO, "config.json")) as f:
        raw = json.load(f)
    assert raw["eos_token_id"] == 0 and raw["pad_token_id"] == 0 and raw["bos_token_id"] is None
    c = model.config
    assert c.vocab_size == 4096
    assert 0 < c.kv_lora_rank < c.hidden_size
    moe = raw["moe_config"]
    assert moe["use_moe"] and moe["moe_layer_freq"] == 2
    assert moe["num_experts"] >= 4 and moe["num_experts_per_tok"] == 2
    assert raw["tie_word_embeddings"] is True
    sizes = [os.path.getsize(p) for p in _weight_files()]
    assert all(s < 16_000_000 for s in sizes) and sum(sizes) < 32_000_000


def test_tokenizer_round_trip(tok):
    ids = tok.encode(PROMPT)
    assert tok.decode(ids) == PROMPT
    assert max(ids) < 4096


def test_generate_reproducible_and_readable(model, tok):
    ids = np.asarray([tok.encode(PROMPT)], dtype=np.int64)
    kw = dict(max_new_tokens=32, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    a = model.generate(ids, **kw)
    b = model.generate(ids, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape[1] > ids.shape[1]
    np.testing.assert_array_equal(a[:, :ids.shape[1]], ids)
    text = tok.decode([int(i) for i in a[0]])
    assert isinstance(text, str) and text.startswith(PROMPT)
    greedy = tok.decode([int(i) for i in model.generate(ids, max_new_tokens=32, do_sample=False)[0]])
    for t in (text, greedy):
        words = [w.strip(".,;:!?'\"()").lower() for w in t[len(PROMPT):].split()]
        common = {"the", "and", "of", "to", "a", "in", "he", "she", "her", "his", "that", "was",
                  "it", "i", "unto", "for", "with", "not", "be", "had", "is", "they", "all", "said"}
        assert sum(w in common for w in words) >= 5, t


def test_heldout_perplexity_matches_torch(model, tok):
    torch = pytest.importorskip("torch")
    from xoron.torch_reference import TorchMoELlama, load_safetensors_numpy

    x = _windows(tok)
    eng_loss = float(model(input_ids=x, labels=x).loss)

    with open(os.path.join(DEMO, "config.json")) as f:
        tm = TorchMoELlama(json.load(f))
    state = {}
    for p in _weight_files():
        state.update({k: torch.from_numpy(v) for k, v in load_safetensors_numpy(p).items()})
    tm.load_state_dict(state, strict=True)
    tm.eval()
    with torch.no_grad():
        ref_loss = float(tm(torch.from_numpy(x), labels=torch.from_numpy(x))[0])

    eng_ppl, ref_ppl = math.exp(eng_loss), math.exp(ref_loss)
    assert abs(eng_ppl - ref_ppl) <= 1e-3 * ref_ppl, (eng_ppl, ref_ppl)
    assert eng_ppl < 80, eng_ppl  # a trained model: about 30 on the held-out split
