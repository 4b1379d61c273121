"""Prefill throughput: one forward pass over a prompt, xoron beside the PyTorch baseline.

    python benchmarks/bench_prefill.py            # SPEC default model (~576M parameters, ~2.3 GB f32)
    python benchmarks/bench_prefill.py --quick    # a small model, finishes in seconds

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model (hidden 256, 4 layers, vocab 8192)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="prompt lengths (default 128 512)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    tokens = args.tokens or [128, 512]
    config = QUICK if args.quick else DEFAULT

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
