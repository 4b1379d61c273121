"""The wgmma prefill attention kernel (csrc/backends/cuda/attention_hopper.cu) against a float64
numpy oracle of causal attention and against the mma.sync kernel (cuda_attention="mma").

Kernel level: one call of the CUDA backend's attention over a K/V cache (xoron._testing's
xo_hook_cuda_attention) under a watchdog, so that a hang ends the run instead of blocking
it. The backend's prefill_attention_counts prove which kernel ran:
on compute capability 9.0 every prefill of head_dim 64 with at least 16 queries takes the wgmma
kernel under "auto", and never under "mma".

Both kernels round Q, K, V and P to float16 (the K/V cache's bfloat16 goes through float16
copies), so the oracle runs on Q, K, V rounded as the kernels see them; the remaining error is
P's float16 rounding and the float32 sums (TOL_ORACLE). The two kernels differ by their
arithmetic order and exp implementation only (TOL_KERNELS).
"""
from __future__ import annotations

import ctypes
import faulthandler
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import xoron

pytestmark = pytest.mark.cuda

HERE = os.path.dirname(os.path.abspath(__file__))
TOL_ORACLE = 3e-3
TOL_KERNELS = 2e-3
CALL_TIMEOUT = 300
XO_F16, XO_BF16 = 2, 3  # xo_dtype (engine/tensor.h)


def _compute_capability():
    """(major, minor) of device 0, or None when it cannot be read here."""
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(0))
    except Exception:  # noqa: BLE001 - torch is optional
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"],
                               capture_output=True, text=True, timeout=30)
            major, minor = r.stdout.strip().split(".")
            return int(major), int(minor)
        except Exception:  # noqa: BLE001
            pass
    return None


def _gpu_ok():
    if not xoron.cuda_available():
        return False
    try:
        from xoron import _testing  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


GPU_OK = _gpu_ok()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason="no usable CUDA device, or no xoron._testing")
CC = _compute_capability() if GPU_OK else None
HOPPER = CC == (9, 0)


# ------------------------------------------------------------------ the call (in a child process)


def _hook_call(inputs: dict, options: dict, reps: int = 0):
    """The hook in this process: (out, counts {mma, hopper}, seconds per call or None)."""
    from xoron import _testing  # noqa: PLC0415
    lib = ctypes.CDLL(_testing.__file__)
    f = lib.xo_hook_cuda_attention
    f.restype = ctypes.c_int
    f.argtypes = ([ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 10 +
                  [ctypes.c_void_p] * 4 + [ctypes.c_float] * 2 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])
    plugin = os.path.join(os.path.dirname(os.path.abspath(xoron._C.__file__)), "_xoron_cuda.so")
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    s = inputs["shape"]
    out = np.zeros(q.shape, np.float32)
    names = (ctypes.c_char_p * max(len(options), 1))(*[n.encode() for n in options])
    values = (ctypes.c_char_p * max(len(options), 1))(*[str(x).encode() for x in options.values()])
    counts = (ctypes.c_longlong * 2)(-1, -1)
    secs = ctypes.c_double(0.0)
    err = ctypes.create_string_buffer(1024)
    rc = f(plugin.encode(), 0, ctypes.cast(names, ctypes.c_void_p), ctypes.cast(values, ctypes.c_void_p), len(options),
           s["batch"], s["t"], s["past"], s["nh"], s["nkv"], s["hd"], s["cap"], s["kv_dtype"], s["key_block"],
           q.ctypes.data, k.ctypes.data, v.ctypes.data, mask.ctypes.data, s["scale"], s["eps"], out.ctypes.data, reps,
           ctypes.addressof(secs), ctypes.addressof(counts), ctypes.addressof(err), len(err))
    if rc != 0:
        raise RuntimeError(f"xo_hook_cuda_attention: {rc}: {err.value.decode()}")
    return out, {"mma": counts[0], "hopper": counts[1]}, (secs.value if reps > 0 else None)


def run_attention(inputs: dict, options: dict):
    """The hook in this process, under a watchdog: a call that does not return in CALL_TIMEOUT
    seconds (a hung kernel) ends the test run with every thread's traceback instead of blocking
    it. (A child process per call cost ~10 s each on the H200.) Returns (out, counts)."""
    faulthandler.dump_traceback_later(CALL_TIMEOUT, exit=True)
    try:
        out, counts, _ = _hook_call(inputs, options)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return out, counts


# ------------------------------------------------------------------ inputs and the oracle


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def make_inputs(batch=1, t=300, past=0, nh=4, nkv=2, hd=64, dtype="float16", key_block=0, seed=0, q_scale=1.0,
                hidden=None):
    """Q, a K/V cache of `dtype` holding past + t keys per row (a few free slots after), the mask
    (hidden: {row: [slot indices]} masked out)."""
    rng = np.random.default_rng(seed)
    cap = past + t + 3
    q = (rng.standard_normal((batch * t, nh * hd)) * q_scale).astype(np.float32)
    k = rng.standard_normal((batch, cap, nkv * hd)).astype(np.float32)
    v = rng.standard_normal((batch, cap, nkv * hd)).astype(np.float32)
    mask = np.zeros((batch, cap), np.uint8)
    mask[:, :past + t] = 1
    for row, slots in (hidden or {}).items():
        mask[row, slots] = 0
    if dtype == "float16":
        kc, vc = k.astype(np.float16), v.astype(np.float16)
        kv_dtype = XO_F16
    else:  # bfloat16 bits in uint16
        kc = (_round_bf16(k).view(np.uint32) >> 16).astype(np.uint16)
        vc = (_round_bf16(v).view(np.uint32) >> 16).astype(np.uint16)
        kv_dtype = XO_BF16
    shape = dict(batch=batch, t=t, past=past, nh=nh, nkv=nkv, hd=hd, cap=cap, kv_dtype=kv_dtype,
                 key_block=key_block, scale=float(1.0 / np.sqrt(hd)), eps=1e-5)
    return {"q": q, "k": np.ascontiguousarray(kc), "v": np.ascontiguousarray(vc), "mask": mask, "shape": shape}


def _as_kernel_sees(x: np.ndarray, kv_dtype: int) -> np.ndarray:
    """the cache values widened, then float16 (the kernels' copies)"""
    return _widened(x, kv_dtype).astype(np.float16).astype(np.float64)


def _widened(x: np.ndarray, kv_dtype: int) -> np.ndarray:
    """the cache values widened exactly (what the float32 kernels read)"""
    if kv_dtype == XO_BF16:
        x = (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float64)


def oracle(inputs: dict, f16_operands: bool = True) -> np.ndarray:
    """float64 causal attention: key j visible to query index qi iff j <= qi and mask[j]; the
    output sum_j e_j v_j / (sum_j e_j + eps) with e_j = exp(s_j - max s), 0 when nothing is visible.
    f16_operands: on Q, K and V rounded to float16 as the tensor-core kernels see them; else on
    float32 Q and the cache's values widened exactly."""
    s = inputs["shape"]
    B, t, past, nh, nkv, hd = s["batch"], s["t"], s["past"], s["nh"], s["nkv"], s["hd"]
    q = inputs["q"].astype(np.float16) if f16_operands else inputs["q"]
    q = q.astype(np.float64).reshape(B, t, nh, hd)
    cache = _as_kernel_sees if f16_operands else _widened
    k = cache(inputs["k"], s["kv_dtype"]).reshape(B, s["cap"], nkv, hd)
    v = cache(inputs["v"], s["kv_dtype"]).reshape(B, s["cap"], nkv, hd)
    kv_len = past + t
    out = np.zeros((B, t, nh, hd))
    qi = past + np.arange(t)[:, None]
    j = np.arange(kv_len)[None, :]
    for b in range(B):
        vis = (j <= qi) & (inputs["mask"][b, :kv_len][None, :] != 0)
        any_vis = vis.any(axis=1)
        for h in range(nh):
            g = h // (nh // nkv)
            sc = q[b, :, h] @ k[b, :kv_len, g].T * s["scale"]
            sc = np.where(vis, sc, -np.inf)
            mx = np.where(any_vis, sc.max(axis=1), 0.0)
            e = np.where(vis, np.exp(sc - mx[:, None]), 0.0)
            o = e @ v[b, :kv_len, g] / (e.sum(axis=1) + s["eps"])[:, None]
            out[b, :, h] = np.where(any_vis[:, None], o, 0.0)
    return out.reshape(B * t, nh * hd)


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def check(inputs: dict, compare_mma: bool = True, keys: int = 0):
    """the kernel (auto; keys: cuda_attention_keys, keys per launch) against the oracle, and
    against the mma.sync kernel; the counts prove which kernel ran and how many launches (key
    blocks) it took. Prints the errors (pytest -s shows them)."""
    s = inputs["shape"]
    got, counts = run_attention(inputs, {"cuda_attention": "auto", "cuda_attention_keys": keys})
    ref = oracle(inputs)
    e_ref = rel_err(got, ref)
    tc = s["t"] >= 16  # the tensor-core kernels' threshold (attention.cu)
    hopper_expected = HOPPER and tc and s["hd"] == 64
    msg = f"{s} counts {counts} err vs oracle {e_ref:.2e}"
    if compare_mma:
        mma, mcounts = run_attention(inputs, {"cuda_attention": "mma"})
        e_mma = rel_err(got, mma)
        msg += f", vs mma.sync {e_mma:.2e} (mma.sync vs oracle {rel_err(mma, ref):.2e}, counts {mcounts})"
        assert mcounts["hopper"] == 0, msg
        if tc:
            assert mcounts["mma"] > 0, msg
    print(msg)
    assert np.isfinite(got).all(), msg
    if hopper_expected:
        assert counts["hopper"] > 0 and counts["mma"] == 0, "the wgmma kernel was not taken: " + msg
        per_launch = max(keys // 128 * 128, 128) if keys else 1 << 30
        launches = -(-(s["past"] + s["t"]) // per_launch)
        assert counts["hopper"] == launches, f"{launches} key blocks expected: " + msg
    else:
        assert counts["hopper"] == 0, msg
    assert e_ref <= TOL_ORACLE, msg
    if compare_mma:
        assert e_mma <= TOL_KERNELS, msg
    return got


# ------------------------------------------------------------------ the cases


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 127, 128, 129, 300, 1000, 4095, 4097])
def test_one_block_against_the_oracle(t, dtype):
    check(make_inputs(t=t, dtype=dtype, seed=t))


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("t,keys", [(1000, 64), (1000, 256), (1000, 300), (4097, 4096), (4095, 4096),
                                   (600, 128)])
def test_key_blocks_carry_the_state(t, keys, dtype):
    """several launches (key blocks) per pass under cuda_attention_keys: the state kept across
    them by the kernel (64 rounds up to one tile of 128 keys, 300 down to 256); the mma.sync
    kernel takes key blocks of key_block"""
    check(make_inputs(t=t, dtype=dtype, key_block=keys, seed=7), keys=keys)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("key_block", [0, 4096, 1000])
def test_positions_past_8192(key_block, dtype):
    """a second prefill chunk after 8200 cached keys: sequence indices past 8192, tiles not
    aligned to the queries, blocks across the past"""
    check(make_inputs(t=300, past=8200, dtype=dtype, key_block=key_block, seed=3), keys=key_block)


@needs_gpu
@pytest.mark.parametrize("nh,nkv", [(8, 1), (8, 2), (8, 8), (16, 4)])
def test_gqa(nh, nkv):
    check(make_inputs(t=333, nh=nh, nkv=nkv, seed=nh * 10 + nkv, key_block=128), keys=128)


@needs_gpu
@pytest.mark.parametrize("key_block", [0, 64])
def test_masked_keys_and_rows_that_see_nothing(key_block):
    """left padding (row 1's first 37 slots hidden: its first queries see no key, output 0) and
    holes inside and at a tile edge (slots 127, 128, 200..259)"""
    hidden = {1: list(range(37)) + [127, 128] + list(range(200, 260))}
    got = check(make_inputs(batch=2, t=290, dtype="bfloat16", key_block=key_block, hidden=hidden, seed=5),
                keys=key_block)
    assert not got.reshape(2, 290, -1)[1, :37].any()


@needs_gpu
@pytest.mark.parametrize("q_scale", [8.0, 30.0])
def test_peaked_softmax(q_scale):
    """large scores: the running max moves across tiles and blocks; nearly one-hot rows"""
    check(make_inputs(t=700, q_scale=q_scale, key_block=256, seed=11), keys=256)


@needs_gpu
def test_batch_rows():
    check(make_inputs(batch=3, t=257, past=70, key_block=192, seed=13), keys=192)


@needs_gpu
def test_head_dim_128_keeps_the_mma_kernel():
    check(make_inputs(t=300, hd=128, seed=17))


# ------------------------------------------------------------------ through the model


@needs_gpu
@pytest.mark.parametrize("keys", [0, 128])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cache_format", ["latent", "kv"])
def test_model_prefill_in_chunks_takes_the_kernel(cache_format, dtype, keys):
    """a model of head_dim 64 prefilling in chunks (passes of 64 tokens per row, a latent cache
    expanded 128 keys at a time; keys=128: one launch per 128 keys) under auto and under mma:
    the same logits within the 16-bit tolerance, the wgmma kernel counted on compute capability
    9.0 and never under mma"""
    sys.path.insert(0, HERE)
    from conftest import SMALL  # noqa: PLC0415
    import copy  # noqa: PLC0415
    cfg = copy.deepcopy(SMALL)
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg["vocab_size"], size=(2, 203))
    logits, counts = {}, {}
    for attention in ("auto", "mma"):
        m = xoron.MoELlamaForCausalLM(cfg, dtype=dtype, device="cuda", seed=0, cache_format=cache_format,
                                      options={"cuda_attention": attention, "prefill_chunk": 128,
                                               "cuda_attention_keys": keys})
        logits[attention] = np.asarray(m(input_ids=ids).logits, np.float64)
        counts[attention] = m._engine.prefill_attention_counts()
    print(counts, rel_err(logits["auto"], logits["mma"]))
    assert counts["mma"]["hopper"] == 0 and counts["mma"]["mma"] > 0
    if HOPPER:
        assert counts["auto"]["hopper"] > 0 and counts["auto"]["mma"] == 0
    assert rel_err(logits["auto"], logits["mma"]) <= 1e-2
