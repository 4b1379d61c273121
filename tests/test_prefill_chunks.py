"""Chunked prefill (option prefill_chunk, issue 13 item 4): an input longer than the chunk runs
through all layers in passes of at most prefill_chunk tokens (over all rows), each pass writing
its cache slots and attending to the earlier ones as past keys. Its results are those of one
pass over the whole input: the same keys in the same order, to the rounding of products over
fewer rows (SAME), and the float64 oracle's within SPEC section 8 (TOL_F32)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL_F32, make_model, rel_err

import xoron

SAME = 1e-5    # a product over fewer rows may block (and round) its sums differently
CHUNK = 32     # tokens per pass of the chunked twin
CONFIG = {"num_key_value_heads": 2, "use_moe": True}


@pytest.fixture(scope="module")
def built():
    return make_model(CONFIG, seed=7)


def chunked(built, chunk=CHUNK, cache_format="latent", **kw):
    """The same weights in a model whose passes are at most `chunk` tokens."""
    m = xoron.MoELlamaForCausalLM(built.config, seed=0, cache_format=cache_format,
                                  options={"prefill_chunk": chunk}, **kw)
    m.load_state_dict(built.weights, strict=True)
    return m


@pytest.fixture(scope="module", params=["latent", "kv"])
def twins(request, built):
    """(one-pass model, chunked model) on the same weights and cache format"""
    whole = make_model(CONFIG, seed=7).model
    whole.cache_format = request.param
    return whole, chunked(built, cache_format=request.param)


@pytest.mark.parametrize("t", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_lengths_across_chunk_boundaries(built, twins, t):
    whole, parts = twins
    ids = built.ids(1, t, seed=t)
    want = whole(input_ids=ids).logits
    got = parts(input_ids=ids).logits
    assert got.shape == want.shape
    assert rel_err(got, want) <= SAME
    assert rel_err(got, built.ref(ids)[0]) <= TOL_F32


def test_batch_with_padding_and_explicit_positions(built, twins):
    whole, parts = twins
    b, t = 3, 2 * CHUNK + 7   # 3 rows: passes of CHUNK // 3 tokens per row
    ids = built.ids(b, t, seed=1)
    mask = np.ones((b, t), np.int64)
    mask[1, :9] = 0           # left padding
    mask[2, :t // 2] = 0
    for kw in ({"attention_mask": mask},
               {"position_ids": np.arange(5, 5 + t)[None].repeat(b, 0)},
               {"attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}):
        want = whole(input_ids=ids, **kw).logits
        got = parts(input_ids=ids, **kw).logits
        assert rel_err(got, want) <= SAME
        ref = built.ref(ids, **kw)[0]
        keep = mask.astype(bool) if "attention_mask" in kw else np.ones((b, t), bool)
        assert rel_err(got[keep], ref[keep]) <= TOL_F32


def test_continues_an_existing_cache(built, twins):
    whole, parts = twins
    ids = built.ids(2, 11 + 3 * CHUNK, seed=2)
    full = built.ref(ids)[0]
    outs = []
    for m in (whole, parts):
        first = m(input_ids=ids[:, :11], use_cache=True)
        rest = m(input_ids=ids[:, 11:], past_key_values=first.past_key_values, use_cache=True)
        assert rest.past_key_values.length == ids.shape[1]
        step = m(input_ids=built.ids(2, 1, seed=3), past_key_values=rest.past_key_values)
        outs.append((rest.logits, step.logits))
    assert rel_err(outs[1][0], outs[0][0]) <= SAME
    assert rel_err(outs[1][1], outs[0][1]) <= SAME
    assert rel_err(outs[1][0], full[:, 11:]) <= TOL_F32


@pytest.mark.parametrize("keep", [1, 5, CHUNK // 2 + 3, 70])
def test_logits_to_keep_across_passes(built, twins, keep):
    whole, parts = twins
    ids = built.ids(2, 2 * CHUNK + 9, seed=4)   # passes of 15 tokens per row: keep 19 spans two
    want = whole(input_ids=ids).logits[:, -keep:]
    got = parts(input_ids=ids, logits_to_keep=keep).logits
    assert got.shape == want.shape
    assert rel_err(got, want) <= SAME


def test_hidden_states_inputs_embeds_and_loss(built, twins):
    whole, parts = twins
    ids = built.ids(2, 2 * CHUNK + 3, seed=5)
    a = whole(input_ids=ids, labels=ids, output_hidden_states=True)
    b = parts(input_ids=ids, labels=ids, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == built.config["num_hidden_layers"] + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert x.shape == y.shape
        assert rel_err(y, x) <= SAME
    assert abs(a.loss - b.loss) <= SAME
    emb = a.hidden_states[0]
    got = parts(inputs_embeds=emb).logits
    assert rel_err(got, a.logits) <= SAME


def test_generate_from_a_long_prompt(built, twins):
    whole, parts = twins
    prompt = built.ids(2, 3 * CHUNK + 1, seed=6)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, output_scores=True,
              return_dict_in_generate=True)
    a = whole.generate(prompt, **kw)
    b = parts.generate(prompt, **kw)
    np.testing.assert_array_equal(b.sequences, a.sequences)
    assert rel_err(np.stack(b.scores), np.stack(a.scores)) <= SAME


def test_passes_split_evenly_and_a_chunk_of_one_works(built):
    ids = built.ids(2, 9, seed=8)
    want = built.ref(ids)[0]
    for chunk in (1, 2, 3, 17):  # 1 token per row per pass, down to one pass
        assert rel_err(chunked(built, chunk)(input_ids=ids).logits, want) <= TOL_F32


@pytest.mark.parametrize("value, msg", [
    (0, r"option prefill_chunk: '0' is not valid \(expected auto or an integer in \[1, 1048576\]\)"),
    (2 ** 21, r"option prefill_chunk: '2097152' is not valid"),
    ("12x", r"option prefill_chunk: '12x' is not valid"),
    ("big", r"option prefill_chunk: 'big'"),
])
def test_bad_chunk(built, value, msg):
    with pytest.raises(ValueError, match=msg):
        xoron.MoELlamaForCausalLM(built.config, seed=0, options={"prefill_chunk": value})


def test_environment_sets_the_chunk(built, monkeypatch):
    monkeypatch.setenv("XORON_PREFILL_CHUNK", "-3")
    with pytest.raises(ValueError, match=r"environment variable XORON_PREFILL_CHUNK: option prefill_chunk: '-3'"):
        xoron.MoELlamaForCausalLM(built.config, seed=0)
    monkeypatch.setenv("XORON_PREFILL_CHUNK", "4")
    m = xoron.MoELlamaForCausalLM(built.config, seed=0)
    m.load_state_dict(built.weights, strict=True)
    ids = built.ids(1, 13, seed=9)
    assert rel_err(m(input_ids=ids).logits, built.ref(ids)[0]) <= TOL_F32


def test_memory_stats_are_none_on_the_cpu(built):
    assert built.model.memory_stats() is None
    assert built.model.memory_stats(reset_peak=True) is None


def test_auto_is_the_backends_chunk(built):
    """'auto' (the default) takes the backend's chunk: 4096 tokens on the CPU (two passes here)"""
    ids = built.ids(1, 4100, seed=10)
    want = chunked(built, 4096)(input_ids=ids).logits
    np.testing.assert_array_equal(chunked(built, "auto")(input_ids=ids).logits, want)
    np.testing.assert_array_equal(built.model(input_ids=ids).logits, want)
