"""The CPU matrix-vector kernels alone: y = x @ W.T with one row of x, per storage dtype and
kernel instruction set, beside the machine's read bandwidth (issue 14).

    python benchmarks/bench_qgemv.py                       # 4096 x 4096 (in cache) and 65536 x 4096
    python benchmarks/bench_qgemv.py --shapes 151643x1024  # the default configuration's LM head

Each figure is the best of --iters calls (xoron._testing's xo_hook_time_matmul: a random weight
stored as the dtype, the product timed through the backend's matmul, every thread), as
weight bytes read per second (int8 1.125 and int4 0.625 bytes per weight, scales included) and
weights per second. A matrix that fits the last-level cache shows the kernels' arithmetic
ceiling; one several times larger shows memory. The read bandwidth is the engine's own C loop
(as benchmarks/bench_cpu.py), measured before and after.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import xoron  # noqa: E402
from xoron import _testing  # noqa: E402

DTYPES = {"bfloat16": (3, 2.0), "int8": (4, 1.125), "int4": (5, 0.625)}   # xo_dtype, bytes per weight
ISAS = ["generic", "avx2", "avx512", "avx512vnni", "amx"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "65536x4096"])
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    ap.add_argument("--isas", nargs="*", default=None, help="default: every set this CPU has but generic")
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    lib = ctypes.CDLL(_testing.__file__)
    lib.xo_hook_time_matmul.restype = ctypes.c_double
    lib.xo_hook_time_matmul.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.xo_hook_read_bandwidth.restype = ctypes.c_double
    lib.xo_hook_read_bandwidth.argtypes = [ctypes.c_int, ctypes.c_int]
    best = lib.xo_hook_best_isa()
    isas = a.isas or ISAS[1:best + 1]

    def timed(code, out, k, isa):
        names = (ctypes.c_char_p * 1)(b"cpu_isa")
        values = (ctypes.c_char_p * 1)(isa.encode())
        return lib.xo_hook_time_matmul(code, out, k, 1, a.iters, ctypes.cast(names, ctypes.c_void_p),
                                       ctypes.cast(values, ctypes.c_void_p), 1)

    bw0 = max(lib.xo_hook_read_bandwidth(1024, 5) for _ in range(2))
    print(f"python {' '.join(sys.argv)}\n")
    print(f"threads {xoron.get_num_threads()}; load average {' '.join(open('/proc/loadavg').read().split()[:3])}; "
          f"read bandwidth before {bw0:.1f} GB/s\n")
    rows = []
    for shape in a.shapes:
        out, k = (int(v) for v in shape.split("x"))
        for dt in a.dtypes:
            code, bpw = DTYPES[dt]
            for isa in isas:
                s = timed(code, out, k, isa)
                if s <= 0:
                    raise SystemExit(f"timing {dt} {shape} {isa} failed")
                rows.append((shape, dt, isa, s, out * k * bpw / s / 1e9, out * k / s / 1e9))
                print(f"  {shape} {dt} {isa}: {s * 1e3:.3f} ms", flush=True)
    bw1 = max(lib.xo_hook_read_bandwidth(1024, 5) for _ in range(2))
    bw = max(bw0, bw1)
    print(f"\nread bandwidth after {bw1:.1f} GB/s; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}; limits below use {bw:.1f} GB/s\n")
    print("| W [out x in] | dtype | kernels | ms (best) | GB/s read | G weights/s | % of read bandwidth |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape, dt, isa, s, gbs, gw in rows:
        print(f"| {shape} | {dt} | {isa} | {s * 1e3:.3f} | {gbs:.1f} | {gw:.1f} | {100 * gbs / bw:.0f}% |")


if __name__ == "__main__":
    main()
