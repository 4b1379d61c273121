"""GPU time per kernel of eager decode steps (the default configuration of bench_gpu.py, bf16),
under each cuda_attention value and cache format given, from the CUDA profiler (torch.profiler,
which records every kernel of the process, xoron's included).

    python benchmarks/profile_decode_kernels.py [--shapes 1x32,64x32,1x4096] [--options auto,rows] [--cache latent,kv] [--steps 8]
    python benchmarks/profile_decode_kernels.py --draw [--shapes 1x32,64x32] [--steps 32]

Prints, per shape and option, the kernels' GPU microseconds per decode step (summed over the
12 layers), the largest first, the total, and how many kernels (and copies or memsets) a step
launches: at batch 1 their latencies, not their bytes, bound a step. Steps run eagerly
(cuda_graphs=0): the kernels are those a replayed graph holds, without the launch gaps (an eager
step also uploads its ids and reads its logits back: copies a replayed step does not make); and
without programmatic dependent launch (cuda_pdl=0), under which a kernel starts before the one
it depends on ends and its span includes that wait.

--draw profiles whole generate() calls instead (graphs and all, as bench_gpu.py runs them),
greedy and then each sampling setting bench_gpu.py measures (its SAMPLINGS), and prints the
GPU microseconds per step of the kernels that choose the next token (argmax or the draw) beside
the call's whole kernel time per step.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import xoron  # noqa: E402
from bench_gpu import CONFIG, SAMPLINGS, random_ids  # noqa: E402


def kernel_times(m, b, ctx, steps):
    ids = random_ids(b, ctx + steps + 2, b + ctx)
    out = m(input_ids=ids[:, :ctx], use_cache=True)
    cache = out.past_key_values
    out = m(input_ids=ids[:, ctx:ctx + 1], past_key_values=cache, use_cache=True)  # warm-up step
    cache = out.past_key_values
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(ctx + 1, ctx + 1 + steps):
            out = m(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        torch.cuda.synchronize()
    return profile_rows(prof, steps)


def draw_times(m, b, ctx, steps):
    """per step: (kernel us in a generate() call, [(us, launches, name) of the token-choosing kernels]),
    greedy then sampling; the prefill's kernels are in the call's total (divided by steps too)"""
    prompt = random_ids(b, ctx, b + ctx)
    out = []
    for kw in [{"do_sample": False}] + [{"do_sample": True, "seed": 0, **s} for s in SAMPLINGS.values()]:
        m.generate(prompt, max_new_tokens=steps + 1, eos_token_id=None, **kw)  # warm-up: records the graphs
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.generate(prompt, max_new_tokens=steps + 1, eos_token_id=None, **kw)
            torch.cuda.synchronize()
        rows = profile_rows(prof, steps)
        chosen = [r for r in rows if "sample" in r[2] or "argmax" in r[2]]
        out.append((kw, sum(r[0] for r in rows), chosen))
    return out


def profile_rows(prof, per=1):
    """(GPU microseconds, launches, name) of each kernel the profiler saw, over `per`, largest first"""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t > 0:
            rows.append((t / per, e.count / per, e.key))
    return sorted(rows, reverse=True)


def is_copy(name):
    """a copy or memset node of the step (the profiler names them so), not a kernel"""
    return name.startswith(("Memcpy", "Memset", "memcpy", "memset"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x32,64x32,1x4096")
    ap.add_argument("--options", default=None, help="cuda_attention values, comma-separated (default auto,rows)")
    ap.add_argument("--cache", default=None, help="cache formats (latent, kv), comma-separated (default latent)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--draw", action="store_true", help="the token-choosing kernels of generate(), greedy and sampling")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if args.draw:
        if args.options is not None or args.cache is not None:
            ap.error("--draw profiles the default model (latent cache, cuda_attention=auto): "
                     "--options and --cache do not apply to it")
        m = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0)
        for b, ctx in shapes:
            for kw, total, chosen in draw_times(m, b, ctx, args.steps):
                print(f"\n## generate() b={b} ctx={ctx} {kw}: {total:.1f} us of kernels per step (prefill included)")
                for us, n, name in chosen:
                    print(f"{us:9.1f} us  x{n:<6g} {name[:110]}")
        return
    for opt in (args.options or "auto,rows").split(","):
        m = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0,
                                      options={"cuda_attention": opt, "cuda_graphs": False, "cuda_pdl": False})
        for fmt in (args.cache or "latent").split(","):
            m.cache_format = fmt
            for b, ctx in shapes:
                rows = kernel_times(m, b, ctx, args.steps)
                total = sum(r[0] for r in rows)
                kernels = sum(r[1] for r in rows if not is_copy(r[2]))
                copies = sum(r[1] for r in rows if is_copy(r[2]))
                print(f"\n## cuda_attention={opt} cache={fmt} b={b} ctx={ctx}: {total:.1f} us of kernels per step, "
                      f"{kernels:g} kernels + {copies:g} copies/memsets per step")
                for us, n, name in rows[:args.top]:
                    print(f"{us:9.1f} us  x{n:<6g} {name[:110]}")
        del m


if __name__ == "__main__":
    main()
