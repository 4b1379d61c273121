"""GPU time of each launch of the device draw (csrc/backends/cuda/sample.cu, sample_rows), over the
default model's own next-token logits (bench_gpu.py's configuration, bf16, context 32), for each
sampling setting given: k_sample_part / k_sample_final with a top-k of at most 1024, the chain of
k_sample_whole stages without one (MAX, [KSELECT x4], [DIST, SELECT, TIES], DRAW).

    python benchmarks/profile_sampling_stages.py [--batches 1,64] [--draws 12]

The draws run through the test hook (xoron._testing: one sample_rows call per draw, its tokens
copied back after each), under the CUDA profiler (torch.profiler). Printed per setting: the
launches per draw, their total, and per launch the marginal microseconds (its end minus the end
of the launch before; the first from its own start): with programmatic dependent launch a kernel
starts before the one before it ends, so its own span overlaps that one's. The first draw is
left out (warm-up).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import xoron  # noqa: E402
from xoron import _testing  # noqa: E402
from bench_gpu import CONFIG, random_ids  # noqa: E402

SETTINGS = [dict(top_k=0, top_p=0.9, temperature=1.0), dict(top_k=0, top_p=1.0, temperature=0.8),
            dict(top_k=50, top_p=0.9, temperature=1.0)]


def hook():
    h = ctypes.CDLL(_testing.__file__)
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    h.xo_hook_cuda_sample_rows.argtypes = [ctypes.c_char_p, i, p, i, i, i, f, i, f, f, p, p, i, i, p, ctypes.c_char_p, i]
    h.xo_hook_cuda_sample_rows.restype = i
    return h


def stage_times(h, logits, kw, draws):
    """(launches per draw, marginal us of each launch) averaged over draws 1 .. draws - 1"""
    b = logits.shape[0]
    seeds = np.arange(draws, dtype=np.uint64)
    steps = np.arange(draws, dtype=np.uint64)
    tokens = np.zeros((draws, b), np.int32)
    err = ctypes.create_string_buffer(512)

    def call():
        rc = h.xo_hook_cuda_sample_rows(xoron._cuda_plugin.encode(), 0, logits.ctypes.data, b, logits.shape[1], 0,
                                        kw["temperature"], kw["top_k"], kw["top_p"], 0.0, seeds.ctypes.data,
                                        steps.ctypes.data, draws, 0, tokens.ctypes.data, err, len(err))
        if rc != 0:
            raise RuntimeError(err.value.decode())

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if "sample" in e.name and e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // draws
    marg = np.zeros(per)
    for d in range(1, draws):
        group = ev[d * per:(d + 1) * per]
        prev = group[0].time_range.start
        for k, e in enumerate(group):
            marg[k] += e.time_range.end - prev
            prev = e.time_range.end
    return per, marg / (draws - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--draws", type=int, default=12)
    args = ap.parse_args()
    m = xoron.MoELlamaForCausalLM(CONFIG, dtype="bfloat16", device="cuda", seed=0)
    h = hook()
    for b in (int(x) for x in args.batches.split(",")):
        with torch.no_grad():
            lg = m(input_ids=random_ids(b, 33, b), logits_to_keep=1).logits[:, -1, :]
        lg = np.ascontiguousarray(lg.float().cpu().numpy() if hasattr(lg, "cpu") else np.asarray(lg), np.float32)
        for kw in SETTINGS:
            per, marg = stage_times(h, lg, kw, args.draws)
            print(f"b={b} {kw}: {per} launches a draw, {marg.sum():.1f} us; per launch "
                  + " ".join(f"{x:.1f}" for x in marg), flush=True)


if __name__ == "__main__":
    main()
