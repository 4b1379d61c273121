"""Model.weight_views(): the engine's weights as views of its own storage (no torch needed)."""
import gc

import numpy as np

from conftest import R, TOL_F32, make_model, rel_err
from xoron.modeling import MoELlamaForCausalLM as NumpyModel

MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2)


def views(model):
    return {name: (view, dtype, is_view) for name, view, dtype, is_view in model._engine.weight_views()}


def test_views_are_the_weights_the_engine_runs_with():
    built = make_model(dict(MOE), seed=4, model_class=NumpyModel)
    v = views(built.model)
    assert set(v) == set(built.weights)
    for name, (a, dtype, is_view) in v.items():
        assert dtype == "float32" and is_view and a.base is built.model._engine, name
        np.testing.assert_array_equal(a, built.weights[name], err_msg=name)
    gate, up = v["model.layers.0.mlp.gate_proj.weight"][0], v["model.layers.0.mlp.up_proj.weight"][0]
    assert up.__array_interface__["data"][0] == gate.__array_interface__["data"][0] + gate.nbytes
    v["model.layers.1.mlp.experts.2.up_proj.weight"][0][:] *= 2.0
    v["model.layers.0.self_attn.kv_a_proj.weight"][0][:5] += 0.05
    edited = {k: np.array(a) for k, (a, _, _) in v.items()}
    ids = built.ids(2, 6)
    assert rel_err(built.model(input_ids=ids).logits, R.forward(built.cfg, edited, ids)[0]) <= TOL_F32


def test_views_keep_the_engine_alive():
    m = NumpyModel(dict(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, kv_lora_rank=4), seed=0)
    want = m.state_dict()["model.norm.weight"]
    norm = views(m)["model.norm.weight"][0]
    del m
    gc.collect()
    np.testing.assert_array_equal(norm, want)


def test_bfloat16_views_hold_the_bits_and_int8_gives_marked_copies():
    built = make_model(dict(MOE), seed=4, model_class=NumpyModel)
    m = built.model.bfloat16()
    sd = m.state_dict()
    q, dtype, is_view = views(m)["model.layers.0.self_attn.q_proj.weight"]
    assert dtype == "bfloat16" and is_view and q.dtype == np.uint16
    np.testing.assert_array_equal((q.astype(np.uint32) << 16).view(np.float32),
                                  sd["model.layers.0.self_attn.q_proj.weight"])
    norm, dtype, is_view = views(m)["model.norm.weight"]
    assert dtype == "float32" and is_view  # norms stay float32
    m.quantize("int8")
    v = views(m)
    q, dtype, is_view = v["model.layers.0.self_attn.q_proj.weight"]
    assert dtype == "int8" and not is_view and q.dtype == np.float32 and q.base is None
    np.testing.assert_array_equal(q, m.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    router = v["model.layers.1.mlp.router.gate.weight"]
    assert router[1] == "float32" and router[2]  # the router stays float32 under int8
