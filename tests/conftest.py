"""Shared test helpers: small random models checked against the numpy oracle.

Plain functions (import them with `from conftest import make_model, rel_err, ...`) plus a
few fixtures. Keep this file small and stable: many test files depend on it.

    m = make_model({"hidden_size": 32, "num_key_value_heads": 2}, seed=3)
    logits, loss = m.ref(ids, labels=labels)           # float64 oracle
    out = m.model(input_ids=ids, labels=labels)         # the engine
    assert rel_err(out.logits, logits) <= TOL_F32
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import reference_impl as R  # noqa: E402

DATA_DIR = os.path.join(HERE, "data")
TINY_RING = os.path.join(DATA_DIR, "tiny_ring")  # checkpoint + expected.npz from the original module

TOL_F32 = 1e-4   # SPEC section 8, logits (relative to max|ref|) and loss (absolute)
TOL_HALF = 3e-2  # SPEC section 8, bfloat16 / float16 compute

# A deliberately tiny model: every test that builds one should run in milliseconds. The
# fields it does not shrink keep the SPEC defaults, read from the package's one table.
def _small() -> dict:
    from xoron.config import DEFAULTS

    d = {k: v for k, v in DEFAULTS.items() if not k.endswith("_token_id")}
    d.update(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16)
    d["moe_config"] = {"use_moe": False, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_layer_freq": 2, "intermediate_size": 40}
    return d


SMALL = _small()


def small_config(overrides: dict | None = None, **kw) -> dict:
    """SMALL updated by `overrides`/`kw` (config.json style). MoE keys (use_moe, num_experts,
    num_experts_per_tok, moe_layer_freq, moe_intermediate_size) go into moe_config."""
    d = json.loads(json.dumps(SMALL))
    moe_keys = {"use_moe": "use_moe", "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                "moe_layer_freq": "moe_layer_freq", "moe_intermediate_size": "intermediate_size"}
    for k, v in dict(overrides or {}, **kw).items():
        if k in moe_keys:
            d["moe_config"][moe_keys[k]] = v
        elif k == "moe_config":
            d["moe_config"].update(v)
        else:
            d[k] = v
    return d


def rel_err(got, ref) -> float:
    """max|got - ref| / max|ref| (SPEC section 8). Accepts numpy arrays or torch tensors."""
    got = _np(got).astype(np.float64)
    ref = _np(ref).astype(np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _np(x) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


@dataclass
class Built:
    """A random model twice over: the engine (`model`) and the oracle (`cfg`, `weights`)."""
    model: Any                      # xoron.MoELlamaForCausalLM
    cfg: R.RefConfig
    weights: dict                   # {SPEC name: float32 ndarray}
    config: dict                    # the config.json-style dict it was built from

    def ref(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kw):
        """(logits float64, loss or None) of the numpy oracle."""
        return R.forward(self.cfg, self.weights, input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, labels=labels, **kw)

    def ids(self, b: int, t: int, seed: int = 0) -> np.ndarray:
        return random_ids(self.cfg.vocab_size, b, t, seed)


# reference_impl.random_weights draws linears with std 0.02, which leaves attention scores
# near 0 (uniform attention) and every layer's contribution tiny beside the embeddings: a
# wrong rotary table would then move the logits by ~1e-6, below the 1e-4 tolerance. These
# factors bring scores and layer outputs to O(1) so such mistakes show up (a rope_theta
# change moves the logits by >3e-3, a skipped layer by >0.1).
BOOST = {"q_proj": 10.0, "q_b_proj": 10.0, "kv_b_proj": 10.0, "o_proj": 4.0,
         "gate_proj": 6.0, "up_proj": 6.0, "down_proj": 4.0}


def random_weights(cfg: R.RefConfig, seed: int = 0, boost: bool = True) -> dict:
    """reference_impl.random_weights, with BOOST applied unless boost=False."""
    w = R.random_weights(cfg, seed)
    if boost:
        for name, a in w.items():
            kind = name.rsplit(".", 2)[-2]
            if kind in BOOST:
                w[name] = (a * np.float32(BOOST[kind])).astype(np.float32)
    return w


def make_model(cfg_dict: dict | None = None, seed: int = 0, *, dtype: str = "float32", boost: bool = True,
               device: str = "cpu", model_class=None, **kw) -> Built:
    """Builds RefConfig + random_weights(seed) (reference_impl's, boosted, see BOOST) and loads
    them into xoron.MoELlamaForCausalLM (or `model_class`, e.g. the numpy class
    xoron.modeling.MoELlamaForCausalLM) on `device` via load_state_dict(strict=True).
    `cfg_dict` and `kw` are applied on top of SMALL (see small_config)."""
    import xoron

    config = small_config(cfg_dict, **kw)
    cfg = R.RefConfig.from_dict(config)
    weights = random_weights(cfg, seed, boost)
    model = (model_class or xoron.MoELlamaForCausalLM)(config, dtype=dtype, device=device, seed=0)
    model.load_state_dict(weights, strict=True)
    return Built(model, cfg, weights, config)


def random_ids(vocab: int, b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t), dtype=np.int64)


def write_safetensors(path, tensors: dict, dtypes: dict | None = None, metadata: dict | None = None) -> None:
    """Writes a safetensors file by hand. `dtypes` maps a name to "F32" (default), "F16" or
    "BF16" (round to nearest even), or any other tag, for which the float32 bytes are written."""
    dtypes = dtypes or {}
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, off = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        tag = dtypes.get(name, "F32")
        if tag == "F16":
            raw = a.astype("<f2").tobytes()
        elif tag == "BF16":
            u = a.view(np.uint32).astype(np.uint64)
            raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            raw = a.astype("<f4").tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    write_raw_safetensors(path, json.dumps(header).encode(), b"".join(blobs))


def write_raw_safetensors(path, header: bytes, data: bytes, header_len: int | None = None) -> None:
    """8-byte little-endian header length (default: len(header)), header bytes, data bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if header_len is None else header_len))
        f.write(header)
        f.write(data)


def write_checkpoint(directory, config: dict, weights: dict, dtypes: dict | None = None) -> str:
    """config.json + model.safetensors in `directory` (created). Returns the path as str."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights, dtypes)
    return directory


# ---------------------------------------------------------------- fixtures


def _devices() -> list:
    import xoron

    no_gpu = pytest.mark.skipif(not xoron.cuda_available(),
                                reason="no usable CUDA device (no GPU or driver, or xoron built without CUDA)")
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, no_gpu])]


# Every device a test taking the `device` fixture runs on; "cuda" skips without a GPU.
DEVICES = _devices()


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> str:
    """Runs the test once per device: "cpu" always, "cuda" where a GPU is usable. Session-scoped
    so that module-scoped fixtures (a loaded checkpoint) can take it too."""
    return request.param


@pytest.fixture(scope="session")
def tiny_ring_dir() -> str:
    return TINY_RING


@pytest.fixture(scope="session")
def tiny_ring_expected() -> dict:
    return dict(np.load(os.path.join(TINY_RING, "expected.npz")))


@pytest.fixture
def small_model() -> Built:
    """A dense 2-layer SMALL model (fresh per test, so tests may modify it)."""
    return make_model(seed=0)
