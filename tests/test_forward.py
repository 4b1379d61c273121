"""The engine's float32 forward pass, on every device, against the float64 numpy oracle
(SPEC sections 3-8)."""
import os

import numpy as np
import pytest

from conftest import TOL_F32, make_model, rel_err

import xoron

MOE = {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2, "moe_layer_freq": 2,
       "moe_intermediate_size": 40}

# name -> (config overrides on SMALL, batch, tokens, first position id or None for the default)
CASES = {
    "dense_tied": ({}, 1, 12, None),
    "dense_untied": ({"tie_word_embeddings": False}, 1, 12, None),
    "gqa_nkv2": ({"num_key_value_heads": 2}, 2, 12, None),
    "gqa_nkv1": ({"num_key_value_heads": 1, "num_attention_heads": 8, "hidden_size": 64}, 1, 10, None),
    "q_lora": ({"q_lora_rank": 8}, 1, 12, None),
    "q_lora_gqa_untied": ({"q_lora_rank": 24, "num_key_value_heads": 2, "tie_word_embeddings": False}, 2, 9, None),
    "moe_freq1": (dict(MOE, moe_layer_freq=1), 2, 12, None),
    "moe_freq2": (dict(MOE, moe_layer_freq=2, num_hidden_layers=4), 1, 14, None),
    "moe_freq3": (dict(MOE, moe_layer_freq=3, num_hidden_layers=3), 1, 12, None),
    "moe_top1_of3": (dict(MOE, num_experts=3, num_experts_per_tok=1, moe_layer_freq=1), 2, 11, None),
    "moe_topk_eq_e": (dict(MOE, num_experts=2, num_experts_per_tok=2, moe_layer_freq=1), 1, 8, None),
    "moe_many_experts": (dict(MOE, num_experts=8, num_experts_per_tok=3, moe_layer_freq=1,
                              moe_intermediate_size=24), 2, 20, None),
    "ring_chunk4": ({"ring_attention_chunk_size": 4}, 1, 40, None),
    "ring_chunk16": ({"ring_attention_chunk_size": 16}, 2, 40, None),
    "ring_chunk16_moe": (dict(MOE, ring_attention_chunk_size=16), 1, 40, None),
    "no_ring_chunk4": ({"use_ring_attention": False, "ring_attention_chunk_size": 4}, 1, 40, None),
    "no_ring_chunk16": ({"use_ring_attention": False, "ring_attention_chunk_size": 16}, 2, 40, None),
    "kv_lora_above_hidden": ({"kv_lora_rank": 80}, 1, 12, None),
    "kv_lora_below_hidden": ({"kv_lora_rank": 4}, 1, 12, None),
    "pos_beyond_8192": ({}, 2, 12, 9000),
    "pos_beyond_100000": ({"ring_attention_chunk_size": 4}, 1, 16, 100_000),
    "pos_near_max": ({}, 1, 8, 131072 - 8),
    "batch4": (dict(MOE, num_key_value_heads=2), 4, 10, None),
    "theta10000_eps1e-5": ({"rope_theta": 10000.0, "rms_norm_eps": 1e-5}, 1, 12, None),
    "maxpos_8192_no_yarn": ({"max_position_embeddings": 8192}, 1, 12, None),
    "maxpos_2048_s_below_1": ({"max_position_embeddings": 2048}, 1, 12, 1000),
    "head_dim_2": ({"num_attention_heads": 16, "num_key_value_heads": 4}, 1, 9, None),
    "single_token": ({}, 3, 1, None),
    "keys_across_key_blocks": ({}, 2, 301, None),  # the CPU's key chunks of 256, query tiles of 4 and a row left over
    "long_seq_chunk64": (dict(MOE, moe_layer_freq=1, num_experts=8, num_key_value_heads=2,
                              ring_attention_chunk_size=64), 3, 200, None),
    "everything": (dict(MOE, num_key_value_heads=2, q_lora_rank=12, tie_word_embeddings=False,
                        ring_attention_chunk_size=8, kv_lora_rank=40, num_hidden_layers=3), 2, 30, 9000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_random_config_matches_reference(name, device):
    overrides, b, t, pos0 = CASES[name]
    m = make_model(overrides, seed=list(CASES).index(name), device=device)
    ids = m.ids(b, t, seed=1)
    labels = m.ids(b, t, seed=2)
    pos = None if pos0 is None else np.broadcast_to(pos0 + np.arange(t), (b, t)).copy()
    ref_logits, ref_loss = m.ref(ids, position_ids=pos, labels=labels)
    out = m.model(input_ids=ids, position_ids=pos, labels=labels)
    assert out.logits.shape == (b, t, m.cfg.vocab_size)
    assert out.logits.dtype == np.float32
    assert rel_err(out.logits, ref_logits) <= TOL_F32
    assert abs(float(out.loss) - ref_loss) <= TOL_F32


def test_routing_really_differs_between_tokens():
    """Guards the MoE cases above against a degenerate router (all tokens to one expert)."""
    m = make_model(dict(MOE, moe_layer_freq=1), seed=5)
    ids = m.ids(1, 40, seed=3)
    h = np.asarray(m.weights["model.embed_tokens.weight"], np.float64)[ids[0]]
    import reference_impl as R
    route = R._route(m.cfg, {k: v.astype(np.float64) for k, v in m.weights.items()}, "model.layers.0.mlp.", h)
    chosen = {tuple(np.flatnonzero(r)) for r in route}
    assert len(chosen) > 2


def test_default_positions_equal_explicit_arange(device):
    m = make_model(seed=1, device=device)
    ids = m.ids(2, 10)
    a = m.model(ids).logits
    b = m.model(ids, position_ids=np.broadcast_to(np.arange(10), (2, 10))).logits
    np.testing.assert_array_equal(a, b)


def test_position_ids_broadcast_from_one_row(device):
    m = make_model(seed=1, device=device)
    ids = m.ids(2, 10)
    pos = 500 + np.arange(10)[None]
    got = m.model(ids, position_ids=pos).logits
    ref, _ = m.ref(ids, position_ids=np.broadcast_to(pos, (2, 10)))
    assert rel_err(got, ref) <= TOL_F32


# ---------------------------------------------------------------- attention_mask

def left_padded_logits(m, t, pads, seed):
    """A batch of t-token rows, row r left-padded by pads[r] (pad id 0, mask 0): (ids, the engine's
    logits), checked against the oracle at the kept positions."""
    ids = m.ids(len(pads), t, seed=seed)
    mask = np.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
        ids[r, :p] = 0  # pad token id
    ref, _ = m.ref(ids, attention_mask=mask)
    got = m.model(ids, attention_mask=mask).logits
    keep = mask.astype(bool)
    assert rel_err(got[keep], ref[keep]) <= TOL_F32
    return ids, got


@pytest.mark.parametrize("overrides", [
    {},
    {"ring_attention_chunk_size": 4},
    {"use_ring_attention": False, "ring_attention_chunk_size": 4},
    dict(MOE, num_key_value_heads=2, q_lora_rank=8),
], ids=["plain", "ring4", "noring4", "moe_gqa_qlora"])
def test_left_padded_batch(overrides, device):
    m = make_model(overrides, seed=7, device=device)
    pads = [0, 3, 9]
    ids, got = left_padded_logits(m, 14, pads, seed=4)
    # each row equals that row run alone without its padding
    for r, p in enumerate(pads):
        alone = m.model(ids[r:r + 1, p:]).logits[0]
        assert rel_err(got[r, p:], alone) <= TOL_F32
        alone_ref, _ = m.ref(ids[r:r + 1, p:])
        assert rel_err(alone, alone_ref[0]) <= TOL_F32


def test_left_padding_across_key_blocks(device):
    """Padding that covers a whole block of keys (256 on the CPU) for one row and part of one for
    another, queries in whole tiles and one left over."""
    left_padded_logits(make_model(seed=9, device=device), 293, [0, 5, 261], seed=6)


def test_non_finite_masked_positions_do_not_reach_the_others(device):
    """NaN embeddings at masked (padded) positions leave the other positions as they are with
    finite values there, in a prompt long enough for the CPU's tiles of query rows."""
    m = make_model(seed=10, device=device)
    t, pads = 21, 5
    ids = m.ids(1, t, seed=5)
    mask = np.ones_like(ids)
    mask[0, :pads] = 0
    emb = m.weights["model.embed_tokens.weight"][ids].astype(np.float32)
    clean = m.model(inputs_embeds=emb, attention_mask=mask).logits
    emb[0, :pads] = np.nan
    got = m.model(inputs_embeds=emb, attention_mask=mask).logits
    assert np.isfinite(got[0, pads:]).all()
    assert rel_err(got[0, pads:], clean[0, pads:]) <= 1e-5  # another kernel may take the chunk: rounding only


@pytest.mark.parametrize("overrides", [{}, {"ring_attention_chunk_size": 4}], ids=["plain", "ring4"])
def test_other_mask_patterns(overrides, device):
    """Right padding, holes, a row of pads only, a row with only its last token: no NaN, and
    every position whose mask is 1 matches the oracle (default and explicit positions)."""
    m = make_model(dict(overrides, **MOE), seed=8, device=device)
    ids = m.ids(4, 12, seed=3)
    mask = np.ones_like(ids)
    mask[0] = 0
    mask[1, 8:] = 0
    mask[2, 3:6] = 0
    mask[3, :11] = 0
    keep = mask.astype(bool)
    for pos in (None, np.broadcast_to(np.arange(12), (4, 12))):
        got = m.model(ids, attention_mask=mask, position_ids=pos).logits
        assert np.isfinite(got).all()
        ref, _ = m.ref(ids, attention_mask=mask, position_ids=pos)
        assert rel_err(got[keep], ref[keep]) <= TOL_F32


def test_all_ones_mask_changes_nothing(device):
    m = make_model(seed=2, device=device)
    ids = m.ids(2, 9)
    a = m.model(ids).logits
    b = m.model(ids, attention_mask=np.ones_like(ids)).logits
    assert rel_err(b, a) <= 1e-6


def test_mask_as_bool_and_list(device):
    m = make_model(seed=2, device=device)
    ids = m.ids(1, 6)
    mask = [[0, 0, 1, 1, 1, 1]]
    a = m.model(ids, attention_mask=np.array(mask, dtype=bool)).logits
    b = m.model(ids.tolist(), attention_mask=mask).logits
    np.testing.assert_array_equal(a[:, 2:], b[:, 2:])


# ---------------------------------------------------------------- loss

def test_labels_with_ignored_positions(device):
    m = make_model(seed=3, device=device)
    ids = m.ids(2, 12)
    labels = ids.copy()
    labels[0, :5] = -100
    labels[1, 7:] = -100
    ref_logits, ref_loss = m.ref(ids, labels=labels)
    out = m.model(ids, labels=labels)
    assert abs(float(out.loss) - ref_loss) <= TOL_F32
    # only the shifted positions matter: changing labels[:, 0] changes nothing
    labels2 = labels.copy()
    labels2[:, 0] = 5
    assert float(m.model(ids, labels=labels2).loss) == pytest.approx(float(out.loss), abs=1e-7)


def test_all_labels_ignored_gives_zero_loss(device):
    m = make_model(seed=3, device=device)
    ids = m.ids(2, 8)
    labels = np.full_like(ids, -100)
    labels[:, 0] = 3  # position 0 is never a target after the shift
    out = m.model(ids, labels=labels)
    assert float(out.loss) == 0.0
    assert np.isfinite(out.logits).all()


def test_single_token_loss_is_zero(device):
    m = make_model(seed=3, device=device)
    ids = m.ids(1, 1)
    assert float(m.model(ids, labels=ids).loss) == 0.0


def test_loss_clamped_at_100(device):
    m = make_model({"tie_word_embeddings": False}, seed=3, device=device)
    sd = dict(m.weights)
    sd["lm_head.weight"] = sd["lm_head.weight"] * 1e4  # absurdly confident logits
    m.model.load_state_dict(sd)
    ids = m.ids(1, 10)
    logits = m.model(ids).logits
    worst = np.argmin(logits[0, :-1], axis=-1)
    labels = np.concatenate([[0], worst])[None]
    assert float(m.model(ids, labels=labels).loss) == 100.0


def test_loss_without_labels_is_none(device):
    m = make_model(seed=3, device=device)
    assert m.model(m.ids(1, 4)).loss is None


# ---------------------------------------------------------------- hidden states, embeddings

@pytest.mark.parametrize("overrides", [{}, dict(MOE, num_hidden_layers=3, moe_layer_freq=1)], ids=["dense", "moe"])
def test_output_hidden_states(overrides, device):
    import reference_impl as R
    m = make_model(overrides, seed=11, device=device)
    ids = m.ids(2, 10)
    out = m.model(ids, output_hidden_states=True)
    ref = R.forward_hidden(m.cfg, m.weights, ids)
    L = m.cfg.num_hidden_layers
    assert len(out.hidden_states) == L + 1 == len(ref)
    for i, (h, r) in enumerate(zip(out.hidden_states, ref)):
        assert h.shape == (2, 10, m.cfg.hidden_size), i
        assert rel_err(h, r) <= TOL_F32, f"hidden_states[{i}]"
    assert m.model(ids).hidden_states is None


def test_inputs_embeds_equal_ids_path(device):
    m = make_model(dict(MOE, moe_layer_freq=1), seed=12, device=device)
    ids = m.ids(2, 9)
    emb = m.model.state_dict()["model.embed_tokens.weight"][ids]
    a = m.model(input_ids=ids, labels=ids)
    b = m.model(inputs_embeds=emb, labels=ids)
    assert rel_err(b.logits, a.logits) <= 1e-6
    assert float(b.loss) == pytest.approx(float(a.loss), abs=1e-6)


def test_inputs_embeds_arbitrary_vectors(device):
    import reference_impl as R
    m = make_model(seed=12, device=device)
    emb = np.random.default_rng(0).standard_normal((1, 7, m.cfg.hidden_size)).astype(np.float32)
    # the oracle takes ids: give it a one-row-per-token embedding table
    w = dict(m.weights)
    w["model.embed_tokens.weight"] = np.concatenate([w["model.embed_tokens.weight"], emb[0]])
    cfg = R.RefConfig.from_dict(dict(m.config, vocab_size=m.cfg.vocab_size + 7))
    ref_h = R.forward_hidden(cfg, w, np.arange(m.cfg.vocab_size, m.cfg.vocab_size + 7)[None])[-1]
    ref = ref_h @ m.weights["model.embed_tokens.weight"].astype(np.float64).T
    got = m.model(inputs_embeds=emb).logits
    assert rel_err(got, ref) <= TOL_F32


def test_outputs_are_deterministic(device):
    m = make_model(dict(MOE, moe_layer_freq=1), seed=13, device=device)
    ids = m.ids(3, 17)
    np.testing.assert_array_equal(m.model(ids).logits, m.model(ids).logits)


# ---------------------------------------------------------------- the checkpoint from the original module

@pytest.fixture(scope="module")
def tiny_ring(device):
    from conftest import TINY_RING
    return xoron.MoELlamaForCausalLM.from_pretrained(TINY_RING, device=device), dict(np.load(os.path.join(TINY_RING, "expected.npz")))


@pytest.mark.parametrize("i", [0, 1, 2])
def test_tiny_ring_logits_and_loss(tiny_ring, i):
    model, exp = tiny_ring
    ids = exp[f"in{i}_ids"]
    b, t = ids.shape
    pos = np.broadcast_to(int(exp[f"in{i}_pos0"]) + np.arange(t), (b, t))
    out = model(input_ids=ids, position_ids=pos, labels=exp[f"in{i}_labels"])
    assert rel_err(out.logits, exp[f"in{i}_logits"]) <= TOL_F32
    assert abs(float(out.loss) - float(exp[f"in{i}_loss"])) <= TOL_F32


def test_tiny_ring_greedy_by_full_forwards(tiny_ring):
    """SPEC 7: greedy decoding equals repeated full-forward argmax."""
    model, exp = tiny_ring
    ids = exp["greedy_prompt"]
    while ids.shape[1] < exp["greedy_tokens"].shape[1]:
        nxt = model(ids).logits[:, -1].argmax(-1)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(ids, exp["greedy_tokens"])
