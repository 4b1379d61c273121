"""The Python API of issue 2 item 3: construction, checkpoints, state dicts, outputs, torch."""
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import reference_impl as R
from conftest import TOL_F32, TOL_HALF, TINY_RING, make_model, rel_err, small_config, write_checkpoint, \
    write_safetensors

import xoron
from xoron import MoELlamaForCausalLM
from xoron.modeling import MoELlamaForCausalLM as NumpyModel  # numpy arrays, dtype names (no torch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2, "moe_layer_freq": 2, "intermediate_size": 40}
FIELDS = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              kv_lora_rank=16)


def logits_of(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


def ids_for(vocab=97, b=2, t=9, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t))


def ref_logits_for(model, ids, **kw):
    """The oracle's logits for `model` as it stands (its config and its state_dict)."""
    cfg = R.RefConfig.from_dict(model.config.to_dict())
    return R.forward(cfg, model.state_dict(), ids, **kw)[0]


# ---------------------------------------------------------------- construction and config

def test_construct_from_dict():
    m = MoELlamaForCausalLM(dict(FIELDS, moe_config=MOE), seed=0)
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (32, 2, 4)
    assert c.num_key_value_heads == 4  # config.json rule: nkv = nh
    assert c.rope_theta == 500000.0 and c.max_position_embeddings == 131072 and c.tie_word_embeddings
    assert c.moe_config == MOE
    ids = ids_for()
    assert rel_err(logits_of(m, ids), ref_logits_for(m, ids)) <= TOL_F32


def test_construct_from_xoron_llamaconfig_and_moe_argument():
    cfg = xoron.LlamaConfig(**FIELDS, num_key_value_heads=2)
    m = MoELlamaForCausalLM(cfg, MOE, seed=0)
    assert m.config.num_key_value_heads == 2 and m.config.moe_config["use_moe"]
    assert "model.layers.1.mlp.router.gate.weight" in m.state_dict()
    ids = ids_for()
    assert rel_err(logits_of(m, ids), ref_logits_for(m, ids)) <= TOL_F32


def test_xoron_llamaconfig_defaults():
    c = xoron.LlamaConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151643, 1024, 2048, 12)
    assert (c.num_attention_heads, c.num_key_value_heads, c.kv_lora_rank, c.q_lora_rank) == (16, 16, 512, 0)
    assert c.rope_theta == 500000.0 and c.max_position_embeddings == 131072 and c.rms_norm_eps == 1e-6
    assert c.tie_word_embeddings is True and c.use_ring_attention is True and c.ring_attention_chunk_size == 4096
    assert xoron.LlamaConfig(num_attention_heads=8).num_key_value_heads == 8


def test_construct_from_attribute_object_uses_getattr_defaults():
    """SPEC 1: an object lacking num_key_value_heads gets nh // 4; no rope_theta gives 500000."""
    obj = SimpleNamespace(**dict(FIELDS, num_attention_heads=8), moe_config=dict(MOE, moe_layer_freq=1))
    m = MoELlamaForCausalLM(obj, seed=0)
    assert m.config.num_key_value_heads == 2
    assert m.config.rope_theta == 500000.0
    assert m.config.tie_word_embeddings is True and m.config.max_position_embeddings == 131072
    assert m.state_dict()["model.layers.0.self_attn.kv_b_proj.weight"].shape == (2 * 2 * 4, 16)
    ids = ids_for()
    assert rel_err(logits_of(m, ids), ref_logits_for(m, ids)) <= TOL_F32


def test_attribute_object_values_are_read():
    obj = SimpleNamespace(**FIELDS, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False,
                          max_position_embeddings=4096, q_lora_rank=8)
    c = MoELlamaForCausalLM(obj, seed=0).config
    assert (c.rope_theta, c.tie_word_embeddings, c.max_position_embeddings, c.q_lora_rank) == (10000.0, False, 4096, 8)
    assert c.moe_config["use_moe"] is False


def test_construct_from_transformers_llamaconfig():
    transformers = pytest.importorskip("transformers")
    tc = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=4096)
    tc.kv_lora_rank = 16
    m = MoELlamaForCausalLM(tc, MOE, seed=0)
    c = m.config
    assert c.num_key_value_heads == tc.num_key_value_heads == 4
    assert c.tie_word_embeddings is bool(tc.tie_word_embeddings) is False
    assert "lm_head.weight" in m.state_dict()
    assert c.rope_theta == getattr(tc, "rope_theta", 500000.0)  # 10000 on transformers 4.x, 500000 on 5.x
    assert c.max_position_embeddings == 4096 and c.rms_norm_eps == tc.rms_norm_eps
    ids = ids_for()
    assert rel_err(logits_of(m, ids), ref_logits_for(m, ids)) <= TOL_F32


def test_seed_reproducibility_and_init_statistics():
    cfg = dict(FIELDS, vocab_size=211, moe_config=MOE)
    a = MoELlamaForCausalLM(cfg, seed=1).state_dict()
    b = MoELlamaForCausalLM(cfg, seed=1).state_dict()
    c = MoELlamaForCausalLM(cfg, seed=2).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    mats = [k for k in a if a[k].ndim == 2]
    assert all(not np.array_equal(a[k], c[k]) for k in mats)
    w = np.concatenate([a[k].ravel() for k in mats])
    assert abs(w.std() - 0.02) < 0.0005 and abs(w.mean()) < 0.0005
    for k in mats:  # every matrix, the embedding and router included, is N(0, 0.02)
        assert 0.015 < a[k].std() < 0.025, k
    for k in a:
        if a[k].ndim == 1:
            np.testing.assert_array_equal(a[k], 1.0, err_msg=k)
    assert not np.array_equal(MoELlamaForCausalLM(cfg).state_dict()["model.embed_tokens.weight"],
                              MoELlamaForCausalLM(cfg).state_dict()["model.embed_tokens.weight"])


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("overrides", [
    dict(use_moe=True),
    dict(use_moe=True, moe_layer_freq=1, q_lora_rank=8, tie_word_embeddings=False, num_key_value_heads=2,
         use_ring_attention=False, ring_attention_chunk_size=8, rope_theta=10000.0, rms_norm_eps=1e-5,
         max_position_embeddings=4096),
], ids=["moe", "everything_changed"])
def test_save_pretrained_round_trip(tmp_path, overrides):
    m = make_model(overrides, seed=3, model_class=NumpyModel)
    m.model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "use_ring_attention", "ring_attention_chunk_size", "kv_lora_rank",
                  "q_lora_rank", "moe_config"):
        assert field in saved, field
    m2 = NumpyModel.from_pretrained(tmp_path)
    assert m2.config == m.model.config
    ids = m.ids(2, 11)
    np.testing.assert_array_equal(logits_of(m2, ids), logits_of(m.model, ids))
    sd = m2.state_dict()
    assert sd.keys() == m.weights.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], m.weights[k], err_msg=k)
    # the oracle reads the same directory
    cfg, w = R.load_checkpoint(tmp_path)
    ref, _ = R.forward(cfg, w, ids)
    assert rel_err(logits_of(m2, ids), ref) <= TOL_F32


def test_from_pretrained_accepts_pathlib_and_overrides(tmp_path):
    m = make_model({"ring_attention_chunk_size": 4}, seed=4)
    m.model.save_pretrained(str(tmp_path))
    ids = m.ids(1, 20)
    a = MoELlamaForCausalLM.from_pretrained(pathlib.Path(tmp_path))
    assert rel_err(logits_of(a, ids), m.ref(ids)[0]) <= TOL_F32
    b = MoELlamaForCausalLM.from_pretrained(tmp_path, use_ring_attention=False, rope_theta=10000.0)
    assert b.config.use_ring_attention is False and b.config.rope_theta == 10000.0
    ref, _ = R.forward(R.RefConfig.from_dict(dict(m.config, use_ring_attention=False, rope_theta=10000.0)),
                       m.weights, ids)
    assert rel_err(logits_of(b, ids), ref) <= TOL_F32
    assert rel_err(logits_of(b, ids), logits_of(a, ids)) > 1e-3


def _round_bf16(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("tag", ["BF16", "F16", "mixed"])
def test_half_precision_safetensors(tmp_path, tag):
    m = make_model(dict(MOE, tie_word_embeddings=False), seed=5)
    names = sorted(m.weights)
    if tag == "mixed":
        dtypes = {k: ("F32", "F16", "BF16")[i % 3] for i, k in enumerate(names)}
    else:
        dtypes = {k: tag for k in names}
    write_checkpoint(tmp_path, m.config, m.weights, dtypes)
    loaded = MoELlamaForCausalLM.from_pretrained(tmp_path)
    ids = m.ids(2, 12)
    got = logits_of(loaded, ids)
    assert rel_err(got, m.ref(ids)[0]) <= TOL_HALF
    rounded = {k: (_round_bf16(v) if dtypes[k] == "BF16" else
                   v.astype(np.float16).astype(np.float32) if dtypes[k] == "F16" else v)
               for k, v in m.weights.items()}
    sd = loaded.state_dict()
    for k in sd:
        np.testing.assert_array_equal(sd[k], rounded[k], err_msg=k)
    ref, _ = R.forward(m.cfg, rounded, ids)
    assert rel_err(got, ref) <= TOL_F32


def test_sharded_checkpoint(tmp_path):
    m = make_model(dict(MOE, tie_word_embeddings=False), seed=6)
    names = sorted(m.weights)
    shards = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
              "model-00003-of-00003.safetensors"]
    where = {k: shards[i % 3] for i, k in enumerate(names)}
    for s in shards:
        write_safetensors(tmp_path / s, {k: m.weights[k] for k in names if where[k] == s},
                          dtypes={k: "BF16" for k in names} if s == shards[2] else None)
    (tmp_path / "config.json").write_text(json.dumps(m.config))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": where}))
    loaded = MoELlamaForCausalLM.from_pretrained(tmp_path)
    sd = loaded.state_dict()
    for k in names:
        want = _round_bf16(m.weights[k]) if where[k] == shards[2] else m.weights[k]
        np.testing.assert_array_equal(sd[k], want, err_msg=k)
    ids = m.ids(1, 10)
    assert rel_err(logits_of(loaded, ids), m.ref(ids)[0]) <= TOL_HALF


def _xoron_dev_dir(tmp_path, extra_config=None):
    """A Xoron-Dev multimodal checkpoint: XoronConfig names, 'llm.' tensors, vision/audio extras."""
    dev_cfg = {"model_name": "Xoron-Dev", "hidden_size": 32, "num_layers": 3, "num_heads": 4,
               "intermediate_size": 48, "vocab_size": 97, "max_position_embeddings": 131072,
               "use_moe": True, "num_experts": 4, "num_experts_per_tok": 2, "moe_layer_freq": 2,
               "use_ring_attention": True, "ring_attention_chunk_size": 8, "tie_word_embeddings": True,
               "vision_model_name": "siglip", "use_vision": True, "num_audio_layers": 2}
    dev_cfg.update(extra_config or {})
    ref_cfg = R.RefConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, use_moe=dev_cfg["use_moe"], num_experts=4,
                          num_experts_per_tok=2, moe_layer_freq=2, moe_intermediate_size=48,
                          ring_attention_chunk_size=8, kv_lora_rank=512,
                          rope_theta=dev_cfg.get("rope_theta", 500000.0))
    from conftest import random_weights
    w = random_weights(ref_cfg, 7)
    tensors = {"llm." + k: v for k, v in w.items()}
    tensors["vision.encoder.patch_embed.weight"] = np.ones((8, 3), np.float32)
    tensors["audio.proj.weight"] = np.zeros((4,), np.float32)
    tensors["vision.projector.weight"] = np.full((2, 2), 3.0, np.float32)
    (tmp_path / "config.json").write_text(json.dumps(dev_cfg))
    write_safetensors(tmp_path / "model.safetensors", tensors)
    return ref_cfg, w


def test_xoron_dev_multimodal_layout(tmp_path):
    ref_cfg, w = _xoron_dev_dir(tmp_path)
    m = NumpyModel.from_pretrained(tmp_path)
    c = m.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (3, 4, 4)
    assert c.moe_config["intermediate_size"] == 48 and c.moe_config["use_moe"]
    assert c.rope_theta == 500000.0 and c.kv_lora_rank == 512
    assert sorted(m.state_dict()) == sorted(w)
    ids = ids_for(b=2, t=20)
    assert rel_err(logits_of(m, ids), R.forward(ref_cfg, w, ids)[0]) <= TOL_F32
    # transformers 4.x-trained checkpoints: rope_theta=10000.0 as an override
    m4 = MoELlamaForCausalLM.from_pretrained(tmp_path, rope_theta=10000.0)
    assert m4.config.rope_theta == 10000.0
    ref4 = R.forward(R.RefConfig(**{**ref_cfg.__dict__, "rope_theta": 10000.0}), w, ids)[0]
    assert rel_err(logits_of(m4, ids), ref4) <= TOL_F32
    assert rel_err(logits_of(m4, ids), logits_of(m, ids)) > 1e-3


def test_xoron_dev_rope_theta_from_config(tmp_path):
    ref_cfg, w = _xoron_dev_dir(tmp_path, {"rope_theta": 10000.0, "use_moe": False})
    m = MoELlamaForCausalLM.from_pretrained(tmp_path)
    assert m.config.rope_theta == 10000.0 and not m.config.moe_config["use_moe"]
    assert "model.layers.1.mlp.gate_proj.weight" in m.state_dict()
    ids = ids_for(b=1, t=12)
    assert rel_err(logits_of(m, ids), R.forward(ref_cfg, w, ids)[0]) <= TOL_F32


def test_xoron_dev_sharded_with_vision_first(tmp_path):
    ref_cfg, w = _xoron_dev_dir(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"vision.encoder.weight": np.ones((4, 4))})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"llm." + k: v for k, v in w.items()})
    wm = {"vision.encoder.weight": "model-00001-of-00002.safetensors"}
    wm.update({"llm." + k: "model-00002-of-00002.safetensors" for k in w})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    m = MoELlamaForCausalLM.from_pretrained(tmp_path)
    ids = ids_for(b=1, t=12)
    assert rel_err(logits_of(m, ids), R.forward(ref_cfg, w, ids)[0]) <= TOL_F32


# ---------------------------------------------------------------- state dicts

def spec_shapes(c: R.RefConfig) -> dict:
    """SPEC section 2, written out independently of the engine."""
    H, V, hd, nh, nkv, r = c.hidden_size, c.vocab_size, c.head_dim, c.num_attention_heads, \
        c.num_key_value_heads, c.kv_lora_rank
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (V, H)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        if c.q_lora_rank:
            s[p + "self_attn.q_a_proj.weight"] = (c.q_lora_rank, H)
            s[p + "self_attn.q_a_layernorm.weight"] = (c.q_lora_rank,)
            s[p + "self_attn.q_b_proj.weight"] = (nh * hd, c.q_lora_rank)
        else:
            s[p + "self_attn.q_proj.weight"] = (nh * hd, H)
        s[p + "self_attn.kv_a_proj.weight"] = (r + hd, H)
        s[p + "self_attn.kv_a_layernorm.weight"] = (r,)
        s[p + "self_attn.kv_b_proj.weight"] = (2 * nkv * hd, r)
        s[p + "self_attn.o_proj.weight"] = (H, nh * hd)
        if c.use_moe and n % c.moe_layer_freq == c.moe_layer_freq - 1:
            Ie = c.moe_intermediate_size
            s[p + "mlp.router.input_norm.weight"] = (H,)
            s[p + "mlp.router.gate.weight"] = (c.num_experts, H)
            for e in [f"experts.{i}" for i in range(c.num_experts)] + ["shared_expert"]:
                s[p + f"mlp.{e}.gate_proj.weight"] = (Ie, H)
                s[p + f"mlp.{e}.up_proj.weight"] = (Ie, H)
                s[p + f"mlp.{e}.down_proj.weight"] = (H, Ie)
        else:
            s[p + "mlp.gate_proj.weight"] = (c.intermediate_size, H)
            s[p + "mlp.up_proj.weight"] = (c.intermediate_size, H)
            s[p + "mlp.down_proj.weight"] = (H, c.intermediate_size)
    return s


@pytest.mark.parametrize("overrides", [
    {},
    dict(use_moe=True, num_hidden_layers=4),
    dict(use_moe=True, moe_layer_freq=3, num_hidden_layers=3, q_lora_rank=8, tie_word_embeddings=False,
         num_key_value_heads=2, kv_lora_rank=40, num_experts=3, moe_intermediate_size=24),
], ids=["dense", "moe", "everything"])
def test_state_dict_names_shapes_and_num_parameters(overrides):
    config = small_config(overrides)
    m = NumpyModel(config, seed=0)
    want = spec_shapes(R.RefConfig.from_dict(config))
    sd = m.state_dict()
    assert {k: v.shape for k, v in sd.items()} == want
    assert all(v.dtype == np.float32 for v in sd.values())
    assert m.num_parameters() == sum(int(np.prod(s)) for s in want.values())
    # a copy: writing to it leaves the model alone
    before = logits_of(m, ids_for())
    sd["model.norm.weight"][:] = 0
    np.testing.assert_array_equal(logits_of(m, ids_for()), before)


def test_load_state_dict_strict_and_non_strict():
    m = make_model(dict(MOE), seed=8)
    fresh = MoELlamaForCausalLM(m.config, seed=99)
    res = fresh.load_state_dict(m.weights)
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    ids = m.ids(1, 8)
    np.testing.assert_array_equal(logits_of(fresh, ids), logits_of(m.model, ids))

    partial = {k: v for k, v in m.weights.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        MoELlamaForCausalLM(m.config, seed=99).load_state_dict(partial)
    with pytest.raises(ValueError, match="bogus"):
        MoELlamaForCausalLM(m.config, seed=99).load_state_dict(dict(m.weights, **{"bogus.weight": np.ones(3)}))

    other = MoELlamaForCausalLM(m.config, seed=99)
    norm_before = other.state_dict()["model.norm.weight"]
    res = other.load_state_dict(dict(partial, **{"bogus.weight": np.ones(3)}), strict=False)
    assert list(res.missing_keys) == ["model.norm.weight"]
    assert list(res.unexpected_keys) == ["bogus.weight"]
    sd = other.state_dict()
    np.testing.assert_array_equal(sd["model.norm.weight"], norm_before)  # kept
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"], m.weights["model.embed_tokens.weight"])


def test_load_state_dict_accepts_float64_and_float16():
    m = make_model(seed=9)
    a = MoELlamaForCausalLM(m.config, seed=0)
    a.load_state_dict({k: v.astype(np.float64) for k, v in m.weights.items()})
    ids = m.ids(1, 6)
    assert rel_err(logits_of(a, ids), logits_of(m.model, ids)) <= 1e-6
    a.load_state_dict({k: v.astype(np.float16) for k, v in m.weights.items()})
    assert rel_err(logits_of(a, ids), logits_of(m.model, ids)) <= TOL_HALF


# ---------------------------------------------------------------- outputs and compatibility no-ops

def test_causal_lm_output_fields_and_tuple():
    m = make_model(dict(MOE), seed=10)
    ids = m.ids(2, 7)
    out = m.model(input_ids=ids, labels=ids)
    assert isinstance(out, xoron.CausalLMOutput)
    for f in ("loss", "logits", "past_key_values", "hidden_states", "aux_loss"):
        assert hasattr(out, f)
    assert out.past_key_values is None and out.hidden_states is None
    assert np.ndim(out.loss) == 0 and np.ndim(out.aux_loss) == 0
    assert float(out.aux_loss) == 0.0
    assert out["logits"] is out.logits
    tup = m.model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple)
    assert float(tup[0]) == pytest.approx(float(out.loss), abs=1e-7)
    np.testing.assert_array_equal(tup[1], out.logits)
    tup = m.model(input_ids=ids, return_dict=False)
    np.testing.assert_array_equal(tup[0], out.logits)
    np.testing.assert_array_equal(m.model.forward(ids).logits, out.logits)
    np.testing.assert_array_equal(m.model(ids).logits, out.logits)  # positional input_ids


def test_compatibility_no_ops():
    m = make_model(seed=11, model_class=NumpyModel)
    ids = m.ids(1, 5)
    before = logits_of(m.model, ids)
    assert m.model.eval() is m.model
    assert m.model.train() is m.model
    assert m.model.train(False) is m.model
    assert m.model.requires_grad_(False) is m.model
    assert m.model.to("cpu") is m.model
    assert m.model.to(device="cpu", dtype="float32") is m.model
    assert m.model.cpu() is m.model and m.model.float() is m.model
    assert m.model.dtype == "float32" and str(m.model.device) == "cpu"
    np.testing.assert_array_equal(logits_of(m.model, ids), before)
    assert m.model.num_parameters() == sum(v.size for v in m.weights.values())
    assert "MoELlamaForCausalLM" in repr(m.model)


@pytest.mark.parametrize("conv", ["bfloat16", "half"])
def test_half_precision_conversion(conv):
    """bfloat16()/half() re-store the weights and compute within 3e-2; float() goes back."""
    m = make_model(dict(MOE), seed=12, model_class=NumpyModel)
    ids = m.ids(2, 8)
    ref = m.ref(ids)[0]
    r = getattr(m.model, conv)()
    assert r is m.model and m.model.dtype == {"bfloat16": "bfloat16", "half": "float16"}[conv]
    assert rel_err(logits_of(m.model, ids), ref) <= TOL_HALF
    m.model.float()
    assert m.model.dtype == "float32"
    assert rel_err(logits_of(m.model, ids), ref) <= TOL_HALF


# ---------------------------------------------------------------- torch (optional)

def test_torch_round_trip():
    torch = pytest.importorskip("torch")
    m = make_model(dict(MOE), seed=13)
    ids = m.ids(2, 9)
    np_out = m.model(ids, labels=ids, output_hidden_states=True)
    t_out = m.model(torch.from_numpy(ids), attention_mask=torch.ones(2, 9, dtype=torch.long),
                    labels=torch.from_numpy(ids), output_hidden_states=True)
    assert isinstance(t_out.logits, torch.Tensor) and t_out.logits.dtype == torch.float32
    assert isinstance(t_out.loss, torch.Tensor) and t_out.loss.dim() == 0
    assert isinstance(t_out.aux_loss, torch.Tensor) and float(t_out.aux_loss) == 0.0
    assert all(isinstance(h, torch.Tensor) for h in t_out.hidden_states)
    np.testing.assert_array_equal(t_out.logits.numpy(), np_out.logits)
    assert float(t_out.loss) == pytest.approx(float(np_out.loss), abs=1e-7)
    # numpy in -> numpy out; lists -> numpy
    assert isinstance(np_out.logits, np.ndarray) and not isinstance(np_out.loss, torch.Tensor)
    l_out = m.model(ids.tolist(), labels=ids.tolist())
    assert isinstance(l_out.logits, np.ndarray)
    np.testing.assert_array_equal(l_out.logits, np_out.logits)
    # int32 ids, inputs_embeds as torch
    np.testing.assert_array_equal(m.model(torch.from_numpy(ids).int()).logits.numpy(), np_out.logits)
    emb = torch.from_numpy(m.weights["model.embed_tokens.weight"][ids])
    e_out = m.model(inputs_embeds=emb)
    assert isinstance(e_out.logits, torch.Tensor)
    assert rel_err(e_out.logits, np_out.logits) <= 1e-6


def test_torch_state_dict_and_baseline_model():
    torch = pytest.importorskip("torch")
    from xoron.torch_reference import TorchMoELlama
    m = make_model(dict(MOE, q_lora_rank=8, tie_word_embeddings=False), seed=14, model_class=NumpyModel)
    tm = TorchMoELlama(m.config)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.model.state_dict().items()}, strict=True)
    x = MoELlamaForCausalLM(m.config, seed=0)
    x.load_state_dict(tm.state_dict())  # torch tensors in
    ids = m.ids(2, 10)
    with torch.no_grad():
        _, t_logits, _ = tm(torch.from_numpy(ids))
    assert rel_err(logits_of(x, torch.from_numpy(ids)), t_logits) <= TOL_F32
    x.load_state_dict({k: v.bfloat16() for k, v in tm.state_dict().items()})
    assert rel_err(logits_of(x, ids), t_logits) <= TOL_HALF


def test_xoron_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, xoron\n"
            "m = xoron.MoELlamaForCausalLM(dict(vocab_size=11, hidden_size=8, intermediate_size=8, "
            "num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=4), seed=0)\n"
            "print(m(np.array([[1, 2]])).logits.shape)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "(1, 2, 11)" in r.stdout


# ---------------------------------------------------------------- command line

needs_cli = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "xoron", "__main__.py")),
                               reason="xoron/__main__.py not written yet")


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "xoron", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@needs_cli
def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    assert "info" in r.stdout


@needs_cli
def test_cli_info():
    r = _cli("info", TINY_RING)
    assert r.returncode == 0, r.stderr
    m = MoELlamaForCausalLM.from_pretrained(TINY_RING)
    assert "hidden_size" in r.stdout and "64" in r.stdout
    n = m.num_parameters()
    assert str(n) in r.stdout or f"{n:,}" in r.stdout or f"{n / 1e6:.2f}" in r.stdout


@needs_cli
def test_cli_info_on_bad_path(tmp_path):
    r = _cli("info", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr


def test_float_attention_mask_of_zeros_and_ones_is_accepted():
    from conftest import make_model
    m = make_model(seed=0)
    ids = m.ids(2, 6)
    mask = np.array([[1] * 6, [0, 0] + [1] * 4])
    a = m.model(input_ids=ids, attention_mask=mask).logits
    b = m.model(input_ids=ids, attention_mask=mask.astype(np.float32)).logits
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="attention_mask"):
        m.model(input_ids=ids, attention_mask=mask * 0.5)
