"""The prefill steps the kernel table fuses so that 16-bit activations pass between kernels
(csrc/backends/backend.h): ffn (gate_up, SwiGLU and down in one call; on CUDA with 16-bit weights
over more than 8 rows the SwiGLU result is stored 16-bit, straight into the down GEMM's input, and
on Hopper from 128 rows the gate/up product computes the SwiGLU in its epilogue, for the
gate_up_swiglu entry too, which stores it float32), attention_o_proj (the attention and the output projection; on CUDA's tensor-core prefill kernels
with a 16-bit o the kernels store their output 16-bit for the GEMM) and the rmsnorm_* products
(rmsnorm_matmul, rmsnorm_matmul_pair, rmsnorm_ffn: the RMSNorm and the product that reads it; on
CUDA past 8 rows with 16-bit weights the norm stores its rows 16-bit for the GEMM, so no conversion
pass). The CPU runs the defaults of backends/defaults.c.

Each entry against its default composition on the same backend, to the bit: the fused versions
round the same float32 values to the same 16-bit values, only where they are stored changes. The
ffn and rmsnorm_matmul also against a float64 numpy oracle; whole forward passes (dense and MoE
layers, q_lora_rank > 0, hidden not a multiple of 8, rows past a norm kernel's registers, several
passes, hidden states) with every fused entry against every default. The attention kernels are
held to the oracle by test_cuda_attention_hopper.py; here only the fused and composed results are
compared, under each kernel (wgmma, mma.sync with one or several key blocks, the row-wise kernel)
and on both sides of the skinny limit (8 rows).
"""
from __future__ import annotations

import ctypes
import faulthandler
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import xoron  # noqa: E402
from conftest import DEVICES  # noqa: E402
from test_cuda import TOL_F32, rel_err  # noqa: E402
from test_cuda_attention_hopper import CALL_TIMEOUT, GPU_OK, HOPPER, XO_BF16, XO_F16, make_inputs  # noqa: E402
from test_cuda_fused_attention import DTYPE_CODE, SKINNY_MAX_M, device_index, plugin, store_rounded  # noqa: E402
from xoron import _testing  # noqa: E402

needs_gpu = pytest.mark.skipif(not GPU_OK, reason="no usable CUDA device, or no xoron._testing")


@pytest.fixture(scope="module")
def lib():
    h = ctypes.CDLL(_testing.__file__)
    i, p = ctypes.c_int, ctypes.c_void_p
    h.xo_hook_ffn.argtypes = [ctypes.c_char_p] + [i] * 6 + [p] * 4
    h.xo_hook_rmsnorm_product.argtypes = ([ctypes.c_char_p] + [i] * 6 + [ctypes.c_float] + [p] * 3 + [i, i, p, i, p] +
                                          [i] * 3 + [p, p, ctypes.c_float] + [p] * 4)
    h.xo_hook_forward_fused.argtypes = [ctypes.c_char_p] + [i] * 3 + [p, i, i, p, i, i, p, p]
    h.xo_hook_cuda_attention_o_proj.restype = ctypes.c_int
    h.xo_hook_cuda_attention_o_proj.argtypes = ([ctypes.c_char_p, i, p, p] + [i] * 11 + [p] * 4 +
                                                [ctypes.c_float] * 2 + [p, i, i, p, p, p, i])
    return h


# ------------------------------------------------------------------ ffn


def hook_ffn(lib, device, fused, dtype, gate_up, down, x):
    n, hidden = x.shape
    out = np.full((n, hidden), np.nan, np.float32)
    rc = lib.xo_hook_ffn(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype], hidden, down.shape[1], n,
                         gate_up.ctypes.data, down.ctypes.data, x.ctypes.data, out.ctypes.data)
    assert rc == 0, f"xo_hook_ffn failed ({rc})"
    return out


# (hidden, inter): the default model's dense FFN; sizes off the GEMM tiles
# (the Hopper kernel's last k-tile partial at 200 = 3 x 64 + 8 and its last gate box running 56 rows
# into the up rows at 136 = 2 x 64 + 8, columns it must not store)
FFN_SHAPES = {"default_1024x2048": (1024, 2048), "odd_40x24": (40, 24), "ragged_200x136": (200, 136)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 4, SKINNY_MAX_M, SKINNY_MAX_M + 1, 37, 64, 300])
@pytest.mark.parametrize("shape", list(FFN_SHAPES))
def test_ffn(lib, device, dtype, rows, shape):
    hidden, inter = FFN_SHAPES[shape]
    rng = np.random.default_rng(rows * 7 + hidden)
    gate_up = rng.standard_normal((2 * inter, hidden), dtype=np.float32) * np.float32(hidden ** -0.5)
    down = rng.standard_normal((hidden, inter), dtype=np.float32) * np.float32(inter ** -0.5)
    x = rng.standard_normal((rows, hidden), dtype=np.float32)
    got = hook_ffn(lib, device, True, dtype, gate_up, down, x)
    comp = hook_ffn(lib, device, False, dtype, gate_up, down, x)
    # past the skinny rows the CUDA products read x and the activation rounded to the weights' type
    narrow = device != "cpu" and rows > SKINNY_MAX_M and dtype != "float32"
    np.testing.assert_array_equal(got, comp)
    seen = store_rounded(x, dtype) if narrow else x
    gu = seen.astype(np.float64) @ store_rounded(gate_up, dtype).astype(np.float64).T
    g, u = gu[:, :inter], gu[:, inter:]
    act = g / (1.0 + np.exp(-g)) * u
    if narrow:
        act = store_rounded(act.astype(np.float32), dtype)
    ref = act.astype(np.float64) @ store_rounded(down, dtype).astype(np.float64).T
    # an activation on a rounding boundary may round the other way from float32
    assert rel_err(got, ref) <= (1e-3 if narrow else TOL_F32)


# ------------------------------------------------------------------ the rmsnorm_* products

RMSNORM_ENTRY = {"matmul": 0, "pair": 1, "pair_rot": 1, "ffn": 2}
# the default model's hidden size; not a multiple of 8 (the GEMM's 16-byte loads do not fit); past the
# 8 * 256 values a norm block keeps in registers
NORM_WIDTHS = {"1024": 1024, "odd_36": 36, "wide_2056": 2056}
# (add the residual first, keep the normed rows)
NORM_KINDS = {"plain": (False, False), "add": (True, False), "add_keep": (True, True)}


def hook_rmsnorm_product(lib, device, fused, dtype, entry, h, add, norm_w, keep, w1, w2, rot=None):
    n, d = h.shape
    e = RMSNORM_ENTRY[entry]
    out1, out2 = w1.shape[0], (w2.shape[0] if w2 is not None else 1)
    y1 = np.full((n, out2 if e == 2 else out1), np.nan, np.float32)
    y2 = np.full((n, out2), np.nan, np.float32)
    h_out = np.full_like(h, np.nan)
    x_out = np.full_like(h, np.nan)
    w2 = w2 if w2 is not None else np.zeros((1, d), np.float32)
    pos, inv_freq, heads, hd, mscale = rot if rot else (np.zeros(n, np.int32), np.ones(1, np.float32), 0, 0, 1.0)
    rc = lib.xo_hook_rmsnorm_product(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype], e, n, d, 1e-6,
                                     h.ctypes.data, add.ctypes.data if add is not None else None, norm_w.ctypes.data,
                                     int(keep), out1, w1.ctypes.data, out2, w2.ctypes.data, int(rot is not None),
                                     heads, hd, pos.ctypes.data, inv_freq.ctypes.data, mscale, y1.ctypes.data,
                                     y2.ctypes.data, h_out.ctypes.data, x_out.ctypes.data)
    assert rc == 0, f"xo_hook_rmsnorm_product failed ({rc})"
    return y1, (y2 if e == 1 else None), h_out, (x_out if keep else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows", [SKINNY_MAX_M, SKINNY_MAX_M + 1, 64, 300])
@pytest.mark.parametrize("width", list(NORM_WIDTHS))
@pytest.mark.parametrize("kind", list(NORM_KINDS))
@pytest.mark.parametrize("entry", list(RMSNORM_ENTRY))
def test_rmsnorm_product(lib, device, dtype, rows, width, kind, entry):
    """each rmsnorm_* entry to the bit against the norm then the plain entry (backends/defaults.c)"""
    d = NORM_WIDTHS[width]
    with_add, keep = NORM_KINDS[kind]
    rng = np.random.default_rng(rows * 31 + d)
    h = rng.standard_normal((rows, d), dtype=np.float32)
    add = rng.standard_normal((rows, d), dtype=np.float32) if with_add else None
    norm_w = (1.0 + 0.5 * rng.standard_normal(d)).astype(np.float32)
    rot = None
    if entry == "ffn":
        inter = 40
        w1 = rng.standard_normal((2 * inter, d), dtype=np.float32) * np.float32(d ** -0.5)
        w2 = rng.standard_normal((24, inter), dtype=np.float32) * np.float32(inter ** -0.5)
    else:
        w1 = rng.standard_normal((64, d), dtype=np.float32) * np.float32(d ** -0.5)
        w2 = rng.standard_normal((40, d), dtype=np.float32) * np.float32(d ** -0.5) if entry != "matmul" else None
        if entry == "pair_rot":  # 2 heads of 32 over y1's 64 columns
            rot = (rng.integers(0, 9000, rows).astype(np.int32),
                   (10000.0 ** (-np.arange(16) / 16.0)).astype(np.float32), 2, 32, 1.0)
    got = hook_rmsnorm_product(lib, device, True, dtype, entry, h, add, norm_w, keep, w1, w2, rot)
    comp = hook_rmsnorm_product(lib, device, False, dtype, entry, h, add, norm_w, keep, w1, w2, rot)
    for g, c_ in zip(got, comp):
        if c_ is not None:
            assert np.isfinite(c_).all()
            np.testing.assert_array_equal(g, c_)
    if entry == "matmul":  # the norm and the product against float64
        hh = h.astype(np.float64) + (add if with_add else 0.0)
        x = (norm_w * (hh / np.sqrt((hh * hh).mean(axis=1, keepdims=True) + 1e-6))).astype(np.float32)
        narrow = device != "cpu" and rows > SKINNY_MAX_M and dtype != "float32"
        seen = store_rounded(x, dtype) if narrow else x
        ref = seen.astype(np.float64) @ store_rounded(w1, dtype).astype(np.float64).T
        assert rel_err(got[0], ref) <= (1e-3 if narrow else TOL_F32)


# { vocab, hidden, intermediate, layers, heads, kv_heads, kv_lora_rank, q_lora_rank, use_moe, experts,
#   experts_per_tok, moe_layer_freq, moe_intermediate } (xo_hook_forward_fused)
FORWARD_CONFIGS = {
    "moe": [300, 256, 384, 3, 4, 2, 64, 0, 1, 8, 2, 2, 96],        # layer 1 MoE, 0 and 2 dense
    "q_lora": [300, 128, 256, 2, 2, 1, 32, 48, 0, 1, 1, 1, 1],
    "odd_hidden_36": [101, 36, 44, 2, 3, 1, 20, 0, 1, 4, 2, 2, 20],
    "wide_2112": [64, 2112, 128, 1, 33, 3, 64, 0, 0, 1, 1, 1, 1],  # rows past a norm block's registers
}
# (batch, tokens, logits_to_keep, prefill_chunk, hidden states)
FORWARD_CASES = {
    "all_logits": (2, 150, 0, 0, False),   # the final norm and lm_head over all 300 rows
    "last_logit": (1, 150, 1, 0, False),
    "hidden": (2, 40, 0, 0, True),          # the final norm kept for hidden_states
    "passes": (1, 150, 50, 50, False),      # three passes, the last one's rows kept
    "few_rows": (1, 6, 0, 0, False),        # the skinny kernels over float32 x
}


def hook_forward(lib, device, fused, dtype, cfg, case):
    batch, tokens, keep, chunk, want_hidden = case
    vocab, hidden_size, layers = cfg[0], cfg[1], cfg[3]
    ids = np.random.default_rng(5).integers(0, vocab, (batch, tokens)).astype(np.int32)
    kept = keep if 0 < keep < tokens else tokens
    logits = np.full((batch, kept, vocab), np.nan, np.float32)
    hidden = np.full((layers + 1, batch, tokens, hidden_size), np.nan, np.float32) if want_hidden else None
    cfg_arr = np.array(cfg, np.int32)
    rc = lib.xo_hook_forward_fused(plugin(), device_index(device), int(fused), DTYPE_CODE[dtype], cfg_arr.ctypes.data,
                                   batch, tokens, ids.ctypes.data, keep, chunk, logits.ctypes.data,
                                   hidden.ctypes.data if hidden is not None else None)
    assert rc == 0, f"xo_hook_forward_fused failed ({rc})"
    return logits, hidden


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_fused_equals_composition(lib, device, dtype, config, case):
    """the logits (and hidden states) of a forward pass with every fused entry equal those of every
    default composition, to the bit"""
    cfg, c = FORWARD_CONFIGS[config], FORWARD_CASES[case]
    got_logits, got_hidden = hook_forward(lib, device, True, dtype, cfg, c)
    comp_logits, comp_hidden = hook_forward(lib, device, False, dtype, cfg, c)
    assert np.isfinite(comp_logits).all()
    np.testing.assert_array_equal(got_logits, comp_logits)
    if comp_hidden is not None:
        assert np.isfinite(comp_hidden).all()
        np.testing.assert_array_equal(got_hidden, comp_hidden)


# ------------------------------------------------------------------ attention_o_proj


def hook_attention_o_proj(lib, inputs, options, fused, o_w, o_dtype):
    s = inputs["shape"]
    y = np.full((s["batch"] * s["t"], o_w.shape[0]), np.nan, np.float32)
    names = (ctypes.c_char_p * max(len(options), 1))(*[n.encode() for n in options])
    values = (ctypes.c_char_p * max(len(options), 1))(*[str(x).encode() for x in options.values()])
    counts = (ctypes.c_longlong * 2)(-1, -1)
    err = ctypes.create_string_buffer(1024)
    faulthandler.dump_traceback_later(CALL_TIMEOUT, exit=True)  # a hung kernel ends the run
    try:
        rc = lib.xo_hook_cuda_attention_o_proj(
            xoron._cuda_plugin.encode(), 0, ctypes.cast(names, ctypes.c_void_p), ctypes.cast(values, ctypes.c_void_p),
            len(options), int(fused), s["batch"], s["t"], s["past"], s["nh"], s["nkv"], s["hd"], s["cap"],
            s["kv_dtype"], s["key_block"], inputs["q"].ctypes.data, inputs["k"].ctypes.data, inputs["v"].ctypes.data,
            inputs["mask"].ctypes.data, s["scale"], s["eps"], o_w.ctypes.data, o_w.shape[0], o_dtype, y.ctypes.data,
            ctypes.addressof(counts), ctypes.addressof(err), len(err))
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert rc == 0, f"xo_hook_cuda_attention_o_proj: {rc}: {err.value.decode()}"
    return y, {"mma": counts[0], "hopper": counts[1]}


# name: (options, key_block, the kernel that must run: "hopper", "mma", or None: no count asserted)
KERNELS = {
    "auto": ({"cuda_attention": "auto"}, 0, "hopper" if HOPPER else None),
    "auto_key_blocks": ({"cuda_attention": "auto", "cuda_attention_keys": 128}, 0, "hopper" if HOPPER else None),
    "mma": ({"cuda_attention": "mma"}, 0, "mma"),
    "mma_key_blocks": ({"cuda_attention": "mma"}, 128, "mma"),  # partials folded by k_attn_fold
    "rows": ({"cuda_attention": "rows"}, 0, None),  # the row-wise kernel: the composition inside
}


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("kv_o", [("float16", XO_F16), ("bfloat16", XO_BF16), ("bfloat16", XO_F16)],
                         ids=["f16_f16", "bf16_bf16", "bf16_cache_f16_o"])
@pytest.mark.parametrize("rows", [(1, 8), (2, 300)], ids=["8_rows", "2x300_rows"])
def test_attention_o_proj(lib, kernel, kv_o, rows):
    options, key_block, ran = KERNELS[kernel]
    kv_dtype, o_dtype = kv_o
    batch, t = rows
    inputs = make_inputs(batch=batch, t=t, past=5, nh=4, nkv=2, hd=64, dtype=kv_dtype, key_block=key_block, seed=t)
    rng = np.random.default_rng(3)
    o_w = rng.standard_normal((96, 4 * 64), dtype=np.float32) * np.float32(1 / 16)
    got, counts = hook_attention_o_proj(lib, inputs, options, True, o_w, o_dtype)
    comp, _ = hook_attention_o_proj(lib, inputs, options, False, o_w, o_dtype)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, comp)
    if ran and t >= 16:
        assert counts[ran] > 0, counts
