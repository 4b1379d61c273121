"""Issue 2 item 4: every bad input is a Python exception whose message names the problem,
never a crash, a hang or an out-of-bounds read."""
import json
import os
import shutil
import struct
import types

import numpy as np
import pytest

from conftest import TINY_RING, make_model, small_config, write_checkpoint, write_raw_safetensors, \
    write_safetensors

import xoron
from xoron import MoELlamaForCausalLM


@pytest.fixture(scope="module")
def built():
    return make_model(seed=0)


@pytest.fixture(scope="module")
def model(built):
    return built.model


IDS = np.array([[1, 2, 3], [4, 5, 6]])


# ---------------------------------------------------------------- forward arguments

@pytest.mark.parametrize("ids, match", [
    (np.array([[1, -1, 3]]), r"token id -1.*outside \[0, vocab_size=97\)"),
    (np.array([[1, 97, 3]]), r"token id 97.*outside \[0, vocab_size=97\)"),
    (np.array([[0, 2**40]]), r"outside"),
    (np.array([[-2**40]]), r"outside"),
    (np.array([[1.0, 2.0]]), r"integer"),
    ([[1.5, 2]], r"integer"),
    (np.array([["a", "b"]]), r"integer"),
    (np.array([1, 2, 3]), r"2-D"),
    (np.array([[[1, 2, 3]]]), r"2-D"),
    (np.array(5), r"2-D"),
    (np.zeros((1, 0), np.int64), r"empty"),
    (np.zeros((0, 5), np.int64), r"empty"),
    ([[1, 2], [3]], r"input_ids"),
], ids=["negative", "vocab", "huge", "huge_negative", "float", "float_list", "str", "1d", "3d", "0d",
        "empty_1x0", "empty_0x5", "ragged"])
def test_bad_input_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids)


def test_bad_ids_are_caught_in_every_row(model):
    ids = np.ones((3, 7), np.int64)
    ids[2, 6] = 1000
    with pytest.raises(ValueError, match="1000"):
        model(ids)


def test_no_input(model):
    with pytest.raises(ValueError, match="input_ids"):
        model()


def test_ids_and_embeds_together(model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(input_ids=IDS, inputs_embeds=np.zeros((2, 3, 32), np.float32))


@pytest.mark.parametrize("emb, match", [
    (np.zeros((3, 32), np.float32), r"3-D"),
    (np.zeros((1, 3, 31), np.float32), r"31.*32|hidden"),
    (np.zeros((1, 0, 32), np.float32), r"empty"),
], ids=["2d", "width", "empty"])
def test_bad_inputs_embeds(model, emb, match):
    with pytest.raises(ValueError, match=match):
        model(inputs_embeds=emb)


@pytest.mark.parametrize("labels, match", [
    (np.array([[1, 2]]), r"labels.*shape"),
    (np.array([[1, 2, 3]]), r"labels.*shape"),           # batch 1 vs 2
    (np.array([1, 2, 3]), r"labels.*2-D"),
    (np.array([[1.0, 2, 3], [1, 2, 3]]), r"labels.*integer"),
    (np.array([[1, 2, 97], [1, 2, 3]]), r"label 97.*outside"),
    (np.array([[1, 2, -5], [1, 2, 3]]), r"label -5.*-100"),
], ids=["short", "rows", "1d", "float", "vocab", "negative_not_-100"])
def test_bad_labels(model, labels, match):
    with pytest.raises(ValueError, match=match):
        model(IDS, labels=labels)


@pytest.mark.parametrize("mask, match", [
    (np.array([[1, 1], [1, 1]]), r"attention_mask.*shape"),
    (np.ones((1, 3), np.int64), r"attention_mask.*shape"),
    (np.ones((2, 3, 1), np.int64), r"attention_mask.*2-D"),
    (np.array([[1, 2, 1], [1, 1, 1]]), r"attention_mask.*0 and 1"),
    (np.array([[1, -1, 1], [1, 1, 1]]), r"attention_mask.*0 and 1"),
    (np.array([[1, 0.5, 1], [1, 1, 1]]), r"attention_mask"),
], ids=["short", "rows", "3d", "two", "minus_one", "half"])
def test_bad_attention_mask(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(IDS, attention_mask=mask)


@pytest.mark.parametrize("pos, match", [
    (np.array([[0, 1], [0, 1]]), r"position_ids.*shape"),
    (np.zeros((3, 3), np.int64), r"position_ids.*shape"),
    (np.array([[0, -1, 2], [0, 1, 2]]), r"position id -1.*max_position_embeddings"),
    (np.array([[0, 1, 131072], [0, 1, 2]]), r"position id 131072.*max_position_embeddings"),
    (np.array([[0, 1.0, 2], [0, 1, 2]]), r"position_ids.*integer"),
], ids=["short", "rows", "negative", "at_max", "float"])
def test_bad_position_ids(model, pos, match):
    with pytest.raises(ValueError, match=match):
        model(IDS, position_ids=pos)


def test_position_ids_beyond_int32_are_rejected(model):
    pos = np.array([[0, 1, 2**32 + 2]] * 2)  # 2**32 + 2 wraps to 2 in an int32 cast
    with pytest.raises(ValueError, match="position"):
        model(IDS, position_ids=pos)


def test_position_ids_past_max_with_small_max():
    m = make_model({"max_position_embeddings": 64}, seed=0).model
    m(np.ones((1, 64), np.int64))  # exactly max_position_embeddings tokens: fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(np.ones((1, 65), np.int64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(np.ones((1, 2), np.int64), position_ids=[[62, 64]])


@pytest.mark.parametrize("pkv", [
    [(np.zeros((1, 4, 3, 8)), np.zeros((1, 4, 3, 8)))],
    (),
    "cache",
    object(),
], ids=["tuple_of_kv", "empty_tuple", "str", "object"])
def test_past_key_values_of_the_wrong_kind(model, pkv):
    with pytest.raises((ValueError, TypeError), match="past_key_values"):
        model(IDS, past_key_values=pkv)


def test_past_key_values_of_another_model(model):
    other = make_model(seed=1).model
    cache = other(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values"):
        model(IDS, past_key_values=cache)


def test_model_still_works_after_errors(built):
    ids = built.ids(2, 5)
    ref = built.model(ids).logits
    for bad in (np.array([[1, 999]]), np.zeros((1, 0), np.int64)):
        with pytest.raises(ValueError):
            built.model(bad)
    np.testing.assert_array_equal(built.model(ids).logits, ref)


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=30), r"num_attention_heads.*divide hidden_size"),
    (dict(hidden_size=36), r"head_dim.*even"),
    (dict(num_key_value_heads=3), r"num_key_value_heads.*divide num_attention_heads"),
    (dict(num_key_value_heads=8), r"num_key_value_heads.*divide num_attention_heads"),
    (dict(use_moe=True, num_experts_per_tok=5), r"num_experts_per_tok.*exceeds num_experts"),
    (dict(vocab_size=0), r"vocab_size"),
    (dict(hidden_size=-32), r"hidden_size"),
    (dict(intermediate_size=0), r"intermediate_size"),
    (dict(num_hidden_layers=0), r"num_hidden_layers"),
    (dict(num_attention_heads=0), r"num_attention_heads"),
    (dict(num_key_value_heads=0), r"num_key_value_heads"),
    (dict(kv_lora_rank=0), r"kv_lora_rank"),
    (dict(q_lora_rank=-1), r"q_lora_rank"),
    (dict(max_position_embeddings=0), r"max_position_embeddings"),
    (dict(ring_attention_chunk_size=-4), r"ring_attention_chunk_size"),
    (dict(use_moe=True, num_experts=0), r"num_experts"),
    (dict(use_moe=True, num_experts_per_tok=0), r"num_experts_per_tok"),
    (dict(use_moe=True, moe_layer_freq=0), r"moe_layer_freq"),
    (dict(use_moe=True, moe_intermediate_size=-1), r"intermediate_size"),
    (dict(hidden_size=32.5), r"hidden_size.*integer"),
    (dict(num_hidden_layers="2"), r"num_hidden_layers.*integer"),
    (dict(vocab_size=None), r"vocab_size.*integer"),
    (dict(intermediate_size=2**40), r"intermediate_size"),
    (dict(vocab_size=2**31), r"vocab_size"),
    (dict(rope_theta=0.0), r"rope_theta"),
    (dict(rope_theta="big"), r"rope_theta"),
    (dict(rms_norm_eps=-1.0), r"rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), r"rms_norm_eps"),
], ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None)
def test_bad_config_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        MoELlamaForCausalLM(small_config(overrides), seed=0)


def test_bad_config_from_attribute_object():
    obj = types.SimpleNamespace(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, kv_lora_rank=4)  # nkv defaults to 2 // 4 = 0
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MoELlamaForCausalLM(obj, seed=0)


@pytest.mark.parametrize("config", [5, 2.5, "config.json", [1, 2], b"{}"],
                         ids=["int", "float", "str", "list", "bytes"])
def test_config_of_the_wrong_kind(config):
    with pytest.raises((ValueError, TypeError), match="config"):
        MoELlamaForCausalLM(config, seed=0)


@pytest.mark.parametrize("moe", ["moe", [1, 2], 3], ids=["str", "list", "int"])
def test_moe_config_of_the_wrong_kind(moe):
    with pytest.raises((ValueError, TypeError), match="moe_config"):
        MoELlamaForCausalLM(small_config(), moe, seed=0)


def test_unknown_config_override():
    with pytest.raises(ValueError, match="no_such_field"):
        MoELlamaForCausalLM.from_pretrained(TINY_RING, no_such_field=1)


@pytest.mark.parametrize("dtype", ["float64", "fp8", "int2", "", "Float32x"])
def test_unknown_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        MoELlamaForCausalLM(small_config(), dtype=dtype, seed=0)


def test_unknown_dtype_in_to_and_save(built, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        built.model.to(dtype="float64")
    with pytest.raises(ValueError, match="dtype"):
        built.model.save_pretrained(tmp_path, dtype="int8x")
    assert str(built.model.dtype).replace("torch.", "") == "float32"  # a name, or torch.float32


@pytest.mark.parametrize("device", ["tpu", "cpu:1", "cuda:x", "gpu", "", "cuda:-1"])
def test_unknown_device(device):
    with pytest.raises(ValueError, match="device"):
        MoELlamaForCausalLM(small_config(), device=device, seed=0)


def test_unknown_device_in_to(built):
    with pytest.raises(ValueError, match="device"):
        built.model.to("tpu")
    assert str(built.model.device) == "cpu"


# ---------------------------------------------------------------- load_state_dict

def test_state_dict_missing_tensor(built):
    sd = {k: v for k, v in built.weights.items() if k != "model.layers.1.self_attn.o_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        MoELlamaForCausalLM(built.config, seed=0).load_state_dict(sd)


def test_state_dict_misshaped_tensor(built):
    sd = dict(built.weights)
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((64, 15), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight.*\[64, 15\].*\[64, 16\]"):
        MoELlamaForCausalLM(built.config, seed=0).load_state_dict(sd)
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((64 * 16,), np.float32)
    with pytest.raises(ValueError, match=r"kv_b_proj"):
        MoELlamaForCausalLM(built.config, seed=0).load_state_dict(sd)


def test_state_dict_non_float_tensor(built):
    sd = dict(built.weights)
    sd["model.norm.weight"] = np.ones(32, np.int32)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        MoELlamaForCausalLM(built.config, seed=0).load_state_dict(sd)


def test_failed_load_state_dict_leaves_weights_alone(built):
    m = MoELlamaForCausalLM(built.config, seed=0)
    m.load_state_dict(built.weights)
    ids = built.ids(1, 6)
    before = m(ids).logits
    sd = dict(built.weights)
    sd = {k: v * 2 for k, v in sd.items()}
    sd["model.norm.weight"] = np.zeros(7, np.float32)  # the last tensor is bad
    with pytest.raises(ValueError, match="model.norm.weight"):
        m.load_state_dict(sd)
    np.testing.assert_array_equal(m(ids).logits, before)


# ---------------------------------------------------------------- checkpoints on disk

def _ckpt(tmp_path, built, weights=None, dtypes=None):
    return write_checkpoint(tmp_path / "ckpt", built.config, built.weights if weights is None else weights, dtypes)


def test_checkpoint_missing_tensor(tmp_path, built):
    w = {k: v for k, v in built.weights.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        MoELlamaForCausalLM.from_pretrained(_ckpt(tmp_path, built, w))


def test_checkpoint_misshaped_tensor(tmp_path, built):
    w = dict(built.weights)
    w["model.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ValueError, match=r"q_proj\.weight.*\[32, 31\].*\[32, 32\]"):
        MoELlamaForCausalLM.from_pretrained(_ckpt(tmp_path, built, w))


def test_checkpoint_for_another_config(tmp_path, built):
    """Untied config, tied checkpoint: lm_head.weight is missing."""
    d = _ckpt(tmp_path, built)
    with pytest.raises(ValueError, match="lm_head.weight"):
        MoELlamaForCausalLM.from_pretrained(d, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="router"):
        MoELlamaForCausalLM.from_pretrained(d, use_moe=True)


@pytest.mark.parametrize("tag", ["F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "float32"])
def test_checkpoint_unknown_dtype(tmp_path, built, tag):
    name = "model.layers.0.input_layernorm.weight"
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(built.config))
    header, blobs, off = {}, [], 0
    for k in sorted(built.weights):
        a = built.weights[k]
        if k == name:
            size = {"F64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}.get(tag, 4)
            raw = bytes(size * a.size)
            header[k] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        else:
            raw = a.astype("<f4").tobytes()
            header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    write_raw_safetensors(d / "model.safetensors", json.dumps(header).encode(), b"".join(blobs))
    with pytest.raises(ValueError, match=rf"{name}.*{tag}"):
        MoELlamaForCausalLM.from_pretrained(d)


def test_unknown_dtype_of_an_ignored_tensor_is_fine(tmp_path, built):
    d = _ckpt(tmp_path, built)
    w = dict(built.weights, **{"extra.counter": np.zeros(4, np.float32)})
    write_safetensors(os.path.join(d, "model.safetensors"), w, dtypes={"extra.counter": "I32"})
    MoELlamaForCausalLM.from_pretrained(d)


# ---- corrupt safetensors files, built by hand

def _one_tensor_header(**entry):
    e = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    e.update(entry)
    return json.dumps({"model.norm.weight": e}).encode()


CORRUPT = {
    # name: (header bytes, data bytes, header length override, message pattern)
    "shorter_than_8_bytes": (None, b"\x01\x02\x03", None, r"truncated|8 bytes|header length"),
    "empty_file": (None, b"", None, r"truncated|8 bytes|header length"),
    "header_length_past_end": (b'{"a":1}', b"", 1000, r"header length.*past the end"),
    "header_length_2^63": (b'{}', b"", 2**63, r"header length"),
    "header_length_2^64-1": (b'{}', b"", 2**64 - 1, r"header length"),
    "malformed_json": (b'{"model.norm.weight": {"dtype": "F32", "shape": [2, 2], ', bytes(16), None, r"header"),
    "not_json_at_all": (b"\x89PNG\r\n\x1a\n garbage", bytes(16), None, r"header"),
    "json_array": (b"[1, 2, 3]", bytes(16), None, r"header"),
    "unterminated_string": (b'{"model.norm', bytes(16), None, r"header"),
    "nul_in_header": (b'{"a\x00b": 1}', bytes(16), None, r"header"),
    "offsets_outside_data": (_one_tensor_header(data_offsets=[0, 4096]), bytes(16), None,
                             r"model\.norm\.weight.*offsets.*outside"),
    "offsets_reversed": (_one_tensor_header(data_offsets=[16, 0]), bytes(16), None, r"model\.norm\.weight.*offsets"),
    "offsets_2^64": (_one_tensor_header(data_offsets=[0, 18446744073709551616]), bytes(16), None, r"header|offset"),
    "offsets_negative": (_one_tensor_header(data_offsets=[-16, 0]), bytes(16), None, r"header|offset"),
    "offsets_missing": (json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [4]}}).encode(), bytes(16),
                        None, r"data_offsets"),
    "size_not_matching_shape": (_one_tensor_header(shape=[3, 2]), bytes(16), None,
                                r"model\.norm\.weight.*16 bytes.*24"),
    "shape_negative": (_one_tensor_header(shape=[-2, 2]), bytes(16), None, r"header"),
    "shape_overflow": (_one_tensor_header(shape=[2**40, 2**40, 2**40]), bytes(16), None,
                       r"model\.norm\.weight.*too large"),
    "trailing_garbage": (_one_tensor_header() + b"  }}junk", bytes(16), None, r"after the JSON object"),
    "duplicate_name": (b'{"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                       b'"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
                       bytes(16), None, r"model\.norm\.weight.*twice"),
    "overlapping_ranges": (json.dumps({
        "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }).encode(), bytes(24), None, r"overlapping"),
    "nested_too_deep": (b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}", b"", None, r"header"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_safetensors(tmp_path, built, case):
    header, data, hlen, match = CORRUPT[case]
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(built.config))
    path = d / "model.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        write_raw_safetensors(path, header, data, hlen)
    with pytest.raises(ValueError, match=match):
        MoELlamaForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match=match):
        xoron._C.read_safetensors_header(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_real_checkpoint(tmp_path, keep):
    d = tmp_path / "tiny"
    shutil.copytree(TINY_RING, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(ValueError, match=r"outside.*(truncated|corrupt)"):
        MoELlamaForCausalLM.from_pretrained(d)


def test_truncated_inside_the_header(tmp_path):
    d = tmp_path / "tiny"
    shutil.copytree(TINY_RING, d)
    f = d / "model.safetensors"
    (hlen,) = struct.unpack("<Q", f.read_bytes()[:8])
    f.write_bytes(f.read_bytes()[:8 + hlen // 2])
    with pytest.raises(ValueError, match="header length"):
        MoELlamaForCausalLM.from_pretrained(d)


# ---- paths that are not checkpoints

def test_missing_directory(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError, OSError), match="nope"):
        MoELlamaForCausalLM.from_pretrained(tmp_path / "nope")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    shutil.copy(os.path.join(TINY_RING, "model.safetensors"), f)
    with pytest.raises((ValueError, OSError), match="checkpoint"):
        MoELlamaForCausalLM.from_pretrained(f)


def test_directory_without_config(tmp_path):
    shutil.copy(os.path.join(TINY_RING, "model.safetensors"), tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        MoELlamaForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    shutil.copy(os.path.join(TINY_RING, "config.json"), tmp_path)
    with pytest.raises(ValueError, match="model.safetensors"):
        MoELlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [("{not json", "JSON"), ("[1, 2]", "object"), ("", "JSON")],
                         ids=["malformed", "array", "empty"])
def test_bad_config_json(tmp_path, text, match):
    shutil.copy(os.path.join(TINY_RING, "model.safetensors"), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        MoELlamaForCausalLM.from_pretrained(tmp_path)


def test_config_json_with_impossible_values(tmp_path):
    shutil.copytree(TINY_RING, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MoELlamaForCausalLM.from_pretrained(tmp_path / "c")


def test_index_naming_a_missing_shard(tmp_path, built):
    (tmp_path / "config.json").write_text(json.dumps(built.config))
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", built.weights)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        MoELlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("index", ["{broken", "{}", '{"weight_map": []}'], ids=["malformed", "no_map", "list_map"])
def test_bad_index_json(tmp_path, built, index):
    (tmp_path / "config.json").write_text(json.dumps(built.config))
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match="index.json"):
        MoELlamaForCausalLM.from_pretrained(tmp_path)


def test_weights_file_is_a_directory(tmp_path, built):
    (tmp_path / "config.json").write_text(json.dumps(built.config))
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises((ValueError, OSError), match="model.safetensors"):
        MoELlamaForCausalLM.from_pretrained(tmp_path)
