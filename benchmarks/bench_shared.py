"""CPU decode on a shared machine: the demo model's greedy decode alone, beside one busy
process, and as two processes at once (issue 14).

    python benchmarks/bench_shared.py                  # xoron's defaults
    python benchmarks/bench_shared.py --repeats 5      # more repeats on a noisy machine

Each case runs in fresh processes (libgomp reads its wait policy when it loads), decoding
--tokens greedy tokens after an 8-token prompt, best of --rounds per process; every case is
repeated --repeats times and the median and range are printed. Besides xoron's defaults it
measures the settings a user might have instead: libgomp's own spin (GOMP_SPINCOUNT=300000,
its default when nothing is set), OMP_WAIT_POLICY=passive, one thread, and the short spin xoron set before (GOMP_SPINCOUNT=100).
The load average is
printed before and after: other work on the machine moves every figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import os, sys, time
import numpy as np
import xoron
threads = int(sys.argv[3])
if threads:
    xoron.set_num_threads(threads)
m = xoron.MoELlamaForCausalLM.from_pretrained(os.path.join(os.path.dirname(xoron.__file__), "demo"))
ids = np.arange(1, 9)[None]
n, rounds = int(sys.argv[1]), int(sys.argv[2])
m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
best = 0.0
for _ in range(rounds):
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[])
    best = max(best, n / (time.perf_counter() - t0))
print(best)
"""

SETTINGS = [
    ("xoron default", {}, 0),
    ("GOMP_SPINCOUNT=300000 (libgomp's default)", {"GOMP_SPINCOUNT": "300000"}, 0),
    ("OMP_WAIT_POLICY=passive", {"OMP_WAIT_POLICY": "passive"}, 0),
    ("xoron default, 1 thread", {}, 1),
    ("GOMP_SPINCOUNT=100 (the default before 10000)", {"GOMP_SPINCOUNT": "100"}, 0),
]


def env_for(extra):
    e = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    e.update(extra)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(args, extra, threads):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(args.tokens), str(args.rounds), str(threads)],
                            stdout=subprocess.PIPE, text=True, env=env_for(extra))


def finish(p):
    out, _ = p.communicate(timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"worker failed ({p.returncode})")
    return float(out.strip())


def case(args, extra, threads, kind):
    if kind == "alone":
        return [finish(start(args, extra, threads))]
    if kind == "beside busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            return [finish(start(args, extra, threads))]
        finally:
            busy.kill()
            busy.wait()
    a, b = start(args, extra, threads), start(args, extra, threads)
    return [finish(a), finish(b)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", type=int, nargs="*", default=list(range(len(SETTINGS))),
                   help="indices into: " + "; ".join(f"{i}: {s[0]}" for i, s in enumerate(SETTINGS)))
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    import xoron
    print(f"python {' '.join(sys.argv)}\n")
    print(f"{os.cpu_count()} CPUs, {xoron._C.physical_cores()} physical cores usable; default threads "
          f"{xoron.get_num_threads()}; load average before: {' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print("| setting | case | tokens/s (median of repeats) | range | % of alone |")
    print("|---|---|---:|---:|---:|")
    for i in args.settings:
        name, extra, threads = SETTINGS[i]
        solo = None
        for kind in ("alone", "beside busy", "two at once"):
            runs = [case(args, extra, threads, kind) for _ in range(args.repeats)]
            per = [v for r in runs for v in r]
            med = statistics.median(per)
            solo = med if kind == "alone" else solo
            print(f"| {name} | {kind} | {med:.1f} | {min(per):.1f} - {max(per):.1f} | {100 * med / solo:.0f}% |",
                  flush=True)
    print(f"\nload average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
