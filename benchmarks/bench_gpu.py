"""GPU benchmark: xoron's CUDA backend beside the eager PyTorch model (xoron/torch_reference.py),
same GPU, same process, default configuration (vocab 151643, hidden 1024, 12 layers, 16 heads,
MoE 8 experts top-2 on every 2nd layer, intermediate 2048), random weights, bfloat16.

    python benchmarks/bench_gpu.py [--quick] [--json out.json] [--skip-torch] [--budget SECONDS]

Measures
  prefill  tokens/s to the first token for one sequence of T tokens (T = 512, 4096, 32768):
           xoron: one forward computing the last position's logits (engine forward,
           last_only); PyTorch: the model's layers over T tokens, then norm + lm_head on
           the last position only (its forward would also compute all T x V logits).
  decode   tokens/s for batch b at context c: one token per row per step through the cache.
           xoron: generate() (greedy; the loop in C, each step a replayed CUDA graph; the
           prefill's time subtracted), with the latent cache and with cache_format="kv";
           also generate() sampling (top_k=50, top_p=0.9). PyTorch: a loop of forward calls
           with its working KV cache (fixed random tokens, no argmax or sampling timed).
  memory   peak GPU memory of each (xoron: device memory in use after its runs, measured
           with cudaMemGetInfo while nothing else is allocated; PyTorch: max_memory_allocated).
Each figure is the best of a few timed repetitions after a warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout without installing

from xoron.torch_reference import TorchMoELlama  # noqa: E402

import xoron  # noqa: E402

from xoron.config import DEFAULTS, MOE_DEFAULTS  # noqa: E402

# The SPEC section 1 defaults with MoE on, as in the documented usage example.
CONFIG = dict(DEFAULTS, num_key_value_heads=DEFAULTS["num_attention_heads"],
              moe_config=dict(MOE_DEFAULTS, use_moe=True, intermediate_size=DEFAULTS["intermediate_size"]))

T0 = time.time()
BUDGET = 170.0
VARIANTS = {  # model options (xoron.option_table())
    "moe_host": {"cuda_moe": "host"},            # per-expert cuBLASLt GEMMs sized from host-read counts
    "attn_rows": {"cuda_attention": "rows"},     # the row-wise attention kernel for prefill too
    "no_cublaslt": {"cuda_gemm": "builtin"},     # the built-in WMMA GEMM for every product
    "no_pdl": {"cuda_pdl": False},               # no programmatic dependent launches
}


def left() -> float:
    return BUDGET - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def gpu_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def best_time(fn, reps=3, warm=1) -> float:
    for _ in range(warm):
        fn()
    best = math.inf
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------ xoron


def xo_prefill(m, T):
    ids = np.random.default_rng(T).integers(0, CONFIG["vocab_size"], size=(1, T), dtype=np.int64).astype(np.int32)

    def run():
        m._engine.forward(ids, last_only=True)
    reps = 3 if T <= 4096 else 1
    return T / best_time(run, reps=reps, warm=1)


def xo_generate(m, b, ctx, steps, cache_format="latent", **sampling):
    """Decode tokens/s of generate() (the loop in C; steps replayed as CUDA graphs): the time of
    generate(steps + 1 new tokens) less that of generate(1 new token), i.e. without the prefill."""
    prompt = np.random.default_rng(b + ctx).integers(0, CONFIG["vocab_size"], size=(b, ctx), dtype=np.int64)
    kw = {"do_sample": False, "eos_token_id": None, **sampling}
    m.cache_format = cache_format
    try:
        m.generate(prompt, max_new_tokens=4, **kw)  # warm-up
        best_prefill = best_full = math.inf
        for _ in range(2):
            t = time.perf_counter()
            m.generate(prompt, max_new_tokens=1, **kw)
            best_prefill = min(best_prefill, time.perf_counter() - t)
            t = time.perf_counter()
            out = m.generate(prompt, max_new_tokens=steps + 1, **kw)
            best_full = min(best_full, time.perf_counter() - t)
        assert out.shape == (b, ctx + steps + 1)
    finally:
        m.cache_format = "latent"
    return b * steps / (best_full - best_prefill)


# ------------------------------------------------------------------ torch


@torch.no_grad()
def torch_prefill(m, T):
    dev = "cuda"
    ids = torch.randint(0, CONFIG["vocab_size"], (1, T), device=dev)

    def run():
        pos = torch.arange(T, device=dev)[None]
        rope = m.rotary(pos)
        qi = torch.arange(T, device=dev)[:, None]
        allowed = (torch.arange(T, device=dev)[None, :] <= qi)[None, None]
        h = m.model.embed_tokens(ids)
        for layer in m.model.layers:
            h, _ = layer(h, rope, rope, allowed, None)
        h = m.model.norm(h[:, -1:])
        return torch.nn.functional.linear(h, m.lm_head_weight()).float()
    reps = 3 if T <= 512 else 2
    return T / best_time(run, reps=reps, warm=1)


@torch.no_grad()
def torch_decode(m, b, ctx, steps):
    dev = "cuda"
    prompt = torch.randint(0, CONFIG["vocab_size"], (b, ctx), device=dev)
    toks = torch.randint(0, CONFIG["vocab_size"], (steps + 2, b, 1), device=dev)
    _, _, past = m(prompt, use_cache=True)
    _, _, past = m(toks[0], past=past, use_cache=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(steps):
        _, logits, past = m(toks[s + 1], past=past, use_cache=True)
    torch.cuda.synchronize()
    return b * steps / (time.perf_counter() - t)


# ------------------------------------------------------------------ main


def main():
    global BUDGET
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer, shorter measurements")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also prefill T=4096 under the backend's switches")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; later measurements are skipped past it")
    args = ap.parse_args()
    BUDGET = args.budget
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(0), "xoron": {}, "torch": {}}
    log("device:", res["device"])

    prefill_T = [512, 4096] if args.quick else [512, 4096, 32768]
    decode = [(1, 32), (16, 32), (64, 32)] + ([] if args.quick else [(1, 4096), (16, 4096), (64, 4096)])

    # ---- xoron ----
    base = gpu_used()
    t = time.time()
    m = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0)
    log(f"xoron model: {m.num_parameters() / 1e6:.0f}M parameters, built in {time.time() - t:.1f}s")
    X = res["xoron"]
    for T in prefill_T:
        if left() < 20:
            break
        try:
            X[f"prefill_T{T}"] = r = xo_prefill(m, T)
            log(f"xoron prefill T={T}: {r:,.0f} tok/s")
        except Exception as e:
            log(f"xoron prefill T={T} failed: {e}")
    X["gpu_bytes_after_prefill"] = gpu_used() - base
    log(f"xoron GPU memory in use after the prefills (pool high-water): {X['gpu_bytes_after_prefill'] / 2**30:.2f} GiB")
    for b, ctx in decode:
        steps = 128 if ctx <= 32 else 64
        for fmt, suffix in (("latent", ""), ("kv", "_kv")):
            if left() < 25:
                break
            try:
                X[f"decode_b{b}_ctx{ctx}{suffix}"] = r = xo_generate(m, b, ctx, steps, fmt)
                log(f"xoron generate() decode b={b} ctx={ctx} ({fmt} cache): {r:,.0f} tok/s")
            except Exception as e:
                log(f"xoron decode b={b} ctx={ctx} ({fmt}) failed: {e}")
    for b in (1, 64):
        if left() < 25:
            break
        try:
            X[f"sample_b{b}_ctx32"] = r = xo_generate(m, b, 32, 128, do_sample=True, top_k=50, top_p=0.9, seed=0)
            log(f"xoron generate() sampling top_k=50 top_p=0.9 b={b} ctx=32: {r:,.0f} tok/s")
        except Exception as e:
            log(f"xoron sampling b={b} failed: {e}")
    X["peak_gpu_bytes"] = gpu_used() - base
    log(f"xoron GPU memory in use (pool high-water): {X['peak_gpu_bytes'] / 2**30:.2f} GiB")
    del m
    gc.collect()

    # ---- the backend's options, on prefill T=4096 (each needs a fresh model) ----
    if args.variants:
        for name, opts in VARIANTS.items():
            if left() < 45:
                break
            try:
                mv = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0, options=opts)
                X[f"prefill_T4096_{name}"] = r = xo_prefill(mv, 4096)
                log(f"xoron prefill T=4096 with {opts}: {r:,.0f} tok/s")
                if name == "no_pdl":
                    for b in (1, 64):
                        X[f"decode_b{b}_ctx32_{name}"] = r = xo_generate(mv, b, 32, 128)
                        log(f"xoron generate() decode b={b} ctx=32 with {opts}: {r:,.0f} tok/s")
                del mv
                gc.collect()
            except Exception as e:
                log(f"xoron variant {name} failed: {e}")

    # ---- torch ----
    if not args.skip_torch and left() > 30:
        P = res["torch"]
        torch.manual_seed(0)
        t = time.time()
        with torch.device("cuda"):
            tm = TorchMoELlama(CONFIG)
        tm = tm.to(torch.bfloat16).eval()
        torch.cuda.reset_peak_memory_stats()
        log(f"torch model built in {time.time() - t:.1f}s")
        for T in prefill_T:
            if left() < 20 or T > 4096:  # the eager model materialises nh x T x T scores: 68 GB at 32768
                if T > 4096:
                    log(f"torch prefill T={T}: not run (its attention needs ~{16 * T * T * 4 * 2 / 2**30:.0f} GiB of scores)")
                continue
            try:
                P[f"prefill_T{T}"] = r = torch_prefill(tm, T)
                log(f"torch prefill T={T}: {r:,.0f} tok/s")
            except Exception as e:
                log(f"torch prefill T={T} failed: {e}")
        for b, ctx in decode:
            if left() < 15:
                break
            if ctx > 32 and b > 1:
                continue  # the eager prefill of b x 4096 tokens needs b x 16 x 4096^2 scores
            steps = 8 if b == 1 else 16
            try:
                P[f"decode_b{b}_ctx{ctx}"] = r = torch_decode(tm, b, ctx, steps)
                log(f"torch decode b={b} ctx={ctx}: {r:,.0f} tok/s")
            except Exception as e:
                log(f"torch decode b={b} ctx={ctx} failed: {e}")
        P["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        log(f"torch peak GPU memory: {P['peak_gpu_bytes'] / 2**30:.2f} GiB")
        del tm
        gc.collect()
        torch.cuda.empty_cache()

    # ---- table ----
    print("\n| measurement | xoron (tok/s) | PyTorch eager (tok/s) | ratio |")
    print("|---|---:|---:|---:|")
    for k in sorted(set(res["xoron"]) | set(res["torch"])):
        if "bytes" in k:
            continue
        a, b = res["xoron"].get(k), res["torch"].get(k)
        ratio = f"{a / b:.1f}x" if a and b else "-"
        print(f"| {k} | {a:,.0f} | {b:,.0f} | {ratio} |" if a and b else
              f"| {k} | {a if a is None else f'{a:,.0f}'} | {b if b is None else f'{b:,.0f}'} | {ratio} |")
    for who in ("xoron", "torch"):
        if "peak_gpu_bytes" in res[who]:
            print(f"peak GPU memory {who}: {res[who]['peak_gpu_bytes'] / 2**30:.2f} GiB")
    if "gpu_bytes_after_prefill" in res["xoron"]:
        print(f"xoron GPU memory after the prefill runs: {res['xoron']['gpu_bytes_after_prefill'] / 2**30:.2f} GiB")
    print(f"total benchmark time {time.time() - T0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
