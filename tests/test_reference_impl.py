"""Checks that the numpy oracle (tests/reference_impl.py) reproduces the original module."""

import json
import math
import os
import struct
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import reference_impl as R  # noqa: E402

FIXTURE = os.path.join(HERE, "data", "tiny_ring")


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tiny():
    cfg, w = R.load_checkpoint(FIXTURE)
    exp = dict(np.load(os.path.join(FIXTURE, "expected.npz")))
    return cfg, w, exp


def small_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, kv_lora_rank=24,
                use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2,
                moe_intermediate_size=40, ring_attention_chunk_size=4096)
    base.update(kw)
    return R.RefConfig(**base)


# ------------------------------------------------------------------ fixture reproduction


def test_fixture_config(tiny):
    cfg, w, _ = tiny
    assert cfg.head_dim == 16 and cfg.use_moe and cfg.moe_intermediate_size == 96
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert "lm_head.weight" not in w
    assert w["model.layers.1.self_attn.kv_a_proj.weight"].shape == (512 + 16, 64)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_fixture_logits_and_loss(tiny, i):
    cfg, w, exp = tiny
    ids = exp[f"in{i}_ids"]
    pos = int(exp[f"in{i}_pos0"]) + np.arange(ids.shape[1])
    logits, loss = R.forward(cfg, w, ids, position_ids=pos, labels=exp[f"in{i}_labels"])
    assert logits.shape == exp[f"in{i}_logits"].shape
    assert rel_err(logits, exp[f"in{i}_logits"]) <= 1e-4
    assert abs(loss - float(exp[f"in{i}_loss"])) <= 1e-4


def test_fixture_ring_eps_matches_original(tiny):
    """Input 0 (t=40 > chunk 16) ran the original's ring path with its sum + 1e-5."""
    cfg, w, exp = tiny
    ids, ref = exp["in0_ids"], exp["in0_logits"]
    with_eps, _ = R.forward(cfg, w, ids)
    without, _ = R.forward(cfg, w, ids, ring_eps=0.0)
    assert rel_err(with_eps, ref) < rel_err(without, ref)
    assert rel_err(with_eps, ref) <= 2e-6


def test_fixture_greedy(tiny):
    cfg, w, exp = tiny
    out = R.greedy_generate(cfg, w, exp["greedy_prompt"], 24)
    np.testing.assert_array_equal(out, exp["greedy_tokens"])


# ------------------------------------------------------------------ attention formulations


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked(masked):
    cfg = small_cfg(use_ring_attention=False)
    w = R.random_weights(cfg, seed=1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 19))
    mask = None
    if masked:
        mask = np.ones((2, 19), np.int64)
        mask[0, :5] = 0  # left padding
        mask[1, 7] = 0  # a hole in the middle
    full, _ = R.forward(cfg, w, ids, attention_mask=mask)
    for chunk in (1, 4, 7, 18):
        ccfg = small_cfg(use_ring_attention=True, ring_attention_chunk_size=chunk)
        exact, _ = R.forward(ccfg, w, ids, attention_mask=mask, ring_eps=0.0)
        np.testing.assert_allclose(exact, full, rtol=0, atol=1e-12 * np.abs(full).max())
        orig, _ = R.forward(ccfg, w, ids, attention_mask=mask)  # with the 1e-5 of SPEC 4.4
        assert rel_err(orig, full) <= 1e-4
    # chunk >= t takes the plain path whatever use_ring_attention says
    same, _ = R.forward(small_cfg(use_ring_attention=True, ring_attention_chunk_size=19), w,
                        ids, attention_mask=mask)
    np.testing.assert_array_equal(same, full)


def test_left_padding_matches_unpadded():
    cfg = small_cfg(q_lora_rank=12, tie_word_embeddings=False)
    w = R.random_weights(cfg, seed=3)
    rng = np.random.default_rng(4)
    a = rng.integers(0, cfg.vocab_size, size=9)
    b = rng.integers(0, cfg.vocab_size, size=6)
    ids = np.stack([a, np.concatenate([np.zeros(3, np.int64), b])])
    mask = np.array([[1] * 9, [0] * 3 + [1] * 6])
    logits, _ = R.forward(cfg, w, ids, attention_mask=mask)
    assert np.all(np.isfinite(logits))
    la, _ = R.forward(cfg, w, a[None])
    lb, _ = R.forward(cfg, w, b[None])
    np.testing.assert_allclose(logits[0], la[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logits[1, 3:], lb[0], rtol=1e-12, atol=1e-12)
    # default position ids under a mask: cumsum - 1, pads 1
    np.testing.assert_array_equal(R._default_positions(ids, mask)[1], [1, 1, 1, 0, 1, 2, 3, 4, 5])
    # greedy decoding of the padded batch equals decoding each row alone
    g = R.greedy_generate(cfg, w, ids, 4, attention_mask=mask)
    np.testing.assert_array_equal(g[1, 3:], R.greedy_generate(cfg, w, b[None], 4)[0])


def test_fully_masked_query_gives_zero_attention():
    q = np.ones((1, 1, 2, 4))
    k = np.ones((1, 1, 2, 4))
    v = np.arange(8.0).reshape(1, 1, 2, 4)
    allowed = np.array([[False, False], [True, False]]).reshape(1, 1, 2, 2)
    for out in (R._attend_full(q, k, v, allowed), R._attend_chunked(q, k, v, allowed, 1, 1e-5)):
        np.testing.assert_array_equal(out[0, 0, 0], 0.0)
        np.testing.assert_allclose(out[0, 0, 1], v[0, 0, 0], rtol=2e-5)


def test_gqa_matches_repeated_heads():
    """nkv < nh equals the same model with K/V heads duplicated (head h -> h // group)."""
    cfg = small_cfg(use_moe=False, num_key_value_heads=2)
    w = R.random_weights(cfg, seed=5)
    cfg4 = small_cfg(use_moe=False, num_key_value_heads=4)
    w4 = dict(w)
    hd = cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        n = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        kb = w[n].reshape(2, 2, hd, -1)  # [k|v, kv head, hd, r]
        w4[n] = np.repeat(kb, 2, axis=1).reshape(2 * 4 * hd, -1)
    ids = np.arange(11)[None] % cfg.vocab_size
    np.testing.assert_allclose(R.forward(cfg, w, ids)[0], R.forward(cfg4, w4, ids)[0],
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ pieces


def test_rope_tables():
    cfg = R.RefConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                      max_position_embeddings=131072)
    inv, mscale = R.rope_inv_freq(cfg)
    assert inv.dtype == np.float32 and inv.shape == (8,)
    f = np.float32(500000.0) ** (np.arange(0, 16, 2, dtype=np.float32) / np.float32(16))
    # hd=16, base 5e5: low = 2, high = 5; low indices interpolated (1/(s f)), high extra (1/f)
    np.testing.assert_allclose(inv[:3], 1 / (16 * f[:3]), rtol=1e-6)
    np.testing.assert_allclose(inv[6:], 1 / f[6:], rtol=1e-6)
    u = 1 / 3
    np.testing.assert_allclose(inv[3], (1 - u) / (16 * f[3]) + u / f[3], rtol=1e-6)
    assert mscale == pytest.approx(0.1 * math.log(16) + 1)
    cos, sin = R.rope_cos_sin(cfg, np.array([[0, 5]]))
    assert cos.shape == (1, 2, 16)
    np.testing.assert_allclose(cos[0, 0], mscale)
    np.testing.assert_allclose(sin[0, 1, :8], sin[0, 1, 8:])
    assert R.rope_inv_freq(R.RefConfig(max_position_embeddings=8192))[1] == 1.0


def test_router_ties_and_renorm():
    cfg = small_cfg()
    w = {"r.router.input_norm.weight": np.ones(cfg.hidden_size),
         "r.router.gate.weight": np.zeros((cfg.num_experts, cfg.hidden_size))}
    x = np.random.default_rng(0).standard_normal((3, cfg.hidden_size))
    route = R._route(cfg, w, "r.", x)  # all experts tie: experts 0 and 1 win
    np.testing.assert_allclose(route[:, :2], 0.25 / (0.5 + 1e-5))
    np.testing.assert_array_equal(route[:, 2:], 0.0)


def test_loss_rules():
    logits = np.zeros((1, 3, 4))
    assert R.causal_lm_loss(logits, np.full((1, 3), -100)) == 0.0
    assert R.causal_lm_loss(logits, np.array([[5, -100, 2]])) == pytest.approx(math.log(4))
    big = np.zeros((1, 2, 4))
    big[0, 0, 0] = 1e4
    assert R.causal_lm_loss(big, np.array([[0, 1]])) == 100.0


def test_sample_filter_hand_example():
    p = np.array([0.1, 0.5, 0.05, 0.2, 0.15])  # sorted: 1 (.5), 3 (.2), 4 (.15), 0, 2
    z = np.log(p) + 3.0

    def kept(probs):
        return set(np.flatnonzero(probs).tolist())

    np.testing.assert_allclose(R.sample_filter(z), p)
    assert kept(R.sample_filter(z, top_p=0.3)) == {1}  # only the top-1
    out = R.sample_filter(z, top_p=0.6)  # .5 then .7 crosses: keep the crossing token
    assert kept(out) == {1, 3}
    np.testing.assert_allclose(out[[1, 3]], [0.5 / 0.7, 0.2 / 0.7])
    assert kept(R.sample_filter(z, top_p=0.8)) == {1, 3, 4}
    assert kept(R.sample_filter(z, top_k=3)) == {1, 3, 4}
    np.testing.assert_allclose(R.sample_filter(z, top_k=2)[[1, 3]], [5 / 7, 2 / 7])
    # top-k first, then nucleus on the renormalised rest: .588, .824 -> keep {1, 3}
    assert kept(R.sample_filter(z, top_k=3, top_p=0.8)) == {1, 3}
    assert kept(R.sample_filter(z, top_k=3, top_p=0.9)) == {1, 3, 4}
    t2 = R.sample_filter(z, temperature=2.0)
    np.testing.assert_allclose(t2, np.sqrt(p) / np.sqrt(p).sum())
    # temperature applies before nucleus: at T=2 the top two hold only .49 of the mass
    assert kept(R.sample_filter(z, temperature=2.0, top_p=0.6)) == {1, 3, 4}
    assert kept(R.sample_filter(z, top_k=1)) == {1}


def test_config_from_dict():
    c = R.RefConfig.from_dict({"hidden_size": 64, "num_attention_heads": 8})
    assert c.num_key_value_heads == 8 and c.vocab_size == 151643 and not c.use_moe
    assert c.kv_lora_rank == 512 and c.rope_theta == 500000.0 and c.tie_word_embeddings
    assert c.moe_intermediate_size == c.intermediate_size == 2048 and c.head_dim == 8
    c = R.RefConfig.from_dict({"num_key_value_heads": 4, "moe_config": {"use_moe": True}})
    assert c.num_key_value_heads == 4 and c.num_experts == 8 and c.num_experts_per_tok == 2
    assert [i for i in range(6) if c.is_moe_layer(i)] == [1, 3, 5]
    # Xoron-Dev multimodal layout
    c = R.RefConfig.from_dict({"num_layers": 3, "num_heads": 4, "hidden_size": 32,
                               "use_moe": True, "num_experts": 6, "intermediate_size": 40})
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (3, 4, 4)
    assert c.use_moe and c.num_experts == 6 and c.moe_intermediate_size == 40
    assert R.RefConfig.from_dict(c.to_dict()) == c


def test_random_weights_layout():
    cfg = small_cfg(q_lora_rank=12, tie_word_embeddings=False, moe_layer_freq=3)
    w = R.random_weights(cfg, seed=0)
    assert all(v.dtype == np.float32 for v in w.values())
    H, hd, r = 32, 8, 24
    assert w["lm_head.weight"].shape == (97, H)
    assert w["model.layers.0.self_attn.q_a_proj.weight"].shape == (12, H)
    assert w["model.layers.0.self_attn.q_a_layernorm.weight"].shape == (12,)
    assert w["model.layers.0.self_attn.q_b_proj.weight"].shape == (4 * hd, 12)
    assert "model.layers.0.self_attn.q_proj.weight" not in w
    assert w["model.layers.0.self_attn.kv_a_proj.weight"].shape == (r + hd, H)
    assert w["model.layers.0.self_attn.kv_b_proj.weight"].shape == (2 * 2 * hd, r)
    assert w["model.layers.0.mlp.gate_proj.weight"].shape == (48, H)
    assert w["model.layers.2.mlp.router.gate.weight"].shape == (4, H)
    assert w["model.layers.2.mlp.experts.3.down_proj.weight"].shape == (H, 40)
    assert w["model.layers.2.mlp.shared_expert.up_proj.weight"].shape == (40, H)
    assert "model.layers.1.mlp.router.gate.weight" not in w
    # 2 norms + 3 q_lora tensors + kv_a, kv_a_norm, kv_b, o_proj + 3 dense FFN tensors
    assert len([k for k in w if k.startswith("model.layers.0.")]) == 2 + 3 + 4 + 3
    tied = R.random_weights(small_cfg(), seed=0)
    assert "lm_head.weight" not in tied and "model.layers.0.self_attn.q_proj.weight" in tied


def _write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_load_safetensors_dtypes(tmp_path):
    x = np.array([[1.5, -2.25], [3.0, 0.1]], dtype=np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2")
    p = tmp_path / "t.safetensors"
    _write_safetensors(p, {"a": ("F32", x.shape, x.tobytes()),
                           "b": ("F16", x.shape, x.astype("<f2").tobytes()),
                           "c": ("BF16", x.shape, bf16.tobytes())})
    t = R.load_safetensors(p)
    np.testing.assert_array_equal(t["a"], x)
    np.testing.assert_array_equal(t["b"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(t["c"], x, rtol=1e-2)
    assert t["c"][0, 0] == 1.5 and all(v.dtype == np.float32 for v in t.values())
    _write_safetensors(p, {"d": ("I8", (1,), b"\x00")})
    with pytest.raises(ValueError, match="d"):
        R.load_safetensors(p)
