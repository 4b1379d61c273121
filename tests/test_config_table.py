"""The SPEC section 1 defaults live in one table (xoron.config): every other reader agrees with
it, and the C engine has no defaults of its own to drift from it."""
import pytest

import reference_impl as R
from conftest import SMALL

import xoron
from xoron.config import DEFAULTS, MOE_DEFAULTS, LlamaConfig, engine_dict, resolve_config

# SPEC section 1, written out once here so that a change to the table is a visible decision.
SPEC_DEFAULTS = {
    "vocab_size": 151643, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 16, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "use_ring_attention": True,
    "ring_attention_chunk_size": 4096, "kv_lora_rank": 512, "q_lora_rank": 0,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
}
SPEC_MOE_DEFAULTS = {"use_moe": False, "num_experts": 8, "num_experts_per_tok": 2, "moe_layer_freq": 2}


def test_the_table_is_spec_section_1():
    assert DEFAULTS == SPEC_DEFAULTS
    assert MOE_DEFAULTS == SPEC_MOE_DEFAULTS


def test_torch_reference_reads_the_table():
    pytest.importorskip("torch")
    from xoron.torch_reference import resolve_config as torch_resolve

    cfg = torch_resolve({})
    for k, v in DEFAULTS.items():
        assert cfg[k] == v, k
    for k, v in MOE_DEFAULTS.items():
        assert cfg[k] == v, k
    assert cfg["num_key_value_heads"] == DEFAULTS["num_attention_heads"]
    assert cfg["moe_intermediate_size"] == DEFAULTS["intermediate_size"]


def test_numpy_oracle_defaults_agree_with_the_table():
    """The oracle keeps its own copy on purpose (it must not share code with the engine); this
    keeps the copy honest."""
    ref = R.RefConfig()
    for k, v in DEFAULTS.items():
        if hasattr(ref, k):
            assert getattr(ref, k) == v, k
    for k, v in MOE_DEFAULTS.items():
        assert getattr(ref, k) == v, k


def test_engine_dict_of_an_empty_config_is_the_table():
    d = engine_dict(resolve_config({}))
    for k, v in DEFAULTS.items():
        if not k.endswith("_token_id"):
            assert d[k] == v, k
    for k, v in MOE_DEFAULTS.items():
        assert d[k] == v, k
    assert d["moe_intermediate_size"] == DEFAULTS["intermediate_size"]
    assert LlamaConfig().to_dict() == {**DEFAULTS, "num_key_value_heads": 16, "moe_config": None}


@pytest.mark.parametrize("field", sorted(engine_dict(resolve_config(SMALL))))
def test_the_engine_has_no_defaults_of_its_own(field):
    """Every field must come from Python (the table): a missing one is an error, not a C default."""
    d = engine_dict(resolve_config(SMALL))
    del d[field]
    with pytest.raises(ValueError, match=f"missing field '{field}'"):
        xoron._C.Model(d, "float32", "cpu")
