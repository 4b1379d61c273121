"""Model configuration: reading it the way the original module did (SPEC section 1)."""
from __future__ import annotations

import copy
import json
import os

# SPEC section 1: every config field and its default. This is the one table: LlamaConfig,
# the dict handed to the C engine (which has no defaults of its own) and the PyTorch reference
# model (xoron.torch_reference) all read it. num_key_value_heads has no entry because its
# default depends on the source (num_attention_heads from a dict, // 4 from a bare object).
DEFAULTS = {
    "vocab_size": 151643,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_ring_attention": True,
    "ring_attention_chunk_size": 4096,
    "kv_lora_rank": 512,
    "q_lora_rank": 0,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
MOE_DEFAULTS = {"use_moe": False, "num_experts": 8, "num_experts_per_tok": 2, "moe_layer_freq": 2}
MOE_FIELDS = ("use_moe", "num_experts", "num_experts_per_tok", "moe_layer_freq", "intermediate_size")

# Xoron-Dev multimodal config.json names -> ours.
XORON_DEV_RENAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
XORON_DEV_MOE = ("use_moe", "num_experts", "num_experts_per_tok", "moe_layer_freq")


class LlamaConfig:
    """The Xoron MoE-LLaMA configuration, with the field names of `transformers.LlamaConfig`.

    Fields left out take the SPEC section 1 defaults (num_key_value_heads = num_attention_heads).
    `moe_config` is a dict with use_moe, num_experts, num_experts_per_tok, moe_layer_freq and
    intermediate_size.
    """

    def __init__(self, **kwargs):
        values = dict(DEFAULTS)
        values.update(kwargs)
        if "num_key_value_heads" not in kwargs or kwargs["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        values.setdefault("moe_config", None)
        for k, v in values.items():
            setattr(self, k, v)

    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        return d

    def __repr__(self):
        return "LlamaConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __eq__(self, other):
        return isinstance(other, LlamaConfig) and self.to_dict() == other.to_dict()


# Values that are certainly not a config object (getattr on them would silently give the
# default 1024-wide, 12-layer model).
_NOT_A_CONFIG = (str, bytes, bytearray, int, float, complex, list, tuple, set, frozenset)


def _check_kind(obj, what: str, hint: str = "") -> None:
    import numpy as np
    if isinstance(obj, _NOT_A_CONFIG) or isinstance(obj, (np.generic, np.ndarray)):
        raise TypeError(f"{what} must be a dict, a LlamaConfig or an object with its attributes, "
                        f"got {type(obj).__name__} {obj!r:.60}{hint}")


def resolve_config(config, moe_config=None, overrides=None) -> LlamaConfig:
    """Reads a transformers/xoron LlamaConfig, any object with those attributes, or a dict
    (config.json style, optionally in the Xoron-Dev layout) into a LlamaConfig."""
    try:
        return _resolve_config(config, moe_config, overrides)
    except RecursionError:
        raise ValueError("config is nested too deeply to be a model configuration") from None


def _resolve_config(config, moe_config, overrides) -> LlamaConfig:
    if config is None:
        config = {}
    _check_kind(config, "config", " (to load a checkpoint directory use MoELlamaForCausalLM.from_pretrained(path))"
                if isinstance(config, (str, bytes)) else "")
    if isinstance(config, LlamaConfig):
        src = config.to_dict()
        values = {k: src.get(k, v) for k, v in DEFAULTS.items()}
        values["num_key_value_heads"] = src.get("num_key_value_heads", values["num_attention_heads"])
        moe_src = src.get("moe_config")
    elif isinstance(config, dict):
        d = dict(config)
        xoron_dev = "num_layers" in d and "num_hidden_layers" not in d
        for old, new in XORON_DEV_RENAMES.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        values = {k: d.get(k, v) for k, v in DEFAULTS.items()}
        if xoron_dev:
            values["num_key_value_heads"] = values["num_attention_heads"]
            moe_src = {k: d[k] for k in XORON_DEV_MOE if k in d}
            moe_src.setdefault("use_moe", MOE_DEFAULTS["use_moe"])
            moe_src["intermediate_size"] = values["intermediate_size"]
        else:
            values["num_key_value_heads"] = d.get("num_key_value_heads", values["num_attention_heads"])
            moe_src = d.get("moe_config")
    else:  # a config object: getattr with the original's defaults
        values = {k: getattr(config, k, v) for k, v in DEFAULTS.items()}
        values["num_key_value_heads"] = getattr(config, "num_key_value_heads", None)
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"] // 4
        moe_src = getattr(config, "moe_config", None)
    if moe_config is not None:
        moe_src = moe_config
    if moe_src is None:
        moe = dict(MOE_DEFAULTS, intermediate_size=values["intermediate_size"])
    else:
        if not isinstance(moe_src, dict):
            _check_kind(moe_src, "moe_config")
            moe_src = {k: getattr(moe_src, k) for k in MOE_FIELDS if hasattr(moe_src, k)}
        moe = {k: moe_src.get(k, v) for k, v in MOE_DEFAULTS.items()}
        moe["intermediate_size"] = moe_src.get("intermediate_size", values["intermediate_size"])
    for k, v in (overrides or {}).items():
        if k in MOE_FIELDS and k != "intermediate_size":
            moe[k] = v
        elif k == "moe_config":
            if not isinstance(v, dict):
                _check_kind(v, "moe_config")
                v = {f: getattr(v, f) for f in MOE_FIELDS if hasattr(v, f)}
            moe.update(v)
        elif k == "moe_intermediate_size":
            moe["intermediate_size"] = v
        elif k in values or k == "num_key_value_heads":
            values[k] = v
        else:
            raise ValueError(f"unknown config field '{k}'")
    values["moe_config"] = moe
    return LlamaConfig(**values)


def engine_dict(cfg: LlamaConfig) -> dict:
    """The flat dict the C engine reads (xoron._C.Model)."""
    moe = cfg.moe_config or {}
    d = {k: getattr(cfg, k) for k in DEFAULTS if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    d["num_key_value_heads"] = cfg.num_key_value_heads
    for k, v in MOE_DEFAULTS.items():
        d[k] = moe.get(k, v)
    d["use_moe"] = bool(d["use_moe"])
    d["moe_intermediate_size"] = moe.get("intermediate_size", cfg.intermediate_size)
    return d


def read_config_json(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to be a model configuration") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
