"""The attention steps the kernel table fuses for a decode step (csrc/backends/backend.h):
matmul_pair (q and kv_a from one x in one launch, q rotated as it is stored when it comes
straight from x), rmsnorm_cache_write (the latent normed into its cache slot) and
rope_kv_cache_write (K rotated, K and V into their caches). The CUDA kernels (gemm.cu,
elementwise.cu) take few rows in one launch and fall back to the plain entries beyond; the CPU
runs the defaults of backends/defaults.c, composed from the plain entries.

Kernel level (xoron._testing's hooks, through ctypes; on the CPU and, marked `cuda`, on the
GPU): each entry against its default composition on the same backend and against a float64
numpy oracle, for rows on both sides of the skinny limit (8), every storage dtype, positions
beyond the 8192 the YaRN frequencies were trained for, start slots from the host or the device.
Model level (GPU): decode steps through both cache formats, q_lora_rank 0 and > 0, batch 1 and
batch > 8, against the full forward and the oracle, and generate()'s replayed decode graphs
against a step-by-step loop. Float32 within 1e-4; 16-bit caches within one rounding of the
stored type.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import reference_impl as R  # noqa: E402
import xoron  # noqa: E402
from conftest import DEVICES  # noqa: E402
from test_cuda import GPU_OK, GPU_WHY, TOL_F32, _config, build, ids_for, rel_err, rounded  # noqa: E402
from xoron import _testing  # noqa: E402

needs_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
DTYPE_CODE = {"float32": 1, "float16": 2, "bfloat16": 3}  # xo_dtype
# a value stored as 16 bits is within this much of itself, relative (round to nearest)
STORE_TOL = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SKINNY_MAX_M = 8  # gemm.cu: the fused kernel takes up to this many rows
# positions on both sides of the YaRN training context (8192) and near the largest
POSITIONS = [0, 1, 7, 8191, 8192, 9000, 100_000, 131_071]


@pytest.fixture(scope="module")
def lib():
    h = ctypes.CDLL(_testing.__file__)
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    h.xo_hook_matmul_pair.argtypes = [ctypes.c_char_p] + [i] * 7 + [p] * 3 + [i] * 3 + [p, p, f, p, p]
    h.xo_hook_rmsnorm_cache_write.argtypes = [ctypes.c_char_p] + [i] * 6 + [p, p, i, i, i, f, p]
    h.xo_hook_rope_kv_cache_write.argtypes = [ctypes.c_char_p] + [i] * 6 + [p] + [i] * 4 + [p, p, f, p, p]
    return h


def device_index(device):
    return -1 if device == "cpu" else 0


def plugin():
    return xoron._cuda_plugin.encode()


def rope_tables(hd):
    """inv_freq [hd/2] (float32) and mscale of the YaRN variant for head_dim hd (SPEC 5)."""
    cfg = R.RefConfig.from_dict(_config({"hidden_size": hd * 4, "num_attention_heads": 4, "num_key_value_heads": 4}))
    assert cfg.head_dim == hd
    inv_freq, mscale = R.rope_inv_freq(cfg)
    return np.ascontiguousarray(inv_freq, np.float32), float(mscale)


def rotate_oracle(v, pos, heads, hd, inv_freq, mscale):
    """rows v [m, >= heads*hd] float64 with their first heads*hd rotated (rotate_half pairs j,
    j + hd/2), theta = pos * inv_freq formed in float32 (SPEC 5)."""
    v = np.array(v, np.float64)
    half = hd // 2
    theta = (pos.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float32).astype(np.float64)
    cs, sn = np.cos(theta) * mscale, np.sin(theta) * mscale
    for h in range(heads):
        a = v[:, h * hd:h * hd + half].copy()
        b = v[:, h * hd + half:(h + 1) * hd].copy()
        v[:, h * hd:h * hd + half] = a * cs - b * sn
        v[:, h * hd + half:(h + 1) * hd] = b * cs + a * sn
    return v


def store_rounded(a, dtype):
    """float32 values as `dtype` stores them, widened back"""
    return rounded({"a": np.ascontiguousarray(a, np.float32)}, dtype)["a"]


def to_bytes(a, dtype):
    a = np.ascontiguousarray(a, np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        return a.astype(np.float16)
    return (store_rounded(a, dtype).view(np.uint32) >> 16).astype(np.uint16)


def from_bytes(raw, dtype):
    if dtype == "float32":
        return raw.astype(np.float32)
    if dtype == "float16":
        return raw.astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def assert_stored(got, ref, dtype, what):
    """got (a 16-bit cache widened) within one rounding of the float64 ref, float32 within 1e-4"""
    ref = np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref)))
    bound = STORE_TOL[dtype] * np.abs(ref) + TOL_F32 * scale
    bad = np.abs(np.asarray(got, np.float64) - ref) > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} values off, worst {float(np.max(np.abs(got - ref))):.3g}"


# ------------------------------------------------------------------ matmul_pair


def hook_matmul_pair(lib, device, fused, dtype, w1, w2, x, rot=None):
    m, k = x.shape
    y1 = np.full((m, w1.shape[0]), np.nan, np.float32)
    y2 = np.full((m, w2.shape[0]), np.nan, np.float32)
    pos, heads, hd, inv_freq, mscale = rot if rot else (np.zeros(m, np.int32), 0, 2, np.zeros(1, np.float32), 1.0)
    rc = lib.xo_hook_matmul_pair(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype], w1.shape[0],
                                 w2.shape[0], k, m, w1.ctypes.data, w2.ctypes.data, x.ctypes.data, int(rot is not None),
                                 heads, hd, pos.ctypes.data, inv_freq.ctypes.data, mscale, y1.ctypes.data,
                                 y2.ctypes.data)
    assert rc == 0, f"xo_hook_matmul_pair failed ({rc})"
    return y1, y2


# (heads, head_dim, out2, in): q rotated (out1 = heads * head_dim) with kv_a; the default
# attention's shape; an odd out2 leaves a lone last row; in % 8 != 0 takes the plain entries
PAIR_SHAPES = {
    "default_16x64_rank512": (16, 64, 512, 1024),
    "4x16_odd_out2": (4, 16, 37, 64),
    "1x2_tiny": (1, 2, 3, 16),
    "in_not_multiple_of_8": (2, 8, 20, 36),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 3, SKINNY_MAX_M, SKINNY_MAX_M + 1, 20, 64])
@pytest.mark.parametrize("rotate", [True, False], ids=["q_rotated", "q_lora"])
@pytest.mark.parametrize("shape", list(PAIR_SHAPES))
def test_matmul_pair(lib, device, dtype, rows, rotate, shape):
    """q = RoPE(x @ Wq.T) with c = x @ Wkva.T (rotate), or q_a and kv_a (q_lora_rank > 0, no
    rotation; out1 then need not be heads * head_dim, and an odd one is taken as well)"""
    heads, hd, out2, k = PAIR_SHAPES[shape]
    out1 = heads * hd if rotate else heads * hd + 3
    rng = np.random.default_rng(rows * 31 + out2)
    w1 = rng.standard_normal((out1, k), dtype=np.float32) * np.float32(0.1)
    w2 = rng.standard_normal((out2, k), dtype=np.float32) * np.float32(0.1)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    pos = np.resize(np.array(POSITIONS, np.int32), rows)
    inv_freq, mscale = rope_tables(hd)
    rot = (pos, heads, hd, inv_freq, mscale) if rotate else None
    y1, y2 = hook_matmul_pair(lib, device, True, dtype, w1, w2, x, rot)
    c1, c2 = hook_matmul_pair(lib, device, False, dtype, w1, w2, x, rot)
    # the fused kernel runs each dot product in the order of the plain skinny one
    assert rel_err(y1, c1) <= 1e-6 and rel_err(y2, c2) <= 1e-6
    if rows > SKINNY_MAX_M:  # the same GEMMs over x converted once instead of twice
        np.testing.assert_array_equal(y1, c1)
        np.testing.assert_array_equal(y2, c2)
    w1r, w2r = store_rounded(w1, dtype).astype(np.float64), store_rounded(w2, dtype).astype(np.float64)
    # past the fused kernel's rows the plain CUDA products take x rounded (to nearest) to the
    # weights' 16-bit type (tensor cores); the skinny kernels and the CPU keep x in float32
    seen = x if device == "cpu" or rows <= SKINNY_MAX_M else store_rounded(x, dtype)
    ref1 = seen.astype(np.float64) @ w1r.T
    if rotate:
        ref1 = rotate_oracle(ref1, pos, heads, hd, inv_freq, mscale)
    assert rel_err(y1, ref1) <= TOL_F32
    assert rel_err(y2, seen.astype(np.float64) @ w2r.T) <= TOL_F32


# ------------------------------------------------------------------ rmsnorm_cache_write


def hook_rmsnorm_cache_write(lib, device, fused, dtype, cache, start, on_device, x, w, batch, n, eps):
    raw = to_bytes(cache, dtype)
    rc = lib.xo_hook_rmsnorm_cache_write(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype],
                                         cache.shape[1], start, int(on_device), x.ctypes.data, w.ctypes.data, batch, n,
                                         x.shape[1], eps, raw.ctypes.data)
    assert rc == 0, f"xo_hook_rmsnorm_cache_write failed ({rc})"
    return from_bytes(raw, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("batch, n", [(1, 1), (3, 1), (10, 1), (2, 5)])
@pytest.mark.parametrize("d", [512, 300, 80, 4])
@pytest.mark.parametrize("on_device", [False, True], ids=["start_host", "start_device"])
def test_rmsnorm_cache_write(lib, device, dtype, batch, n, d, on_device):
    capacity, start, eps = 12, 5, 1e-6
    rng = np.random.default_rng(d + 7 * batch + n)
    x = rng.standard_normal((batch * n, d), dtype=np.float32) * np.float32(3.0)
    w = (1.0 + 0.5 * rng.standard_normal(d)).astype(np.float32)
    cache = rng.standard_normal((batch, capacity, d), dtype=np.float32)
    before = from_bytes(to_bytes(cache, dtype), dtype).reshape(batch, capacity, d)
    got = hook_rmsnorm_cache_write(lib, device, True, dtype, cache, start, on_device, x, w, batch, n, eps)
    comp = hook_rmsnorm_cache_write(lib, device, False, dtype, cache, start, on_device, x, w, batch, n, eps)
    got, comp = got.reshape(batch, capacity, d), comp.reshape(batch, capacity, d)
    xs = x.astype(np.float64)
    ref = w * xs / np.sqrt(np.mean(xs * xs, axis=1, keepdims=True) + eps)
    ref = ref.reshape(batch, n, d)
    untouched = np.ones(capacity, bool)
    untouched[start:start + n] = False
    np.testing.assert_array_equal(got[:, untouched], before[:, untouched])
    assert_stored(got[:, start:start + n], ref, dtype, "fused vs oracle")
    assert_stored(got[:, start:start + n], comp[:, start:start + n], dtype, "fused vs composition")


# ------------------------------------------------------------------ rope_kv_cache_write


def hook_rope_kv_cache_write(lib, device, fused, dtype, k_cache, v_cache, start, on_device, kv, batch, n, heads, hd,
                             pos, inv_freq, mscale):
    kr, vr = to_bytes(k_cache, dtype), to_bytes(v_cache, dtype)
    kv = kv.copy()  # the entry may rotate K in place
    rc = lib.xo_hook_rope_kv_cache_write(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype],
                                         k_cache.shape[1], start, int(on_device), kv.ctypes.data, batch, n, heads, hd,
                                         pos.ctypes.data, inv_freq.ctypes.data, mscale, kr.ctypes.data, vr.ctypes.data)
    assert rc == 0, f"xo_hook_rope_kv_cache_write failed ({rc})"
    return from_bytes(kr, dtype), from_bytes(vr, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("batch, n", [(1, 1), (3, 1), (10, 1), (2, 5)])
@pytest.mark.parametrize("heads, hd", [(16, 64), (2, 16), (1, 2)])
@pytest.mark.parametrize("on_device", [False, True], ids=["start_host", "start_device"])
def test_rope_kv_cache_write(lib, device, dtype, batch, n, heads, hd, on_device):
    capacity, start = 9, 3
    W = heads * hd
    rng = np.random.default_rng(heads * 13 + hd + batch * 5 + n)
    kv = rng.standard_normal((batch * n, 2 * W), dtype=np.float32)
    pos = np.resize(np.array(POSITIONS[::-1], np.int32), batch * n)
    inv_freq, mscale = rope_tables(hd)
    k_cache = rng.standard_normal((batch, capacity, W), dtype=np.float32)
    v_cache = rng.standard_normal((batch, capacity, W), dtype=np.float32)
    k_before = from_bytes(to_bytes(k_cache, dtype), dtype).reshape(batch, capacity, W)
    v_before = from_bytes(to_bytes(v_cache, dtype), dtype).reshape(batch, capacity, W)
    args = (start, on_device, kv, batch, n, heads, hd, pos, inv_freq, mscale)
    k_got, v_got = hook_rope_kv_cache_write(lib, device, True, dtype, k_cache, v_cache, *args)
    k_comp, v_comp = hook_rope_kv_cache_write(lib, device, False, dtype, k_cache, v_cache, *args)
    k_got, v_got = k_got.reshape(batch, capacity, W), v_got.reshape(batch, capacity, W)
    k_comp, v_comp = k_comp.reshape(batch, capacity, W), v_comp.reshape(batch, capacity, W)
    k_ref = rotate_oracle(kv[:, :W], pos, heads, hd, inv_freq, mscale).reshape(batch, n, W)
    v_ref = kv[:, W:].astype(np.float64).reshape(batch, n, W)
    untouched = np.ones(capacity, bool)
    untouched[start:start + n] = False
    np.testing.assert_array_equal(k_got[:, untouched], k_before[:, untouched])
    np.testing.assert_array_equal(v_got[:, untouched], v_before[:, untouched])
    new = slice(start, start + n)
    assert_stored(k_got[:, new], k_ref, dtype, "K vs oracle")
    assert_stored(v_got[:, new], v_ref, dtype, "V vs oracle")
    assert_stored(k_got[:, new], k_comp[:, new], dtype, "K vs composition")
    np.testing.assert_array_equal(v_got[:, new], v_comp[:, new])


# ------------------------------------------------------------------ the model: decode steps and graph replay

# the default attention's shape per head (head_dim 64) over fewer heads, dense layers and one MoE
ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, num_hidden_layers=2,
            use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2, moe_intermediate_size=40)
Q_LORA = {"q_rotated": 0, "q_lora": 48}


def _steps(m, ids, prompt, pos0=None):
    """the prompt in one call, then one token per call through the cache; the logits of every token"""
    b, t = ids.shape
    pos = None if pos0 is None else np.broadcast_to(pos0 + np.arange(t), (b, t)).copy()
    part = lambda a, i, j: None if a is None else a[:, i:j]  # noqa: E731
    out = m(input_ids=ids[:, :prompt], position_ids=part(pos, 0, prompt), use_cache=True)
    logits = [np.asarray(out.logits)]
    for i in range(prompt, t):
        out = m(input_ids=ids[:, i:i + 1], position_ids=part(pos, i, i + 1), past_key_values=out.past_key_values,
                use_cache=True)
        logits.append(np.asarray(out.logits))
    return np.concatenate(logits, axis=1)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("cache_format", ["latent", "kv"])
@pytest.mark.parametrize("q_lora", list(Q_LORA))
@pytest.mark.parametrize("batch", [1, SKINNY_MAX_M + 2])
@pytest.mark.parametrize("pos0", [None, 9000, 100_000], ids=["pos0", "pos9000", "pos100000"])
def test_decode_steps_match_full_forward(cache_format, q_lora, batch, pos0):
    """single-token steps (the fused kernels at batch 1, the plain entries at batch > 8) equal the
    full forward and the oracle, positions past the YaRN training context included. Float32
    only: with 16-bit weights this random two-layer model's router has near-ties that the
    roundings of the prefill and decode kernels settle differently (bf16 is covered by the
    kernel-level tests above and by test_cuda.py's model tests, which run these kernels)."""
    over = dict(ATTN, q_lora_rank=Q_LORA[q_lora])
    m, cfg, w = build(over, seed=5, dtype="float32", cache_format=cache_format)
    ids = ids_for(cfg, batch, 14, seed=9)
    stepped = _steps(m, ids, 9, pos0)
    pos = None if pos0 is None else np.broadcast_to(pos0 + np.arange(14), (batch, 14)).copy()
    full = np.asarray(m(input_ids=ids, position_ids=pos).logits)
    assert rel_err(stepped, full) <= TOL_F32
    ref, _ = R.forward(cfg, rounded(w, "float32"), ids, position_ids=pos)
    assert rel_err(stepped, ref) <= TOL_F32


def _stepwise_greedy(m, prompt, new):
    """generate()'s tokens made one forward at a time through the cache, argmax in numpy"""
    out = m(input_ids=prompt, use_cache=True)
    seq = prompt
    for _ in range(new):
        tok = np.asarray(out.logits)[:, -1].argmax(-1)
        seq = np.concatenate([seq, tok[:, None]], axis=1)
        if seq.shape[1] == prompt.shape[1] + new:
            break
        out = m(input_ids=tok[:, None], past_key_values=out.past_key_values, use_cache=True)
    return seq


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("cache_format", ["latent", "kv"])
@pytest.mark.parametrize("q_lora", list(Q_LORA))
@pytest.mark.parametrize("batch", [1, SKINNY_MAX_M + 1])
def test_graph_replay_equals_stepwise_forward(cache_format, q_lora, batch):
    """generate()'s decode steps are replayed CUDA graphs (past read from the device by the
    fused cache writes): the tokens are those of eager single-token forwards"""
    over = dict(ATTN, q_lora_rank=Q_LORA[q_lora])
    m, cfg, _ = build(over, seed=7, dtype="float32", cache_format=cache_format)
    prompt = ids_for(cfg, batch, 6, seed=3)
    got = np.asarray(m.generate(prompt, max_new_tokens=70, do_sample=False, eos_token_id=None))
    np.testing.assert_array_equal(got, _stepwise_greedy(m, prompt, 70))
