"""Cache and generate() (issue 3, SPEC section 7), on every device (the `device` fixture)."""
import numpy as np
import pytest

import reference_impl as R
from conftest import TOL_F32, make_model, rel_err

import xoron
from xoron import _C

MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2, num_hidden_layers=3)


# ---------------------------------------------------------------- cache consistency

@pytest.mark.parametrize("cache_format", ["latent", "kv"])
@pytest.mark.parametrize("case", [
    dict(),
    dict(num_key_value_heads=2, **MOE),
    dict(q_lora_rank=8, tie_word_embeddings=False),
    dict(ring_attention_chunk_size=8, use_ring_attention=False),
])
@pytest.mark.parametrize("split", [(5, [1] * 12), (1, [3, 1, 4, 1, 5, 3]), (13, [2, 2, 1])])
def test_cached_steps_equal_full_forward(case, split, cache_format, device):
    m = make_model(case, seed=1, device=device)
    m.model.cache_format = cache_format
    prefill, steps = split
    total = prefill + sum(steps)
    ids = m.ids(2, total, seed=2)
    full = m.model(input_ids=ids).logits
    out = m.model(input_ids=ids[:, :prefill], use_cache=True)
    cache = out.past_key_values
    assert cache.format == cache_format and cache.length == prefill
    got = [out.logits]
    pos = prefill
    for n in steps:
        out = m.model(input_ids=ids[:, pos:pos + n], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        got.append(out.logits)
        pos += n
    assert cache.length == total
    assert rel_err(np.concatenate(got, axis=1), full) <= TOL_F32


def test_cache_across_ring_chunk_boundary_matches_reference(device):
    m = make_model(dict(ring_attention_chunk_size=4), seed=3, device=device)
    ids = m.ids(1, 11, seed=4)
    ref, _ = m.ref(ids)
    out = m.model(input_ids=ids[:, :3], use_cache=True)
    logits = [out.logits]
    for i in range(3, 11):
        out = m.model(input_ids=ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    # the ring formulation's 1e-5 denominator term depends on the key count: stay within SPEC 8
    assert rel_err(np.concatenate(logits, axis=1), ref) <= TOL_F32


def test_left_padded_batch_with_cache_equals_rows_alone(device):
    m = make_model(MOE, seed=5, device=device)
    a = m.ids(1, 9, seed=6)[0]
    b = m.ids(1, 5, seed=7)[0]
    ids = np.stack([a, np.concatenate([np.zeros(4, np.int64), b])])
    mask = np.array([[1] * 9, [0] * 4 + [1] * 5])
    out = m.model(input_ids=ids, attention_mask=mask, use_cache=True)
    nxt = m.ids(2, 3, seed=8)
    steps = [out.logits[:, -1]]
    cur_mask = mask
    for i in range(3):
        cur_mask = np.concatenate([cur_mask, np.ones((2, 1), np.int64)], axis=1)
        out = m.model(input_ids=nxt[:, i:i + 1], attention_mask=cur_mask, past_key_values=out.past_key_values,
                      use_cache=True)
        steps.append(out.logits[:, -1])
    for row, seq in ((0, a), (1, b)):
        alone = m.model(input_ids=np.concatenate([seq, nxt[row]])[None]).logits[0]
        want = alone[len(seq) - 1:]
        got = np.stack([s[row] for s in steps])
        assert rel_err(got, want) <= TOL_F32


def test_cache_size_and_growth(device):
    m = make_model(dict(num_hidden_layers=3, kv_lora_rank=16, num_attention_heads=4, hidden_size=32), seed=0,
                   device=device)
    out = m.model(input_ids=m.ids(2, 7), use_cache=True)
    c = out.past_key_values
    assert c.bytes_per_token == 3 * 16 * 4            # L * r * float32
    assert c.nbytes == 2 * 7 * c.bytes_per_token
    kv = m.model.new_cache(2, "kv")
    assert kv.bytes_per_token == 3 * 2 * 4 * 8 * 4   # L * (K, V) * nkv * hd * float32
    for _ in range(300):                               # grows past its first 256-slot block
        out = m.model(input_ids=m.ids(2, 1), past_key_values=c, use_cache=True)
    assert c.length == 307 and c.get_seq_length() == 307


def test_cache_past_max_position_is_an_error(device):
    m = make_model(dict(max_position_embeddings=16), seed=0, device=device)
    out = m.model(input_ids=m.ids(1, 10), use_cache=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.model(input_ids=m.ids(1, 7), past_key_values=out.past_key_values, use_cache=True)
    assert out.past_key_values.length == 10  # a failed call leaves the cache as it was
    m.model(input_ids=m.ids(1, 6), past_key_values=out.past_key_values, use_cache=True)


def test_past_key_values_of_another_model_is_rejected():
    m1, m2 = make_model(seed=0), make_model(seed=1)
    out = m1.model(input_ids=m1.ids(1, 3), use_cache=True)
    with pytest.raises(ValueError, match="past_key_values"):
        m2.model(input_ids=m2.ids(1, 1), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="past_key_values"):
        m1.model(input_ids=m1.ids(1, 1), past_key_values=[("k", "v")])


# ---------------------------------------------------------------- generate

def test_greedy_reproduces_reference_checkpoint(tiny_ring_dir, tiny_ring_expected, device):
    model = xoron.MoELlamaForCausalLM.from_pretrained(tiny_ring_dir)
    prompt = tiny_ring_expected["greedy_prompt"]
    want = tiny_ring_expected["greedy_tokens"]
    for fmt in ("latent", "kv"):
        model.cache_format = fmt
        got = model.generate(prompt, max_new_tokens=want.shape[1] - prompt.shape[1], do_sample=False)
        np.testing.assert_array_equal(got, want)
    # top_k=1 sampling is greedy
    got = model.generate(prompt, max_new_tokens=want.shape[1] - prompt.shape[1], do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", [dict(), dict(num_key_value_heads=2, **MOE), dict(q_lora_rank=8)])
def test_greedy_equals_repeated_full_forward_argmax(case, device):
    m = make_model(case, seed=11, device=device)
    prompt = m.ids(1, 6, seed=12)
    got = m.model.generate(prompt, max_new_tokens=10, do_sample=False)
    want = R.greedy_generate(m.cfg, m.weights, prompt, 10)
    np.testing.assert_array_equal(got, want)


def test_seed_reproducibility(device):
    m = make_model(MOE, seed=2, boost=False, device=device)
    p = m.ids(2, 4, seed=1)
    a = m.model.generate(p, max_new_tokens=20, seed=7, top_k=0, top_p=1.0, temperature=5.0)
    b = m.model.generate(p, max_new_tokens=20, seed=7, top_k=0, top_p=1.0, temperature=5.0)
    np.testing.assert_array_equal(a, b)
    draws = {m.model.generate(p, max_new_tokens=20, top_k=0, top_p=1.0, temperature=5.0).tobytes() for _ in range(4)}
    assert len(draws) > 1  # without a seed, draws differ call to call


def test_padded_batch_generates_what_each_row_generates_alone(device):
    m = make_model(MOE, seed=21, device=device)
    a = m.ids(1, 7, seed=1)[0]
    b = m.ids(1, 3, seed=2)[0]
    ids = np.stack([a, np.concatenate([np.full(4, 5, np.int64), b])])
    mask = np.array([[1] * 7, [0] * 4 + [1] * 3])
    got = m.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone_a = m.model.generate(a[None], max_new_tokens=8, do_sample=False)
    alone_b = m.model.generate(b[None], max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(got[0, 7:], alone_a[0, 7:])
    np.testing.assert_array_equal(got[1, 7:], alone_b[0, 3:])


def test_eos_stops_and_pads_finished_rows(device):
    m = make_model(seed=4, device=device)
    p = m.ids(2, 3, seed=9)
    free = m.model.generate(p, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 4])  # row 0's second new token
    out = m.model.generate(p, max_new_tokens=6, do_sample=False, eos_token_id=[eos, 10**0 * 96], pad_token_id=1)
    row0 = list(out[0, 3:])
    k = row0.index(eos)
    assert all(t == 1 for t in row0[k + 1:])
    # stops early once every row is done
    out1 = m.model.generate(p[:1], max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert out1.shape[1] == 3 + row0.index(eos) + 1
    # min_new_tokens forbids EOS early
    out2 = m.model.generate(p[:1], max_new_tokens=6, do_sample=False, eos_token_id=eos, min_new_tokens=6)
    assert out2.shape[1] == 9 and eos not in list(out2[0, 3:])


def test_return_dict_scores_and_streaming(device):
    m = make_model(seed=8, device=device)
    p = m.ids(1, 4)
    res = m.model.generate(p, max_new_tokens=5, do_sample=True, top_k=3, top_p=1.0, seed=1, return_dict_in_generate=True,
                           output_scores=True)
    assert res.sequences.shape == (1, 9) and len(res.scores) == 5
    for step, s in enumerate(res.scores):
        assert s.shape == (1, 97)
        assert np.isfinite(s).sum() == 3                 # top_k removed the rest (-inf)
        assert np.isfinite(s[0, res.sequences[0, 4 + step]])

    class Rec:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, ids):
            self.puts.append(np.asarray(ids).copy())

        def end(self):
            self.ended = True

    rec = Rec()
    seq = m.model.generate(p, max_new_tokens=5, do_sample=False, streamer=rec)
    assert rec.ended and len(rec.puts) == 6
    np.testing.assert_array_equal(rec.puts[0], p)
    assert [int(x[0]) for x in rec.puts[1:]] == list(seq[0, 4:])
    assert list(m.model.generate_stream(p, max_new_tokens=5, do_sample=False)) == list(seq[0, 4:])

    class Boom:
        def put(self, ids):
            raise KeyError("stop here")

        def end(self):
            pass

    with pytest.raises(KeyError, match="stop here"):
        m.model.generate(p, max_new_tokens=5, streamer=Boom())


def test_repetition_penalty_changes_greedy_choice(device):
    m = make_model(seed=8, device=device)
    p = m.ids(1, 4)
    plain = m.model.generate(p, max_new_tokens=12, do_sample=False)
    pen = m.model.generate(p, max_new_tokens=12, do_sample=False, repetition_penalty=1e6)
    new = list(pen[0, 4:])
    seen = set(p[0])
    assert all(t not in seen for t in new[:1])
    assert len(set(new)) == len(new) or not np.array_equal(plain, pen)


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=-1), r"max_new_tokens must be >= 0 \(got -1\)"),
    (dict(temperature=0.0, do_sample=True), r"temperature must be > 0 when sampling \(got 0\)"),
    (dict(temperature=-1.0, do_sample=True), r"temperature must be > 0 when sampling \(got -1\)"),
    (dict(temperature=float("inf"), do_sample=True), "temperature must be finite"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] \(got 0\)"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] \(got 1.5\)"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), r"top_k must be >= 0 \(got -1\)"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0 \(got 0\)"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(max_new_tokens=200), "max_position_embeddings"),
    (dict(attention_mask=np.ones((1, 3), np.int64)), "attention_mask"),
    (dict(attention_mask=np.full((1, 4), 2)), "attention_mask"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(eos_token_id=10**6, max_new_tokens=4), "eos_token_id"),
])
def test_generate_bad_arguments(kw, match):
    m = make_model(dict(max_position_embeddings=64), seed=0)
    with pytest.raises(ValueError, match=match):
        m.model.generate(m.ids(1, 4), **kw)


def test_generate_bad_prompt():
    m = make_model(seed=0)
    with pytest.raises(ValueError, match="empty"):
        m.model.generate(np.zeros((1, 0), np.int64))
    with pytest.raises(ValueError, match="token id"):
        m.model.generate(np.array([[1, 500]]))


# ---------------------------------------------------------------- the sampler itself

LOGITS = np.log(np.array([0.05, 0.30, 0.10, 0.25, 0.02, 0.18, 0.10], np.float32))


def kept(**kw):
    processed, _ = _C.sample_tokens(LOGITS, 1, True, kw.get("temperature", 1.0), kw.get("top_k", 0),
                                    kw.get("top_p", 1.0), 0)
    return set(np.flatnonzero(np.isfinite(processed)))


def test_filter_kept_sets():
    assert kept(top_k=1) == {1}
    assert kept(top_k=3) == {1, 3, 5}
    # descending: 0.30 (1), 0.25 (3), 0.18 (5), 0.10 (2), 0.10 (6), 0.05, 0.02
    assert kept(top_p=0.29) == {1}              # the top-1 alone crosses it
    assert kept(top_p=0.31) == {1, 3}           # keep the token that crosses top_p
    assert kept(top_p=0.60) == {1, 3, 5}
    assert kept(top_p=0.80) == {1, 3, 5, 2}     # ties: the lower index first
    assert kept(top_k=2, top_p=0.99) == {1, 3}  # top-k before nucleus
    # the reference filter agrees
    for kw in (dict(top_k=3), dict(top_p=0.6), dict(top_k=4, top_p=0.7), dict(temperature=0.5, top_p=0.5)):
        probs = R.sample_filter(LOGITS.astype(np.float64), kw.get("temperature", 1.0), kw.get("top_k", 0),
                                kw.get("top_p", 1.0))
        assert set(np.flatnonzero(probs > 0)) == kept(**kw)


def test_sampled_frequencies_follow_filtered_distribution():
    draws = 20000
    for kw in (dict(), dict(top_k=3), dict(top_p=0.6, temperature=0.7)):
        _, toks = _C.sample_tokens(LOGITS, draws, True, kw.get("temperature", 1.0), kw.get("top_k", 0),
                                   kw.get("top_p", 1.0), 123)
        probs = R.sample_filter(LOGITS.astype(np.float64), kw.get("temperature", 1.0), kw.get("top_k", 0),
                                kw.get("top_p", 1.0))
        counts = np.bincount(toks, minlength=len(LOGITS))
        assert counts[probs == 0].sum() == 0
        expected = probs[probs > 0] * draws
        chi2 = float((((counts[probs > 0] - expected) ** 2) / expected).sum())
        # 99.9% quantile of chi-square with <= 6 degrees of freedom is 22.5
        assert chi2 < 22.5, (kw, chi2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cache_format, per_token", [("latent", 3 * 16 * 2),       # L * r * 16-bit
                                                     ("kv", 3 * 2 * 4 * 8 * 2)])   # L * (K, V) * nkv * hd * 16-bit
def test_16bit_model_keeps_its_cache_in_its_dtype(cache_format, per_token, dtype):
    m = make_model(MOE, seed=1, dtype=dtype)
    ids = m.ids(2, 12, seed=3)
    full = m.model(input_ids=ids).logits
    out = m.model(input_ids=ids[:, :5], past_key_values=m.model.new_cache(2, cache_format), use_cache=True)
    got = [out.logits]
    for i in range(5, 12):
        out = m.model(input_ids=ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        got.append(out.logits)
    cache = out.past_key_values
    assert cache.format == cache_format
    assert cache.bytes_per_token == per_token
    assert rel_err(np.concatenate(got, axis=1), full) <= 3e-2
    assert rel_err(full, m.ref(ids)[0]) <= 3e-2


def test_bfloat16_kv_cache_across_key_chunks():
    """600 cached bf16 keys: the CPU attention widens K and V one 256-key chunk at a time."""
    m = make_model(MOE, seed=2, dtype="bfloat16")
    ids = m.ids(1, 603, seed=4)
    full = m.model(input_ids=ids, logits_to_keep=3).logits
    out = m.model(input_ids=ids[:, :600], past_key_values=m.model.new_cache(1, "kv"), use_cache=True, logits_to_keep=1)
    got = []
    for i in range(600, 603):
        out = m.model(input_ids=ids[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        got.append(out.logits)
    assert rel_err(np.concatenate(got, axis=1), full) <= 3e-2


def test_float32_and_int8_models_keep_a_float32_cache():
    for dtype in ("float32", "int8"):
        m = make_model(MOE, seed=1, dtype=dtype)
        assert m.model.new_cache(1, "kv").bytes_per_token == 3 * 2 * 4 * 8 * 4
        assert m.model.new_cache(1, "latent").bytes_per_token == 3 * 16 * 4


def test_greedy_generate_with_a_large_batch(device):
    m = make_model(seed=3, device=device)
    p = m.ids(40, 3, seed=5)
    got = m.model.generate(p, max_new_tokens=3, do_sample=False)
    for r in (0, 17, 39):
        np.testing.assert_array_equal(got[r], m.model.generate(p[r:r + 1], max_new_tokens=3, do_sample=False)[0])
