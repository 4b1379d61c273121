"""Decode and prefill speed of two builds of xoron, interleaved in one process each.

    python benchmarks/bench_before_after.py --checkout /path/to/old/checkout [--device cuda]

Each round runs the old checkout and this one in turn (a fresh interpreter each, so the two
extensions never share a process) and prints both figures and their ratio. The measurement uses
only the constructor, `forward` and `generate`, which every build has, so a checkout from before
a refactor can be measured with the same code as the current one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

sys.path.insert(0, ROOT)  # this checkout's config table; the children import each side's own engine
from xoron.config import DEFAULTS, MOE_DEFAULTS  # noqa: E402

# The SPEC section 1 defaults with MoE on, as bench_gpu.py measures them.
CONFIG = dict(DEFAULTS, num_key_value_heads=DEFAULTS["num_attention_heads"],
              moe_config=dict(MOE_DEFAULTS, use_moe=True, intermediate_size=DEFAULTS["intermediate_size"]))

CHILD = r"""
import json, math, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import xoron
args = json.loads(sys.argv[2])
cfg = dict(args["config"], num_hidden_layers=args["layers"])
m = xoron.MoELlamaForCausalLM(cfg, dtype=args["dtype"], device=args["device"], seed=0)
V = cfg["vocab_size"]
out = {"xoron_file": xoron.__file__}

def timed(fn, reps):
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best

for T in args["prefill"]:
    ids = np.random.default_rng(T).integers(0, V, size=(1, T), dtype=np.int64)
    # generate(max_new_tokens=1) is a prefill plus one sampled token in every build
    s = timed(lambda: m.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None), 3)
    out[f"prefill_T{T}_tok_s"] = T / s
for b, ctx in args["decode"]:
    ids = np.random.default_rng(b + ctx).integers(0, V, size=(b, ctx), dtype=np.int64)
    steps = args["steps"]
    kw = dict(do_sample=False, eos_token_id=None)
    short = timed(lambda: m.generate(ids, max_new_tokens=1, **kw), 2)
    full = timed(lambda: m.generate(ids, max_new_tokens=steps + 1, **kw), 2)
    out[f"decode_b{b}_ctx{ctx}_tok_s"] = b * steps / (full - short)
print("RESULT " + json.dumps(out))
"""


def run_side(checkout: str, job: dict) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, checkout, json.dumps(job)], capture_output=True,
                       text=True, cwd=checkout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{checkout}: no result (rc {p.returncode})\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", required=True, help="the older source checkout, built in place")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--prefill", type=int, nargs="*", default=[])
    ap.add_argument("--decode", nargs="*", default=["1x32", "64x32"], help="batch x context pairs")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    job = {"config": CONFIG, "layers": args.layers, "dtype": args.dtype, "device": args.device,
           "prefill": args.prefill, "steps": args.steps,
           "decode": [[int(x) for x in s.split("x")] for s in args.decode]}
    sides = {"before": os.path.abspath(args.checkout), "after": ROOT}
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for name, path in sides.items():
            t = time.time()
            res = run_side(path, job)
            runs[name].append(res)
            print(f"round {r + 1} {name} ({res.pop('xoron_file')}, {time.time() - t:.0f}s):", flush=True)
            for k, v in res.items():
                print(f"    {k}: {v:,.0f}")
    print("\nfigure                         before runs           after runs            after/before (best)")
    for k in runs["after"][0]:
        b = [x[k] for x in runs["before"]]
        a = [x[k] for x in runs["after"]]
        print(f"{k:30s} {', '.join(f'{x:,.0f}' for x in b):21s} {', '.join(f'{x:,.0f}' for x in a):21s} "
              f"{max(a) / max(b):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
