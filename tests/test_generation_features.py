"""generate() features as transformers users call them (issue 11 items 4 and 7), each checked
against a plain Python loop over model.forward."""
import numpy as np
import pytest
from conftest import make_model

V = 97  # conftest.SMALL


def last_logits(model, seq, **kw):
    return model(input_ids=np.asarray([seq]), **kw).logits[0, -1].astype(np.float64)


def greedy_ref(model, prompt, n, ban=lambda seq, z: None, eos=None):
    """Greedy decoding over full forwards; ban(seq, z) may set entries of z to -inf."""
    seq = list(prompt)
    for _ in range(n):
        z = last_logits(model, seq)
        ban(seq, z)
        tok = int(np.argmax(z))
        seq.append(tok)
        if tok == eos:
            break
    return seq


@pytest.fixture(scope="module")
def tiny():
    return make_model(seed=8)


# ---------------------------------------------------------------- lengths and generation_config

def test_max_length_counts_the_prompt_and_max_new_tokens_wins(tiny):
    p = tiny.ids(1, 4)
    assert tiny.model.generate(p, max_length=9, do_sample=False).shape == (1, 9)
    assert tiny.model.generate(p, max_length=20, max_new_tokens=3, do_sample=False).shape == (1, 7)
    with pytest.raises(ValueError, match="max_length"):
        tiny.model.generate(p, max_length=4)


def test_generation_config_dict_and_explicit_keywords_win(tiny):
    p = tiny.ids(1, 4)
    want = tiny.model.generate(p, max_new_tokens=4, do_sample=False)
    got = tiny.model.generate(p, generation_config={"max_new_tokens": 4, "do_sample": False, "typical_p": 1.0})
    np.testing.assert_array_equal(got, want)
    assert tiny.model.generate(p, generation_config={"max_new_tokens": 4, "do_sample": False},
                               max_new_tokens=2).shape == (1, 6)
    with pytest.raises(TypeError, match="not_a_field"):
        tiny.model.generate(p, generation_config={"not_a_field": 1})
    with pytest.raises(ValueError, match="typical_p"):
        tiny.model.generate(p, generation_config={"typical_p": 0.5})
    with pytest.raises(TypeError, match="generation_config"):
        tiny.model.generate(p, generation_config=[("max_new_tokens", 3)])


def test_transformers_generation_config(tiny):
    transformers = pytest.importorskip("transformers")
    p = tiny.ids(1, 4)
    gc = transformers.GenerationConfig(max_new_tokens=5, do_sample=False, no_repeat_ngram_size=2)
    want = tiny.model.generate(p, max_new_tokens=5, do_sample=False, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(tiny.model.generate(p, generation_config=gc), want)
    with pytest.raises(ValueError, match="penalty_alpha"):
        tiny.model.generate(p, generation_config=transformers.GenerationConfig(penalty_alpha=0.6, top_k=4))


def test_num_return_sequences_repeats_each_prompt(tiny):
    p = tiny.ids(2, 4, seed=3)
    got = tiny.model.generate(p, max_new_tokens=6, num_return_sequences=3, seed=5, top_k=0, top_p=1.0,
                              temperature=20.0)
    assert got.shape == (6, 10)
    np.testing.assert_array_equal(got[:, :4], np.repeat(p, 3, axis=0))
    want = tiny.model.generate(np.repeat(p, 3, axis=0), max_new_tokens=6, seed=5, top_k=0, top_p=1.0,
                               temperature=20.0)
    np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in got[:3, 4:]}) > 1  # the copies are sampled independently
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny.model.generate(p, num_return_sequences=2, do_sample=False)


# ---------------------------------------------------------------- processors

def test_min_p_keeps_the_tokens_above_its_share_of_the_top_probability(tiny):
    p = tiny.ids(1, 4)
    res = tiny.model.generate(p, max_new_tokens=5, top_k=0, top_p=1.0, min_p=0.3, seed=2,
                              return_dict_in_generate=True, output_scores=True, output_logits=True)
    for step, (sc, raw) in enumerate(zip(res.scores, res.logits)):
        z = last_logits(tiny.model, res.sequences[0, :4 + step])
        np.testing.assert_allclose(raw[0], z, rtol=1e-4, atol=1e-4)  # output_logits: the raw logits
        prob = np.exp(z - z.max())
        keep = np.isfinite(sc[0])
        assert keep[np.argmax(z)] and keep[res.sequences[0, 4 + step]]
        clear = np.abs(prob - 0.3) > 1e-4
        np.testing.assert_array_equal(keep[clear], (prob >= 0.3)[clear])
    with pytest.raises(ValueError, match="min_p"):
        tiny.model.generate(p, min_p=1.5)


def test_no_repeat_ngram_size_equals_reference(tiny):
    p = tiny.ids(1, 5, seed=4)

    def ban(seq, z, n=2):
        for i in range(len(seq) - n + 1):
            if seq[i:i + n - 1] == seq[len(seq) - n + 1:]:
                z[seq[i + n - 1]] = -np.inf

    got = tiny.model.generate(p, max_new_tokens=14, do_sample=False, no_repeat_ngram_size=2)
    assert list(got[0]) == greedy_ref(tiny.model, list(p[0]), 14, ban)
    pairs = list(zip(got[0][:-1], got[0][1:]))
    assert len(pairs) == len(set(pairs))
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        tiny.model.generate(p, no_repeat_ngram_size=-1)


def test_bad_words_ids_equals_reference(tiny):
    p = tiny.ids(1, 5, seed=4)
    plain = list(tiny.model.generate(p, max_new_tokens=10, do_sample=False)[0, 5:])
    bad = [[plain[0]], [plain[2], plain[3]]]  # one id always banned, a pair banned after its first id

    def ban(seq, z):
        for w in bad:
            if seq[len(seq) - len(w) + 1:] == w[:-1] or len(w) == 1:
                z[w[-1]] = -np.inf

    got = tiny.model.generate(p, max_new_tokens=10, do_sample=False, bad_words_ids=bad)
    assert list(got[0]) == greedy_ref(tiny.model, list(p[0]), 10, ban)
    assert plain[0] not in list(got[0, 5:])
    for bad_arg, match in ((5, "list of token-id lists"), ([[]], "empty"), ([[V + 3]], "vocab_size")):
        with pytest.raises(ValueError, match=match):
            tiny.model.generate(p, bad_words_ids=bad_arg)


def test_logits_processor_runs_between_the_penalties_and_the_filters(tiny):
    p = tiny.ids(1, 5, seed=4)
    plain = list(tiny.model.generate(p, max_new_tokens=8, do_sample=False)[0, 5:])
    seen = []

    def forbid(ids, scores):
        seen.append(ids.shape)
        scores = scores.copy()
        scores[:, plain[1]] = -np.inf
        return scores

    got = tiny.model.generate(p, max_new_tokens=8, do_sample=False, logits_processor=[forbid])

    def ban(seq, z):
        z[plain[1]] = -np.inf

    assert list(got[0]) == greedy_ref(tiny.model, list(p[0]), 8, ban)
    assert seen == [(1, 5 + i) for i in range(8)]
    with pytest.raises(ValueError, match="shape"):
        tiny.model.generate(p, max_new_tokens=2, logits_processor=lambda ids, s: s[:, :3])
    with pytest.raises(ZeroDivisionError):
        tiny.model.generate(p, max_new_tokens=2, logits_processor=lambda ids, s: 1 / 0)
    with pytest.raises(TypeError, match="logits_processor"):
        tiny.model.generate(p, logits_processor=[3])


def test_sampling_with_a_processor_is_reproducible(tiny):
    p = tiny.ids(2, 4, seed=9)
    kw = dict(max_new_tokens=6, seed=11, logits_processor=lambda ids, s: s * 0.5)
    np.testing.assert_array_equal(tiny.model.generate(p, **kw), tiny.model.generate(p, **kw))


# ---------------------------------------------------------------- stopping

def test_stopping_criteria_stop_rows(tiny):
    p = tiny.ids(2, 4, seed=1)
    full = tiny.model.generate(p, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)
    got = tiny.model.generate(p, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0,
                              stopping_criteria=[lambda ids, s: ids.shape[1] >= 7])
    np.testing.assert_array_equal(got, full[:, :7])
    row0 = tiny.model.generate(p, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0,
                               stopping_criteria=lambda ids, s: np.array([ids.shape[1] >= 6, False]))
    np.testing.assert_array_equal(row0[1], full[1])
    np.testing.assert_array_equal(row0[0, :6], full[0, :6])
    assert (row0[0, 6:] == 0).all()
    with pytest.raises(ValueError, match="flags"):
        tiny.model.generate(p, max_new_tokens=3, stopping_criteria=lambda ids, s: np.ones(5, bool))


class ByteTokenizer:
    """Token i is the i-th piece below; some tokens are halves of a two-byte character."""

    def __init__(self):
        e_acute = "é".encode()
        self.pieces = [bytes([97 + i % 26]) for i in range(V)]
        self.pieces[10], self.pieces[11] = e_acute[:1], e_acute[1:]

    def token_bytes(self, i):
        return self.pieces[i]

    def __len__(self):
        return len(self.pieces)


def test_stop_strings_match_text_across_tokens(tiny):
    tok = ByteTokenizer()
    p = tiny.ids(1, 4, seed=2)
    full = list(tiny.model.generate(p, max_new_tokens=12, do_sample=False, eos_token_id=[])[0])
    text = b"".join(tok.token_bytes(i) for i in full[4:])
    head = b"".join(tok.token_bytes(i) for i in full[:4])
    stop = text[3:5].decode()  # ends at generated token 5 (one byte per token here); it may span the prompt
    first = next(i for i in range(1, len(text) + 1) if (head + text[:i]).endswith(text[3:5]))
    got = tiny.model.generate(p, max_new_tokens=12, do_sample=False, eos_token_id=[], stop_strings=[stop],
                              tokenizer=tok)
    assert list(got[0]) == full[:4 + first]
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.model.generate(p, stop_strings="ab")
    with pytest.raises(ValueError, match="stop_strings"):
        tiny.model.generate(p, stop_strings=[""], tokenizer=tok)


def test_stop_string_of_a_character_split_across_two_tokens():
    m = make_model(seed=8)
    tok = ByteTokenizer()
    p = m.ids(1, 3, seed=2)

    def steer(ids, scores):  # make the model write "xé" : x, then the two halves of é
        scores = np.full_like(scores, -1e9)
        want = {3: 23, 4: 10, 5: 11}.get(ids.shape[1], 0)
        scores[:, want] = 0.0
        return scores

    got = m.model.generate(p, max_new_tokens=8, do_sample=False, eos_token_id=[], logits_processor=steer,
                           stop_strings="é", tokenizer=tok)
    assert list(got[0, 3:]) == [23, 10, 11]


# ---------------------------------------------------------------- prompts: a cache, embeddings

def test_past_key_values_continues_a_forward_cache(tiny):
    ids = tiny.ids(2, 9, seed=6)
    want = tiny.model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=[])
    cache = tiny.model(input_ids=ids[:, :6], use_cache=True).past_key_values
    res = tiny.model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, eos_token_id=[],
                              return_dict_in_generate=True)
    np.testing.assert_array_equal(res.sequences, want)
    assert res.past_key_values is cache and cache.length == 9 + 5 - 1  # the last token is never fed back
    nxt = tiny.model(input_ids=want[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    full = tiny.model(input_ids=want).logits[:, -1]
    np.testing.assert_allclose(nxt, full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least one more"):
        tiny.model.generate(want[:, :3], past_key_values=cache)


def test_inputs_embeds_prompt_optionally_followed_by_ids(tiny):
    ids = tiny.ids(1, 7, seed=7)
    table = tiny.model.state_dict()["model.embed_tokens.weight"]
    want = tiny.model.generate(ids, max_new_tokens=5, do_sample=False)
    only = tiny.model.generate(inputs_embeds=table[ids], max_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(only, want[:, 7:])  # no ids given: the new tokens alone, as transformers
    mixed = tiny.model.generate(ids[:, 4:], inputs_embeds=table[ids[:, :4]], max_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(mixed, want[:, 4:])
    pad = np.concatenate([np.zeros((1, 2, table.shape[1]), np.float32), table[ids]], axis=1)
    masked = tiny.model.generate(inputs_embeds=pad, attention_mask=np.array([[0, 0] + [1] * 7]), max_new_tokens=5,
                                 do_sample=False)
    np.testing.assert_array_equal(masked, want[:, 7:])
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny.model.generate(inputs_embeds=table[ids][0])
    with pytest.raises(ValueError, match="attention_mask"):
        tiny.model.generate(inputs_embeds=table[ids], attention_mask=np.ones((1, 3)))


# ---------------------------------------------------------------- beam search

def beam_ref(model, prompt, nb, max_new, eos, lp=1.0, early=False, num_return=1, pad=0):
    """transformers' BeamSearchScorer over full forwards, one prompt row."""
    t0 = len(prompt)
    beams = [(list(prompt), 0.0 if j == 0 else -1e9) for j in range(nb)]
    hyps, worst, done = [], 1e9, False

    def add(tokens, total, gen_len):
        nonlocal worst
        score = total / gen_len ** lp
        if len(hyps) < nb or score > worst:
            hyps.append((score, tokens))
            if len(hyps) > nb:
                order = sorted((s, i) for i, (s, _) in enumerate(hyps))
                del hyps[order[0][1]]
                worst = order[1][0]
            else:
                worst = min(score, worst)

    steps = 0
    for step in range(max_new):
        cand = []
        for j, (seq, bs) in enumerate(beams):
            z = last_logits(model, seq)
            logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            cand += [(logp[v] + bs, j * V + v) for v in range(V)]
        cand.sort(key=lambda c: (-c[0], c[1]))
        nxt = []
        for rank, (score, idx) in enumerate(cand[:2 * nb]):
            j, tok = divmod(idx, V)
            if tok == eos:
                if rank < nb:
                    add(beams[j][0][t0:], score, step + 1)
                continue
            nxt.append((beams[j][0] + [tok], score))
            if len(nxt) == nb:
                break
        best = cand[0][0]
        if len(hyps) >= nb:
            if early is True:
                done = True
            else:
                n = max_new if early == "never" and lp > 0 else step + 1
                done = worst >= best / n ** lp
        beams = nxt
        steps = step + 1
        if done:
            break
    if not done:
        for seq, score in beams:
            add(seq[t0:], score, steps)
    chosen = sorted(hyps, key=lambda h: h[0])[::-1][:num_return]
    width = min(max(len(h[1]) for h in chosen) + 1, max_new)
    rows = []
    for score, toks in chosen:
        row = list(prompt) + toks + [pad] * (width - len(toks))
        if len(toks) < width:
            row[t0 + len(toks)] = eos
        rows.append(row)
    return rows, [h[0] for h in chosen]


@pytest.mark.parametrize("kw", [
    dict(nb=3, lp=1.0, early=False, num_return=1),
    dict(nb=4, lp=0.5, early=True, num_return=2),
    dict(nb=2, lp=2.0, early="never", num_return=2, cache_format="kv"),
])
def test_beam_search_equals_reference(kw):
    m = make_model(dict(num_experts=4, use_moe=True, num_hidden_layers=3), seed=2)
    m.model.cache_format = kw.get("cache_format", "latent")
    p = m.ids(2, 4, seed=5)
    plain = m.model.generate(p[:1], max_new_tokens=6, do_sample=False)
    eos = int(plain[0, 6])  # a token the beams are likely to meet
    res = m.model.generate(p, max_new_tokens=6, num_beams=kw["nb"], length_penalty=kw["lp"],
                           early_stopping=kw["early"], num_return_sequences=kw["num_return"], eos_token_id=eos,
                           pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    rows, scores = [], []
    for r in range(2):
        rr, ss = beam_ref(m.model, list(p[r]), kw["nb"], 6, eos, kw["lp"], kw["early"], kw["num_return"])
        rows += rr
        scores += ss
    width = max(len(r) for r in rows)
    want = np.array([r + [0] * (width - len(r)) for r in rows])
    np.testing.assert_array_equal(res.sequences, want)
    np.testing.assert_allclose(res.sequences_scores, scores, rtol=1e-4, atol=1e-4)
    assert res.scores[0].shape == (2 * kw["nb"], V)


def test_beam_search_bad_arguments(tiny):
    p = tiny.ids(1, 4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny.model.generate(p, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match=r"beam sampling is not supported: give do_sample=False with num_beams > 1"):
        tiny.model.generate(p, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="streamer"):
        tiny.model.generate(p, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match="early_stopping"):
        tiny.model.generate(p, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams"):
        tiny.model.generate(p, num_beams=0)


# ---------------------------------------------------------------- streaming cadence

def test_streamer_gets_each_token_as_it_is_made_on_the_cpu(tiny):
    """The streamer raises at the second new token; the cache passed in shows how many decode
    steps had run by then: one, not a burst."""
    ids = tiny.ids(1, 6, seed=3)

    class StopAtSecond:
        def __init__(self):
            self.n = 0

        def put(self, ids):
            self.n += 1
            if self.n == 3:  # the prompt, the first new token, the second
                raise KeyError("enough")

        def end(self):
            pass

    cache = tiny.model(input_ids=ids[:, :5], use_cache=True).past_key_values
    with pytest.raises(KeyError):
        tiny.model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False, eos_token_id=[],
                            streamer=StopAtSecond())
    assert cache.length == 6 + 1
