"""The CPU's AMX tile products (backends/cpu/amx.c) beside the kernels that run without them,
per storage dtype and rows of x: y = x @ W.T through the backend's matmul, every thread.

    python benchmarks/bench_amx.py                          # the crossover shapes and prefill
    python benchmarks/bench_amx.py --shapes 1024x512 --rows 4 8 16 33 40 64

"amx" forces the tile kernels at every row count (cpu_isa amx, cpu_gemv_max_rows 0); "without"
is what a CPU without AMX runs (cpu_isa avx512vnni and its built-in rule: the matrix-vector
kernels up to 40 rows, the widened-tile sgemm above). The built-in rule with AMX
(XO_CPU_AMX_BF16_GEMV_MAX_ROWS, XO_CPU_GEMV_MAX_ROWS) takes the faster of the two by these
figures. Each figure is the best of --iters calls (xoron._testing's xo_hook_time_matmul).
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

DTYPES = {"bfloat16": 3, "int8": 4, "int4": 5}   # xo_dtype


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["1024x512", "4096x1024"])
    ap.add_argument("--rows", type=int, nargs="*", default=[4, 8, 16, 33, 40, 64, 512])
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    lib = ctypes.CDLL(_testing.__file__)
    lib.xo_hook_time_matmul.restype = ctypes.c_double
    lib.xo_hook_time_matmul.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.xo_hook_isa_name.restype = ctypes.c_char_p
    if lib.xo_hook_isa_name().decode() != "amx":
        raise SystemExit(f"this CPU's best kernel set is {lib.xo_hook_isa_name().decode()}, not amx")

    def timed(code, out, k, m, options):
        names = (ctypes.c_char_p * len(options))(*[n.encode() for n in options])
        values = (ctypes.c_char_p * len(options))(*[str(v).encode() for v in options.values()])
        s = lib.xo_hook_time_matmul(code, out, k, m, a.iters, ctypes.cast(names, ctypes.c_void_p),
                                    ctypes.cast(values, ctypes.c_void_p), len(options))
        if s <= 0:
            raise SystemExit(f"timing {code} {out}x{k} m={m} {options} failed")
        return s

    print(f"python {' '.join(sys.argv)}\n")
    print(f"threads {xoron.get_num_threads()}; load average {' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print("| W [out x in] | dtype | rows of x | amx ms (best) | without AMX ms | without / amx |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in a.shapes:
        out, k = (int(v) for v in shape.split("x"))
        for dt in a.dtypes:
            for m in a.rows:
                amx = timed(DTYPES[dt], out, k, m, {"cpu_isa": "amx", "cpu_gemv_max_rows": 0})
                without = timed(DTYPES[dt], out, k, m, {"cpu_isa": "avx512vnni"})
                print(f"| {shape} | {dt} | {m} | {amx * 1e3:.3f} | {without * 1e3:.3f} | {without / amx:.2f} |", flush=True)
    print(f"\nload average at the end {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
