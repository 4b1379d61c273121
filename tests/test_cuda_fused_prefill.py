"""The prefill steps the kernel table fuses so that 16-bit activations pass between kernels
(csrc/backends/backend.h): ffn (gate_up, SwiGLU and down in one call; on CUDA with 16-bit weights
over more than 8 rows the SwiGLU result is stored 16-bit, straight into the down GEMM's input, and
on Hopper from 128 rows the gate/up product computes the SwiGLU in its epilogue) and
attention_o_proj (the attention and the output projection; on CUDA's tensor-core prefill kernels
with a 16-bit o the kernels store their output 16-bit for the GEMM). The CPU runs the defaults of
backends/defaults.c.

Each entry against its default composition on the same backend, to the bit: the fused versions
round the same float32 values to the same 16-bit values, only where they are stored changes
(except the Hopper gate/up + SwiGLU kernel, whose own summation order is held to 2e-3). The
ffn also against a float64 numpy oracle. The attention kernels are held to the oracle by
test_cuda_attention_hopper.py; here only the fused and composed results are compared, under each
kernel (wgmma, mma.sync with one or several key blocks, the row-wise kernel) and on both sides
of the skinny limit (8 rows).
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


# from this many rows, on Hopper with 16-bit weights and hidden >= 64, the fused gate/up + SwiGLU kernel
HOPPER_SWIGLU_ROWS = 128

# (hidden, inter): the default model's dense FFN; sizes off the GEMM tiles
# (the Hopper kernel's last k-tile partial at 200 = 3 x 64 + 8 and its last gate box running 56 rows
# into the up rows at 136 = 2 x 64 + 8, columns it must not store)
FFN_SHAPES = {"default_1024x2048": (1024, 2048), "odd_40x24": (40, 24), "ragged_200x136": (200, 136)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 4, SKINNY_MAX_M, SKINNY_MAX_M + 1, 300])
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
    if narrow and HOPPER and rows >= HOPPER_SWIGLU_ROWS and hidden >= 64:
        # the gate/up product with the SwiGLU in its epilogue (grouped_gemm_hopper.cu): its own
        # float32 summation order, so an activation near a rounding boundary may round apart
        assert rel_err(got, comp) <= 2e-3
    else:
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
