"""CPU benchmark: xoron float32 / bfloat16 / int8 / int4 beside PyTorch eager float32.

    python benchmarks/bench_cpu.py                 # default model, all cores
    python benchmarks/bench_cpu.py --layers 2      # quick look

The model is the default configuration (vocab 151643, hidden 1024, 12 layers, 16 heads, nkv 16,
kv_lora_rank 512, MoE with 8 experts top-2 on every 2nd layer plus a shared expert,
intermediate 2048, tied embeddings) with random weights (std 0.02). The xoron models are
built from one seed, so bf16, int8 and int4 hold the float32 weights rounded / quantised; the
PyTorch model (xoron/torch_reference.py, eager, computed like the original module with its
per-expert loop, plus a latent KV cache) gets the same float32 weights.

Measured, in one process on the same cores (the two OpenMP runtimes never run at once):
  forward  forward(input_ids [1, T]) returning the logits of all T positions (HF semantics;
           the same work in both engines)
  TTFT     generate(input_ids [1, T], max_new_tokens=1): prefill to the first token. xoron's
           generate computes the LM head for the last position only; the PyTorch model's
           generate, like the original module, computes it for all T positions.
  decode   greedy generate(prompt [b, P], do_sample=False): ms per generated token,
           (t(N new tokens) - t(1 new token)) / (N - 1), so the prompt's prefill cancels out.
           xoron runs it with its default latent cache (K/V re-expanded from the cached latent
           at every step, as the PyTorch model does) and again with cache_format="kv"
           (K/V cached once expanded), shown as "xoron <dtype> kv".
Every figure is the best of --rounds runs (other tenants of a shared machine only add time);
the median is printed beside it.

Bandwidth: the machine's read bandwidth is measured (before and after, the larger is used) by
the engine's own C loop (all threads,
4 sequential streams each, software prefetch, 2 MB pages: the access pattern of the decode
kernels). A decode step must read every active weight once, so its floor is
    active weight bytes per token / bandwidth,
active = one embedding row + attention (q, kv_a latent rows, kv_b, o) + dense FFNs + the
router, top-k routed and shared experts of MoE layers + the LM head. Each decode figure is
printed as (floor / measured), the percentage of the bandwidth limit reached. At batch 8 the
floor is the same bytes per step (shared by 8 tokens).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=0,
                   help="threads for both engines (0: xoron's default, the physical cores)")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--prompt", type=int, default=16, help="prompt length for decode")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens generated per decode run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "int8", "int4"])
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-kv", action="store_true", help="skip the cache_format='kv' decode rows")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


ARGS = parse_args()

sys.path.insert(0, ROOT)  # run from a source checkout without installing
import numpy as np  # noqa: E402

import xoron  # noqa: E402
from xoron import _testing  # noqa: E402
from xoron.config import DEFAULTS, MOE_DEFAULTS  # noqa: E402

THREADS = ARGS.threads or xoron.get_num_threads()
xoron.set_num_threads(THREADS)


def config(layers: int) -> dict:
    """The SPEC section 1 defaults with MoE on and `layers` layers."""
    return dict(DEFAULTS, num_hidden_layers=layers, num_key_value_heads=DEFAULTS["num_attention_heads"],
                moe_config=dict(MOE_DEFAULTS, use_moe=True, intermediate_size=DEFAULTS["intermediate_size"]))


BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}
GROUP = 32   # weights per float32 scale (int8, int4)


def active_bytes(cfg: dict, dtype: str) -> float:
    """Weight bytes one decode step reads (see the module docstring)."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv, r = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["kv_lora_rank"]
    hd, I = H // nh, cfg["intermediate_size"]
    moe = cfg["moe_config"]
    E, K, freq, Ie = moe["num_experts"], moe["num_experts_per_tok"], moe["moe_layer_freq"], moe["intermediate_size"]
    b = BYTES[dtype]
    grouped = dtype in ("int8", "int4")
    row = (lambda rows, cols: rows * cols * b + (rows * -(-cols // GROUP) * 4 if grouped else 0))  # + group scales
    total = H * b + row(V, H)                                         # embedding row, LM head
    for layer in range(L):
        total += row(nh * hd, H) + row(r, H) + row(2 * nkv * hd, r) + row(H, nh * hd)   # attention
        if moe["use_moe"] and layer % freq == freq - 1:
            total += E * H * 4 if grouped else E * H * b               # router (float32 under int8/int4)
            total += (K + 1) * (row(2 * Ie, H) + row(H, Ie))          # top-k + shared experts
        else:
            total += row(2 * I, H) + row(H, I)
    return total


def read_bandwidth() -> float:
    lib = ctypes.CDLL(_testing.__file__)
    lib.xo_hook_read_bandwidth.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.xo_hook_read_bandwidth.restype = ctypes.c_double
    return max(lib.xo_hook_read_bandwidth(1024, 5) for _ in range(2)) * 1e9


def kernel_isa() -> str:
    lib = ctypes.CDLL(_testing.__file__)
    lib.xo_hook_isa_name.restype = ctypes.c_char_p
    return lib.xo_hook_isa_name().decode()


def timed(fn, rounds: int) -> list:
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def settle():
    """Lets the other engine's OpenMP threads stop spinning before timing this one."""
    gc.collect()
    time.sleep(0.5)


class Results:
    def __init__(self):
        self.rows = {}  # (name, case) -> (best_s, median_s)

    def add(self, name, case, times):
        self.rows[(name, case)] = (min(times), statistics.median(times))


def bench_prefill(name, forward, generate, lengths, vocab, res, rounds):
    rng = np.random.default_rng(0)
    for T in lengths:
        ids = rng.integers(0, vocab, size=(1, T), dtype=np.int64)
        res.add(name, f"prefill{T}", timed(lambda: forward(ids), rounds))
        res.add(name, f"ttft{T}", timed(lambda: generate(ids, 1), rounds))
        print(f"  {name:16s} T={T:4d}: forward {min(res.rows[(name, f'prefill{T}')]) * 1e3:9.1f} ms, "
              f"first token {min(res.rows[(name, f'ttft{T}')]) * 1e3:9.1f} ms", flush=True)


def bench_decode(name, generate, batches, prompt, new_tokens, vocab, res, rounds):
    """ms per generated token (per step: one token for each of b rows)."""
    rng = np.random.default_rng(1)
    for b in batches:
        ids = rng.integers(0, vocab, size=(b, prompt), dtype=np.int64)
        generate(ids, 2)  # warm-up
        per_step = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            generate(ids, 1)
            t1 = time.perf_counter()
            generate(ids, new_tokens)
            t2 = time.perf_counter()
            per_step.append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1))
        res.rows[(name, f"decode{b}")] = (min(per_step), statistics.median(per_step))
        print(f"  {name:16s} decode b={b}: {min(per_step) * 1e3:9.2f} ms/step", flush=True)


def main():
    cfg = config(ARGS.layers)
    V = cfg["vocab_size"]
    print(f"# xoron CPU benchmark\n")
    print(f"python {' '.join(sys.argv)}\n")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bw0 = read_bandwidth()
    print(f"CPU: {cpu}, {os.cpu_count()} CPUs ({xoron._C.physical_cores()} physical cores usable); "
          f"threads used: {THREADS}; kernels: {kernel_isa()}")
    print(f"load average at the start: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"read bandwidth (engine C loop, all threads) before: {bw0 / 1e9:.1f} GB/s")
    print(f"model: {ARGS.layers} layers, default configuration, random weights (seed {ARGS.seed})")
    print(f"decode: prompt {ARGS.prompt} tokens, {ARGS.new_tokens} new tokens, greedy; best of {ARGS.rounds}\n",
          flush=True)

    res = Results()
    sd = None
    for dt in ARGS.dtypes:
        t0 = time.perf_counter()
        m = xoron.MoELlamaForCausalLM(cfg, dtype=dt, seed=ARGS.seed)
        print(f"xoron {dt}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        if dt == "float32" and not ARGS.no_torch:
            sd = m.state_dict()
        name = f"xoron {dt}"
        if hasattr(m, "generate"):
            gen = lambda ids, n: m.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)  # noqa: E731
        else:
            def gen(ids, n):
                out = m(input_ids=ids, use_cache=True)
                cache = out.past_key_values
                tok = out.logits[:, -1].argmax(-1)
                for _ in range(n - 1):
                    out = m(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1)
        bench_prefill(name, lambda ids: m(input_ids=ids).logits, gen, ARGS.prefill, V, res, ARGS.rounds)
        bench_decode(name, gen, ARGS.batches, ARGS.prompt, ARGS.new_tokens, V, res, ARGS.rounds)
        if not ARGS.no_kv:
            m.cache_format = "kv"
            bench_decode(name + " kv", gen, ARGS.batches, ARGS.prompt, ARGS.new_tokens, V, res, ARGS.rounds)
        del m
        gc.collect()

    if not ARGS.no_torch:
        settle()
        import torch
        from xoron.torch_reference import TorchMoELlama
        torch.set_num_threads(THREADS)
        if sd is None:
            sd = xoron.MoELlamaForCausalLM(cfg, dtype="float32", seed=ARGS.seed).state_dict()
        with torch.device("meta"):
            tm = TorchMoELlama(cfg)
        tm.load_state_dict({k: torch.as_tensor(sd[k]) for k in tm.state_dict()}, strict=True, assign=True)
        tm.eval()
        name = "torch float32"
        print(f"torch {torch.__version__} eager float32, {torch.get_num_threads()} threads", flush=True)

        def tfwd(ids):
            with torch.inference_mode():
                return tm(torch.from_numpy(ids))[1]

        def tgen(ids, n):
            with torch.inference_mode():
                return tm.generate(torch.from_numpy(ids), max_new_tokens=n, do_sample=False, eos_token_id=None)

        bench_prefill(name, tfwd, tgen, ARGS.prefill, V, res, ARGS.rounds)
        bench_decode(name, tgen, ARGS.batches, ARGS.prompt, ARGS.new_tokens, V, res, ARGS.rounds)

    # ---- report
    bw1 = read_bandwidth()
    bw = max(bw0, bw1)
    print(f"\nread bandwidth after: {bw1 / 1e9:.1f} GB/s; limits below use {bw / 1e9:.1f} GB/s")
    names = [f"xoron {d}" for d in ARGS.dtypes] + ([] if ARGS.no_torch else ["torch float32"])
    dnames = names + ([] if ARGS.no_kv else [f"xoron {d} kv" for d in ARGS.dtypes])
    ref = "torch float32"

    def vs(key, best):
        return f"{res.rows[(ref, key)][0] / best:.2f}x" if (ref, key) in res.rows else "-"

    print("\n## Prefill, batch 1\n")
    print("forward = logits of all T positions; first token = generate(max_new_tokens=1).\n")
    print("| engine | T | forward ms (best) | median | vs torch f32 | first token ms (best) | median | vs torch f32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for T in ARGS.prefill:
        for n in names:
            fb, fm = res.rows[(n, f"prefill{T}")]
            tb, tmed = res.rows[(n, f"ttft{T}")]
            print(f"| {n} | {T} | {fb * 1e3:.0f} | {fm * 1e3:.0f} | {vs(f'prefill{T}', fb)} | "
                  f"{tb * 1e3:.0f} | {tmed * 1e3:.0f} | {vs(f'ttft{T}', tb)} |")
    print(f"\n## Decode (greedy; prompt {ARGS.prompt}, {ARGS.new_tokens} new tokens)\n")
    print("| engine | batch | ms/step (best) | median | tokens/s | vs torch f32 | weight bytes/step | "
          "bandwidth floor ms | % of limit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in ARGS.batches:
        for n in dnames:
            if (n, f"decode{b}") not in res.rows:
                continue
            best, med = res.rows[(n, f"decode{b}")]
            dt = n.split()[1]
            ab = active_bytes(cfg, dt)
            floor = ab / bw
            print(f"| {n} | {b} | {best * 1e3:.2f} | {med * 1e3:.2f} | {b / best:.1f} | {vs(f'decode{b}', best)} | "
                  f"{ab / 1e9:.3f} GB | {floor * 1e3:.2f} | {100 * floor / best:.0f}% |")


if __name__ == "__main__":
    main()
