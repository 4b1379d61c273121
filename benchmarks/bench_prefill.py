"""Prefill throughput: one forward pass over a prompt, xoron beside the PyTorch baseline.

    python benchmarks/bench_prefill.py            # SPEC default model (~576M parameters, ~2.3 GB f32)
    python benchmarks/bench_prefill.py --quick    # a small model, finishes in seconds

Long context (--logits-to-keep N): each prompt fills a fresh latent cache, the logits of its
last N positions only, and the memory of the call is printed beside the time:

    python benchmarks/bench_prefill.py --logits-to-keep 1 --tokens 8192 16384 32768 --layers 2 --runs 1
    python benchmarks/bench_prefill.py --device cuda --logits-to-keep 1 --tokens 4096 32768 131072

CPU: peak resident memory of the call (VmHWM, reset before it) beside the cache's bytes, so
that growth linear in T can be read off. GPU (bfloat16): the device pool's high-water mark
during the call beside weights + cache (the pool's use before the call) and the excess over
them, with the compiled PyTorch peer (benchmarks/torch_peer.py: flash SDPA) on the same
weights unless --no-torch; --chunk sets the prefill_chunk option.

Both engines get the same random weights (xoron's, handed to xoron/torch_reference.py's
TorchMoELlama through state_dict) and the same token ids; float32 on the CPU, batch 1.
Each measurement is one warm-up forward per engine and then the median of --runs forwards,
the two engines taking turns (so a busy neighbour slows both alike); a forward
returns the logits of every position, as `model(input_ids)` does. The logits of the two
engines are compared as a sanity check. Without torch only the xoron column is printed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout without installing

import xoron  # noqa: E402
from xoron.config import DEFAULTS, MOE_DEFAULTS  # noqa: E402

# SPEC section 1 defaults, MoE on as in the documented usage example.
DEFAULT = dict(DEFAULTS, num_key_value_heads=DEFAULTS["num_attention_heads"],
               moe_config=dict(MOE_DEFAULTS, use_moe=True, intermediate_size=DEFAULTS["intermediate_size"]))
MOE = DEFAULT["moe_config"]
QUICK = {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 131072,
         "kv_lora_rank": 128, "moe_config": dict(MOE, num_experts=4, intermediate_size=512)}


def timed(fns: list, runs: int) -> list:
    """One warm-up call of each fn, then `runs` rounds calling each fn once in turn
    (interleaved, so that a busy neighbour slows both engines alike). Returns the median
    wall time and the best (shortest) time of each fn, in seconds: [(median, best), ...]."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [(statistics.median(ts), min(ts)) for ts in times]


def load_torch():
    try:
        import torch
        from xoron.torch_reference import TorchMoELlama
    except ImportError as e:
        return None, None, str(e)
    return torch, TorchMoELlama, None


GiB = 2**30


def reset_peak_rss() -> bool:
    """Restarts this process's peak resident set (VmHWM) from its current size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peer_prefill(model, tokens, runs, seed):
    """The compiled PyTorch peer (benchmarks/torch_peer.py) on model's weights: {T: (seconds, peak bytes)}."""
    import torch
    sys.path.insert(0, HERE)
    from torch_peer import TorchPeer
    torch.backends.cuda.matmul.allow_tf32 = False
    peer = TorchPeer.from_xoron(model, dtype=torch.bfloat16, device="cuda")
    peer.compile()
    out = {}
    rng = np.random.default_rng(seed)
    for T in tokens:
        ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, size=(1, T), dtype=np.int64)).cuda()
        cache = peer.new_cache(1, T)
        with torch.no_grad():
            peer.prefill(ids, cache)  # compiles for this length
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(runs):
                cache.length = 0
                t0 = time.perf_counter()
                peer.prefill(ids, cache)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        out[T] = (statistics.median(times), torch.cuda.max_memory_allocated())
        del cache, ids
        torch.cuda.empty_cache()
    del peer
    return out


def long_context(args, config) -> int:
    """Prefill into a fresh cache, logits of the last --logits-to-keep positions: time and memory."""
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    opts = {"prefill_chunk": args.chunk} if args.chunk else None
    tokens = args.tokens or [8192, 16384, 32768]
    t0 = time.perf_counter()
    model = xoron.MoELlamaForCausalLM(config, seed=args.seed, dtype=dtype, device=args.device, options=opts)
    build_s = time.perf_counter() - t0
    moe = config["moe_config"]
    print(f"config: vocab {config['vocab_size']}, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"{config['num_attention_heads']} heads (kv {config['num_key_value_heads']}), kv_lora {config['kv_lora_rank']}, "
          f"MoE {moe['num_experts']} experts top-{moe['num_experts_per_tok']} every {moe['moe_layer_freq']} layers; "
          f"{model.num_parameters():,} parameters, {dtype}, {args.device}, batch 1, latent cache")
    chunk = args.chunk or "default"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, threads {xoron.get_num_threads()}, xoron "
          f"{xoron.__version__}; prefill_chunk {chunk}; logits_to_keep {args.logits_to_keep}; model built in "
          f"{build_s:.1f} s; timing: median of {args.runs} runs after a 256-token warm-up")
    rng = np.random.default_rng(args.seed)
    model(input_ids=rng.integers(0, config["vocab_size"], size=(1, 256)), logits_to_keep=args.logits_to_keep)
    if cuda:
        head = (f"{'T':>7} {'ms':>10} {'tok/s':>9} {'weights GiB':>12} {'cache GiB':>10} {'pool peak GiB':>14} "
                f"{'peak - w - c':>13}")
    else:
        can_reset = reset_peak_rss()
        print(f"RSS after building and the warm-up: {rss_bytes() / GiB:.2f} GiB"
              + ("" if can_reset else " (NOTE: VmHWM cannot be reset here: the peaks below are the process's)"))
        head = f"{'T':>7} {'ms':>10} {'tok/s':>9} {'RSS before GiB':>15} {'peak RSS GiB':>13} {'peak - before':>14} {'cache GiB':>10}"
    print(head)
    print("-" * len(head))
    results = {}
    for T in tokens:
        ids = rng.integers(0, config["vocab_size"], size=(1, T), dtype=np.int64)
        times, peaks = [], []
        for _ in range(args.runs):
            cache = model.new_cache(1)
            before = model.memory_stats(reset_peak=True)["in_use"] if cuda else rss_bytes()
            if not cuda:
                reset_peak_rss()
            t1 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, logits_to_keep=args.logits_to_keep)
            times.append(time.perf_counter() - t1)
            peaks.append(model.memory_stats()["peak"] if cuda else rss_bytes("VmHWM"))
            cache_bytes = cache.nbytes
            del cache
        sec, peak = statistics.median(times), max(peaks)
        results[T] = sec
        line = f"{T:>7} {sec * 1e3:>10.1f} {T / sec:>9.1f}"
        if cuda:
            line += (f" {before / GiB:>12.2f} {cache_bytes / GiB:>10.2f} {peak / GiB:>14.2f} "
                     f"{(peak - before - cache_bytes) / GiB:>13.2f}")
        else:
            line += f" {before / GiB:>15.2f} {peak / GiB:>13.2f} {(peak - before) / GiB:>14.2f} {cache_bytes / GiB:>10.2f}"
        print(line, flush=True)
    if cuda:
        print("weights: the pool's bytes in use before the call (the weights and the engine's kept buffers); "
              "peak - w - c: what the call needed beyond weights and cache")
        if not args.no_torch:
            peer = peer_prefill(model, tokens, args.runs, args.seed)
            print(f"\ncompiled PyTorch peer (torch_peer.py, flash SDPA), same weights, its static K/V cache:")
            print(f"{'T':>7} {'ms':>10} {'tok/s':>9} {'peak GiB':>9} {'xoron/peer tok/s':>17}")
            for T, (sec, peak) in peer.items():
                print(f"{T:>7} {sec * 1e3:>10.1f} {T / sec:>9.1f} {peak / GiB:>9.2f} {sec / results[T]:>17.2f}")
    else:
        print("peak - before: what the call added at its peak (the cache, the activations of one prefill chunk, "
              "the kept logits)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model (hidden 256, 4 layers, vocab 8192)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="prompt lengths (default 128 512; with --logits-to-keep 8192 16384 32768)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: needs --logits-to-keep")
    ap.add_argument("--dtype", default=None, help="with --logits-to-keep: float32 (CPU default), bfloat16 (GPU default), ...")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    ap.add_argument("--logits-to-keep", type=int, default=0,
                    help="N >= 1: long-context mode, prefill into a cache keeping the last N positions' logits")
    ap.add_argument("--chunk", type=int, default=None, help="the prefill_chunk option (default: the engine's)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.device == "cuda" and args.logits_to_keep < 1:
        ap.error("--device cuda measures long-context prefill: give --logits-to-keep N (N >= 1)")
    config = dict(QUICK if args.quick else DEFAULT)
    if args.layers is not None:
        if args.layers < 1:
            ap.error("--layers must be >= 1")
        config["num_hidden_layers"] = args.layers
    if args.logits_to_keep > 0:
        return long_context(args, config)
    if args.chunk or args.dtype:
        ap.error("--chunk and --dtype go with --logits-to-keep")
    tokens = args.tokens or [128, 512]

    torch, TorchMoELlama, why = (None, None, "--no-torch") if args.no_torch else load_torch()

    t0 = time.perf_counter()
    model = xoron.MoELlamaForCausalLM(config, seed=args.seed)
    build_s = time.perf_counter() - t0
    n_params = model.num_parameters()
    moe = config["moe_config"]
    print(f"config: {'quick' if args.quick else 'SPEC default'}: vocab {config['vocab_size']}, hidden "
          f"{config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
          f"(kv {config['num_key_value_heads']}), kv_lora {config['kv_lora_rank']}, MoE {moe['num_experts']} "
          f"experts top-{moe['num_experts_per_tok']} every {moe['moe_layer_freq']} layers, "
          f"intermediate {config['intermediate_size']}")
    print(f"parameters: {n_params:,} ({n_params * 4 / 2**30:.2f} GiB float32); float32, CPU, batch 1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, xoron {xoron.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ""))
    print(f"xoron model built in {build_s:.1f} s; timing: 1 warm-up + median of {args.runs} runs"
          + (", engines interleaved" if torch else ""))

    tm = None
    if torch is not None:
        t0 = time.perf_counter()
        sd = model.state_dict()
        with torch.device("meta"):
            tm = TorchMoELlama(config)
        tm.load_state_dict({k: torch.as_tensor(sd[k]) for k in tm.state_dict()}, strict=True, assign=True)
        tm.eval()
        del sd
        print(f"torch model loaded with the same weights in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"NOTE: torch is not available ({why}); the PyTorch reference column is left out. "
              f"`pip install torch` to get it.")
    print()

    rng = np.random.default_rng(args.seed)
    head = f"{'T':>6} {'xoron ms':>10} {'(best)':>8} {'xoron tok/s':>12}"
    if tm is not None:
        head += f" {'torch ms':>10} {'(best)':>8} {'torch tok/s':>12} {'speed-up':>9} {'max rel diff':>13}"
    print(head)
    print("-" * len(head))
    for T in tokens:
        ids = rng.integers(0, config["vocab_size"], size=(1, T), dtype=np.int64)
        if tm is None:
            ((xs, xb),) = timed([lambda: model(input_ids=ids)], args.runs)
        else:
            tids = torch.from_numpy(ids)
            with torch.inference_mode():
                (xs, xb), (ts, tb) = timed([lambda: model(input_ids=ids), lambda: tm(tids)], args.runs)
        line = f"{T:>6} {xs * 1e3:>10.1f} {xb * 1e3:>8.1f} {T / xs:>12.1f}"
        if tm is not None:
            with torch.inference_mode():
                t_logits = tm(tids)[1].numpy()
            x_logits = model(input_ids=ids).logits
            diff = float(np.max(np.abs(x_logits - t_logits)) / np.max(np.abs(t_logits)))
            line += f" {ts * 1e3:>10.1f} {tb * 1e3:>8.1f} {T / ts:>12.1f} {ts / xs:>8.2f}x {diff:>13.1e}"
            del t_logits, x_logits
        print(line, flush=True)
    print("\nms and tok/s: median of the timed runs; (best): the fastest run", end="")
    if tm is not None:
        print(";\nspeed-up = torch median / xoron median (above 1: xoron is faster); "
              "max rel diff = max|xoron - torch| / max|torch| over the logits", end="")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
