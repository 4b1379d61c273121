"""GPU time per kernel of one prefill (the default configuration of bench_gpu.py, bf16, latent
cache, logits for the last position only), from the CUDA profiler (torch.profiler, which records
every kernel of the process, xoron's included).

    python benchmarks/profile_prefill_kernels.py [--tokens 32768,131072] [--options prefill_chunk=4096] [--top 15]

Prints, per T, the kernels' GPU milliseconds summed over the whole prefill, the largest first,
with their share of the total and their launch count, and the wall time of a warm call outside
the profiler (the difference from the kernel sum is time the GPU was idle).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import xoron  # noqa: E402
from bench_gpu import CONFIG, random_ids  # noqa: E402
from profile_decode_kernels import profile_rows  # noqa: E402


def parse_options(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'}"""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name] = value
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--options", default="", help="engine options, name=value comma-separated")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    m = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0,
                                  options=parse_options(args.options))
    m._engine.forward(random_ids(1, 512, 1).astype("int32"), logits_to_keep=1)  # warm-up
    for t in (int(x) for x in args.tokens.split(",")):
        ids = random_ids(1, t, t).astype("int32")
        m._engine.forward(ids, logits_to_keep=1)  # the first call at T also builds its products' plans
        torch.cuda.synchronize()
        start = time.perf_counter()
        m._engine.forward(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m._engine.forward(ids, logits_to_keep=1)
            torch.cuda.synchronize()
        rows = [(us / 1e3, int(n), name) for us, n, name in profile_rows(prof)]
        total = sum(r[0] for r in rows)
        print(f"\n## T={t} options={args.options or 'defaults'}: wall {wall * 1e3:.1f} ms, "
              f"kernels {total:.1f} ms, {sum(r[1] for r in rows)} launches")
        for ms, n, name in rows[:args.top]:
            print(f"{ms:9.2f} ms {100 * ms / total:5.1f}%  x{n:<6d} {name[:100]}")


if __name__ == "__main__":
    main()
