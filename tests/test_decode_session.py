"""Decode sessions (csrc/engine/decode_session.c): after the prefill, generate() runs its steps with the
bookkeeping on the backend (on a GPU each step is a replayed CUDA graph) and reads the tokens
back every few steps. These tests hold generate() to a step-by-step loop of
forward(use_cache=True) and argmax in Python, over runs long enough to wrap the 64-step token
ring and to outgrow the 64-key bound a step is recorded for, with rows finishing at different
steps, EOS suppressed by min_new_tokens, and a streamer.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DEVICES, make_model

import xoron


GPU = xoron.cuda_available()
MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2, num_hidden_layers=3)


def built(device, cache_format="latent", seed=5, **cfg):
    m = make_model(cfg or MOE, seed=seed)
    m.model.to(device)
    m.model.cache_format = cache_format
    return m


def stepwise_greedy(model, prompt, n, eos=(), pad=0, min_new=0):
    """The reference: one forward per token through the cache, argmax and EOS bookkeeping in numpy."""
    out = model(input_ids=prompt, use_cache=True)
    b = prompt.shape[0]
    finished = np.zeros(b, bool)
    eos = np.asarray(list(eos), np.int64)
    made = []
    logits = np.asarray(out.logits)[:, -1].astype(np.float64)
    for step in range(n):
        if step < min_new and eos.size:
            logits[:, eos] = -np.inf
        tok = np.where(finished, pad, logits.argmax(axis=1))
        finished |= np.isin(tok, eos)
        made.append(tok)
        if finished.all() or step + 1 == n:
            break
        out = model(input_ids=tok[:, None], past_key_values=out.past_key_values, use_cache=True)
        logits = np.asarray(out.logits)[:, -1].astype(np.float64)
    return np.concatenate([prompt, np.stack(made, axis=1)], axis=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_format", ["latent", "kv"])
@pytest.mark.parametrize("rows, new, layers", [
    (3, 150, 3),  # wraps the token ring, outgrows the 64-key bound twice
    (2, 900, 2),  # generate() reserves room for 512 new tokens (768 slots here): the session grows the cache
])
def test_long_greedy_run_equals_stepwise_loop(device, cache_format, rows, new, layers):
    m = built(device, cache_format, **dict(MOE, num_hidden_layers=layers))
    prompt = m.ids(rows, 5, seed=4)
    got = m.model.generate(prompt, max_new_tokens=new, do_sample=False)
    want = stepwise_greedy(m.model, prompt, new)
    assert got.shape == (rows, 5 + new)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_finish_at_different_steps(device):
    m = built(device)
    prompt = m.ids(3, 4, seed=8)
    free = m.model.generate(prompt, max_new_tokens=120, do_sample=False)
    # an EOS that row 1 makes late (after the first few reads), and one that another row makes early
    late = int(free[1, 4 + 75])
    early = int(free[0, 4 + 9])
    eos = [late, early]
    got = m.model.generate(prompt, max_new_tokens=120, do_sample=False, eos_token_id=eos, pad_token_id=3)
    want = stepwise_greedy(m.model, prompt, 120, eos=eos, pad=3)
    np.testing.assert_array_equal(got, want)
    for r in range(3):  # after its EOS a row holds only pads
        row = list(got[r, 4:])
        hits = [i for i, t in enumerate(row) if t in eos]
        if hits:
            assert all(t == 3 for t in row[hits[0] + 1:])


@pytest.mark.parametrize("device", DEVICES)
def test_min_new_tokens_suppresses_eos_inside_the_session(device):
    m = built(device)
    prompt = m.ids(2, 4, seed=2)
    free = m.model.generate(prompt, max_new_tokens=40, do_sample=False)
    eos = int(free[0, 4 + 3])
    got = m.model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, min_new_tokens=25)
    want = stepwise_greedy(m.model, prompt, 40, eos=[eos], pad=eos, min_new=25)
    np.testing.assert_array_equal(got, want)
    assert eos not in list(got[0, 4:4 + 25]) and eos not in list(got[1, 4:4 + 25])


@pytest.mark.parametrize("device", DEVICES)
def test_streamer_gets_every_session_token_in_order(device):
    m = built(device)
    prompt = m.ids(2, 3, seed=6)
    puts = []

    class Rec:
        def put(self, ids):
            puts.append(np.asarray(ids).copy())

        def end(self):
            pass

    seq = m.model.generate(prompt, max_new_tokens=70, do_sample=False, streamer=Rec())
    assert len(puts) == 71
    np.testing.assert_array_equal(np.stack([p.reshape(-1) for p in puts[1:]], axis=1), seq[:, 3:])


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no usable CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_sampling_in_session_is_reproducible(dtype):
    m = make_model(MOE, seed=9, dtype=dtype, boost=False)
    m.model.to("cuda")
    p = m.ids(4, 3, seed=1)
    kw = dict(max_new_tokens=100, do_sample=True, top_k=20, top_p=0.95, temperature=3.0)
    a = m.model.generate(p, seed=7, **kw)
    b = m.model.generate(p, seed=7, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, m.model.generate(p, seed=8, **kw))
    # without a top-k the draw takes the whole row, in the session too
    whole = dict(max_new_tokens=100, do_sample=True, top_k=0, top_p=0.95, temperature=3.0)
    c = m.model.generate(p, seed=7, **whole)
    np.testing.assert_array_equal(c, m.model.generate(p, seed=7, **whole))
    assert not np.array_equal(c, m.model.generate(p, seed=8, **whole))
    # top_k=1 draws the argmax
    greedy = m.model.generate(p, max_new_tokens=100, do_sample=False)
    np.testing.assert_array_equal(m.model.generate(p, max_new_tokens=100, do_sample=True, top_k=1, seed=3), greedy)


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no usable CUDA device")
@pytest.mark.parametrize("cache_format", ["latent", "kv"])
def test_graphs_off_gives_the_same_tokens(monkeypatch, cache_format):
    m = built("cuda", cache_format)
    prompt = m.ids(2, 5, seed=3)
    with_graphs = m.model.generate(prompt, max_new_tokens=140, do_sample=False)
    monkeypatch.setenv("XORON_CUDA_GRAPHS", "0")  # read when a backend is made
    eager = built("cuda", cache_format)
    np.testing.assert_array_equal(eager.model.generate(prompt, max_new_tokens=140, do_sample=False), with_graphs)


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="no usable CUDA device")
def test_gpu_top_k_over_a_large_vocabulary():
    # 20000 columns: the k-th logit is found by histograms over several blocks per row
    cfg = {"vocab_size": 20000, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
           "num_attention_heads": 4, "kv_lora_rank": 16}
    m = xoron.MoELlamaForCausalLM(cfg, device="cuda", seed=1)
    p = np.random.default_rng(0).integers(0, 20000, size=(3, 4))
    logits = np.asarray(m(input_ids=p).logits)[:, -1]
    np.testing.assert_array_equal(m.generate(p, max_new_tokens=1, do_sample=True, top_k=1, seed=5)[:, -1],
                                  logits.argmax(axis=1))
    for k in (7, 1000):
        kth = np.sort(logits, axis=1)[:, -k]
        drawn = np.stack([m.generate(p, max_new_tokens=1, do_sample=True, top_k=k, top_p=1.0, seed=s)[:, -1]
                          for s in range(40)], axis=1)
        for r in range(3):
            assert (logits[r, drawn[r]] >= kth[r]).all(), (k, r)
        assert len(set(drawn[0])) > 1  # draws do spread over the kept set
