"""Checkpoint directories as found in the wild: which files hold the language model, the
keywords people pass to from_pretrained, and writing config.json + (sharded) weights that
transformers can read back."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from . import _C
from ._safetensors_io import save_file
from .config import read_config_json

# Xoron-Dev's save_pretrained(save_separately=True) writes each component on its own.
SEPARATE_LLM_FILE = "llm.safetensors"
TORCH_BIN_FILE = "pytorch_model.bin"

GQA_BRANCH_MESSAGE = (
    "{where} is a checkpoint of the Xoron-Dev `main` branch, whose language model uses grouped-query "
    "attention (separate k_proj/v_proj) with a sliding window; xoron implements the MLA model "
    "(kv_a_proj/kv_b_proj, see docs/MODEL.md) and cannot load it")

# config.json fields that describe the file, rewritten by every save_pretrained
FILE_METADATA = ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version")

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def weight_files(path: str) -> tuple[list, str]:
    """(files, kind): kind is "safetensors" or "torch" (a pytorch_model.bin)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return [single], "safetensors"
    if os.path.exists(index):
        idx = read_config_json(index)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index}: no weight_map")
        files = []
        for f in wm.values():
            if not isinstance(f, str):
                raise ValueError(f"{index}: weight_map values must be file names, got {type(f).__name__}")
            full = os.path.join(path, f)
            if full not in files:
                if not os.path.exists(full):
                    raise ValueError(f"{index} names {f!r}, which does not exist")
                files.append(full)
        return files, "safetensors"
    separate = os.path.join(path, SEPARATE_LLM_FILE)
    if os.path.exists(separate):
        return [separate], "safetensors"
    if os.path.exists(os.path.join(path, TORCH_BIN_FILE)):
        return [os.path.join(path, TORCH_BIN_FILE)], "torch"
    raise ValueError(f"{path!r} is not a checkpoint: it has no model.safetensors, model.safetensors.index.json, "
                     f"{SEPARATE_LLM_FILE} (Xoron-Dev components saved separately) or {TORCH_BIN_FILE}")


def safetensors_names(files: list) -> list:
    """[(name, dtype, shape)] over every shard."""
    out = []
    for f in files:
        out.extend(_C.read_safetensors_header(f))
    return out


def tensor_prefix(names) -> str:
    """'llm.' for Xoron-Dev multimodal checkpoints, '' otherwise."""
    names = list(names)
    if any(n.startswith("model.") or n == "lm_head.weight" for n in names):
        return ""
    if any(n.startswith("llm.model.") for n in names):
        return "llm."
    return ""


def check_not_gqa_branch(names, where: str) -> None:
    """The Xoron-Dev main-branch LLM (GQA, sliding window) has k_proj/v_proj and no kv_a_proj."""
    names = list(names)
    has_kv = any(n.endswith("self_attn.k_proj.weight") or n.endswith("self_attn.v_proj.weight") for n in names)
    has_mla = any(n.endswith("self_attn.kv_a_proj.weight") for n in names)
    if has_kv and not has_mla:
        raise ValueError(GQA_BRANCH_MESSAGE.format(where=where))


def dtype_from_checkpoint(raw_config: dict, names) -> str:
    """torch_dtype="auto": the config's torch_dtype, else the dtype the tensors are stored in."""
    declared = raw_config.get("torch_dtype") or raw_config.get("dtype")
    if isinstance(declared, str) and declared.replace("torch.", "") in ("float32", "bfloat16", "float16"):
        return declared.replace("torch.", "")
    for _, dt, shape in names:
        if dt in _SAFETENSORS_DTYPES and len(shape) == 2:
            return _SAFETENSORS_DTYPES[dt]
    return "float32"


def single_device(device, device_map):
    """device_map naming one device (a string, torch.device, GPU index, {"": device} or a map
    whose values all name the same device; "auto": the first GPU when torch sees one and this
    build has the CUDA plugin, else the CPU) folded into `device`."""
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        targets = {str(_index_to_device(v)) for v in device_map.values()}
        if len(targets) != 1:
            raise ValueError(f"device_map spreads the model over {sorted(targets)}; xoron runs the whole model on "
                             "one device: give one device (e.g. device_map='cuda:0')")
        chosen = targets.pop()
    elif device_map == "auto":
        chosen = "cpu"
        torch = sys.modules.get("torch")
        from . import cuda_available
        if torch is not None and cuda_available() and torch.cuda.is_available():
            chosen = "cuda:0"
    elif device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} spreads a model over several devices; xoron runs the whole "
                         "model on one device: give one device (e.g. device_map='cuda:0')")
    else:
        chosen = str(_index_to_device(device_map))
    if device is not None and str(device) != "cpu" and str(device) != chosen:
        raise ValueError(f"device={device!r} and device_map={device_map!r} name different devices")
    return chosen


def _index_to_device(v):
    if isinstance(v, bool):
        raise ValueError(f"device_map value {v!r} is not a device")
    if isinstance(v, (int, np.integer)):
        return f"cuda:{int(v)}"
    if type(v).__name__ == "device" or isinstance(v, str):
        return str(v)
    raise ValueError(f"device_map value {v!r} is not a device")


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """max_shard_size as transformers takes it: bytes, or "5GB" / "500MB" / "2GiB"."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a size such as 5GB or a number of bytes, got {size!r}")
    if isinstance(size, (int, np.integer)):
        n = int(size)
    elif isinstance(size, str) and _SIZE.match(size):
        num, unit = _SIZE.match(size).groups()
        n = int(float(num) * _UNITS[(unit or "B").upper()])
    else:
        raise ValueError(f"max_shard_size must be a size such as 5GB or a number of bytes, got {size!r}")
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def auto_config_dict(config_dict: dict, dtype: str) -> dict:
    """config.json that transformers.AutoConfig reads: a LlamaConfig (model_type "llama") that
    carries our extra fields (moe_config, kv_lora_rank, ...) as attributes."""
    d = {}
    for k, v in config_dict.items():
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)  # e.g. a torch.dtype kept from the given config object
        d[k] = v
    d["model_type"] = "llama"
    d.setdefault("architectures", ["MoELlamaForCausalLM"])
    d["torch_dtype"] = dtype
    return d


def save_weights(path: str, tensors: dict, *, bfloat16: bool, safe_serialization: bool, max_shard_size) -> list:
    """Writes model.safetensors, or shards of at most max_shard_size bytes with
    model.safetensors.index.json (or pytorch_model.bin when not safe_serialization). Returns
    the files written."""
    if not safe_serialization:
        torch = sys.modules.get("torch")
        if torch is None:
            raise ValueError("safe_serialization=False writes pytorch_model.bin, which needs torch; "
                             "install torch or keep safe_serialization=True")
        out = os.path.join(path, TORCH_BIN_FILE)
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        if bfloat16:
            sd = {k: v.bfloat16() for k, v in sd.items()}
        torch.save(sd, out)
        return [out]
    limit = parse_size(max_shard_size)
    itemsize = 2 if bfloat16 else None
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        a = tensors[name]
        nbytes = a.size * (itemsize or a.dtype.itemsize)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = a
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        out = os.path.join(path, "model.safetensors")
        save_file(shards[0], out, metadata=meta, bfloat16=bfloat16)
        return [out]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta, bfloat16=bfloat16)
        files.append(os.path.join(path, fname))
        for name, a in shard.items():
            weight_map[name] = fname
            total += a.size * (itemsize or a.dtype.itemsize)
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def read_torch_bin(path: str) -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811  (only to read a pytorch_model.bin)
        except ImportError:
            raise ValueError(f"{path} is a torch pickle; reading it needs torch (or convert it to safetensors)") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    return sd
