"""Stability figures: memory after many calls, threads sharing one model, Ctrl-C latency.

    python benchmarks/bench_stability.py                  # the demo model, 120 s of threads
    python benchmarks/bench_stability.py --threads-seconds 30

1. RSS (VmRSS) before and after, each after a warm-up of the same calls:
   1,000 forwards, 300 generates, 300 failing calls (bad token ids, shapes, keywords,
   checkpoints) and 200 model create/free cycles (the demo configuration cut to 2 layers,
   random weights). Growth should stay within 1 MB.
2. N threads (default 8) on one model for --threads-seconds, each picking at random a
   forward, a greedy generate, a cache continued by forwards, or reads of a cache another
   thread extends; every result is compared with the same call made alone beforehand.
3. Ctrl-C latency: a child process runs a long generate, a streamed generate and a long
   forward; a timer sends it SIGINT, and the child reports the time until KeyboardInterrupt
   arrives (median and worst of --interrupts tries each); the model is used again after each.
4. With --device cuda: the same on the GPU (the memory rows also give the device memory in use,
   read through torch when it is installed), then forced out-of-memory: a forward whose logits
   cannot fit on the device, a cache grown past the device, and a model capped by the
   cuda_memory_limit option at 1 GiB; each must raise MemoryError and leave the model giving the same
   logits and generations as before.

    python benchmarks/bench_stability.py --device cuda --threads-seconds 60
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import xoron  # noqa: E402
from xoron import MoELlamaForCausalLM  # noqa: E402

DEMO = os.path.join(ROOT, "xoron", "demo")


DEVICE = "cpu"


def device_used_mb():
    """Memory in use on the GPU (all processes), or None on the CPU or without torch."""
    if DEVICE == "cpu":
        return None
    try:
        import torch
    except ImportError:
        return None
    free, total = torch.cuda.mem_get_info(int(DEVICE.partition(":")[2] or 0))
    return (total - free) / 2 ** 20


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def growth(label: str, fn, n: int, warm: int) -> dict:
    for i in range(warm):
        fn(i)
    before, dev_before = rss_kb(), device_used_mb()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    secs = time.perf_counter() - t
    after, dev_after = rss_kb(), device_used_mb()
    row = {"what": label, "calls": n, "rss_before_mb": before / 1024, "rss_after_mb": after / 1024,
           "growth_mb": (after - before) / 1024, "seconds": secs}
    dev = ""
    if dev_before is not None:
        row.update(device_before_mb=dev_before, device_after_mb=dev_after, device_growth_mb=dev_after - dev_before)
        dev = f"  device {dev_before:8.1f} -> {dev_after:8.1f} MB"
    print(f"  {label:<34} {n:5d} calls  RSS {before / 1024:8.1f} -> {after / 1024:8.1f} MB  "
          f"growth {row['growth_mb']:+6.2f} MB{dev}  ({secs:.1f} s)", flush=True)
    return row


def memory_figures(m: MoELlamaForCausalLM) -> list:
    rng = np.random.default_rng(0)
    V = m.config.vocab_size
    prompts = [rng.integers(1, V, size=(1, 16)) for _ in range(8)]
    bad_dir = tempfile.mkdtemp(prefix="xoron-bad-")
    with open(os.path.join(bad_dir, "config.json"), "w") as f:
        json.dump(m.config.to_dict(), f)
    with open(os.path.join(bad_dir, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":")

    def forward(i):
        m(prompts[i % 8])

    def generate(i):
        m.generate(prompts[i % 8], max_new_tokens=8, do_sample=bool(i % 2), seed=i)

    failing = [
        lambda: m(np.array([[V + 5]])),                              # token id out of range (C check)
        lambda: m(prompts[0], attention_mask=np.ones((2, 16))),      # mask shape
        lambda: m.generate(prompts[0], max_new_tokens=4, eos_token_id=V + 1),
        lambda: m(prompts[0], position_ids=np.full((1, 16), 10 ** 6)),
        lambda: MoELlamaForCausalLM.from_pretrained(bad_dir),          # truncated checkpoint
        lambda: m.load_state_dict({"model.norm.weight": np.ones(3)}, strict=False),
    ]

    def fail(i):
        try:
            failing[i % len(failing)]()
        except (ValueError, TypeError, OSError, RuntimeError):
            return
        raise AssertionError(f"failing call {i % len(failing)} did not fail")

    cfg = dict(m.config.to_dict(), num_hidden_layers=2)

    def create_free(i):
        MoELlamaForCausalLM(cfg, seed=i, device=DEVICE)

    return [growth("forward [1, 16] (demo model)", forward, 1000, 100),
            growth("generate 8 new tokens", generate, 300, 30),
            growth("failing calls (6 kinds)", fail, 300, 60),
            growth("model create + free (demo, 2 layers)", create_free, 200, 20)]


def thread_figures(m: MoELlamaForCausalLM, threads: int, seconds: float) -> dict:
    rng = np.random.default_rng(1)
    V = m.config.vocab_size
    prompts = [rng.integers(1, V, size=(b, t)) for b, t in [(1, 5), (2, 9), (1, 33), (3, 4)]]
    want_fwd = [m(p).logits for p in prompts]
    want_gen = [m.generate(p, max_new_tokens=6, do_sample=False, eos_token_id=None) for p in prompts]
    want_cont = []
    for p in prompts:  # the same tokens fed through a cache in two pieces
        c = m.new_cache(p.shape[0])
        m(p[:, :2], past_key_values=c, use_cache=True)
        want_cont.append(m(p[:, 2:], past_key_values=c, use_cache=True).logits)
    shared = m.new_cache(1)
    shared_lock = threading.Lock()  # one thread at a time extends the shared cache; any thread reads it
    stop = time.monotonic() + seconds
    counts = {"forward": 0, "generate": 0, "cache": 0, "reads": 0}
    mismatches = []

    def work(seed):
        r = random.Random(seed)
        while time.monotonic() < stop:
            k = r.randrange(len(prompts))
            op = r.choice(["forward", "generate", "cache", "reads"])
            if op == "forward":
                ok = np.array_equal(m(prompts[k]).logits, want_fwd[k])
            elif op == "generate":
                ok = np.array_equal(m.generate(prompts[k], max_new_tokens=6, do_sample=False, eos_token_id=None),
                                    want_gen[k])
            elif op == "cache":
                c = m.new_cache(prompts[k].shape[0])
                m(prompts[k][:, :2], past_key_values=c, use_cache=True)
                ok = np.array_equal(m(prompts[k][:, 2:], past_key_values=c, use_cache=True).logits, want_cont[k])
            else:
                if shared_lock.acquire(blocking=False):
                    try:
                        if shared.length > 2000:
                            shared_ok = True
                        else:
                            m(prompts[0][:, :1], past_key_values=shared, use_cache=True)
                            shared_ok = True
                    finally:
                        shared_lock.release()
                mask = shared.attention_mask()
                ok = mask.shape[0] == 1 and bool(mask.all()) and shared.length >= mask.shape[1]
            counts[op] += 1
            if not ok:
                mismatches.append(op)

    t = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    secs = time.perf_counter() - t
    row = {"threads": threads, "seconds": secs, "calls": dict(counts), "mismatches": len(mismatches)}
    print(f"  {threads} threads for {secs:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
          f"; results different from the sequential ones: {len(mismatches)}", flush=True)
    return row


_CHILD = r"""
import os, signal, sys, threading, time
import numpy as np
# a bench started in the background (`cmd &`, nohup) inherits SIGINT ignored: restore Python's handler
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, ROOT)
from xoron import MoELlamaForCausalLM
m = MoELlamaForCausalLM.from_pretrained(DEMO, device=DEVICE)
ids = np.arange(1, 9)[None, :]
long = np.arange(4000)[None, :] % 4000 + 1
if DEVICE != "cpu":  # one row of 4000 tokens is over within the timer's delay on a GPU
    long = np.repeat(long, 256, axis=0)
keep = 1 if DEVICE != "cpu" else 0
sent = [0.0]
def kill_in(s):
    def f():
        sent[0] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(s, f).start()
def stream():
    for _ in m.generate_stream(ids, max_new_tokens=4000, do_sample=False, eos_token_id=None):
        pass
work = {"generate": lambda: m.generate(ids, max_new_tokens=4000, do_sample=False, eos_token_id=None),
        "stream": stream, "forward": lambda: m(long, logits_to_keep=keep)}
for kind in KINDS:
    for i in range(TRIES):
        kill_in(0.2 + 0.05 * (i % 5))
        try:
            work[kind]()
            print(kind, "completed", flush=True)
        except KeyboardInterrupt:
            print(kind, time.perf_counter() - sent[0], flush=True)
        m.generate(ids, max_new_tokens=2, do_sample=False)  # usable again
"""


def interrupt_figures(tries: int) -> list:
    kinds = ["generate", "stream", "forward"]
    code = _CHILD.replace("ROOT", repr(ROOT)).replace("DEMO", repr(DEMO)).replace("KINDS", repr(kinds)) \
        .replace("DEVICE", repr(DEVICE)) \
        .replace("TRIES", str(tries))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    lat = {k: [] for k in kinds}
    completed = {k: 0 for k in kinds}
    for line in out.stdout.splitlines():
        kind, value = line.split()
        if value == "completed":
            completed[kind] += 1
        else:
            lat[kind].append(float(value))
    rows = []
    for k in kinds:
        v = lat[k]
        row = {"what": k, "tries": tries, "median_s": statistics.median(v) if v else None,
               "max_s": max(v) if v else None, "completed_uninterrupted": completed[k]}
        rows.append(row)
        print(f"  Ctrl-C during {k:<9} {len(v)}/{tries} interrupted; latency median "
              f"{row['median_s'] * 1000:.1f} ms, worst {row['max_s'] * 1000:.1f} ms", flush=True)
    return rows


def out_of_memory_figures(m: MoELlamaForCausalLM) -> list:
    rng = np.random.default_rng(2)
    V = m.config.vocab_size
    prompt = rng.integers(1, V, size=(2, 12))
    want_logits = m(prompt).logits
    want_gen = m.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    cfg = dict(m.config.to_dict(), num_hidden_layers=2)
    capped = MoELlamaForCausalLM(cfg, seed=5, device=DEVICE, options={"cuda_memory_limit": 1 << 30})
    capped_want = capped(prompt).logits

    T = m.config.max_position_embeddings

    def huge_logits():       # [4096, T, V] float32 logits: far more than the device holds
        m(np.ones((4096, T), dtype=np.int64))

    def huge_cache():        # a cache of 16384 rows of T tokens: more than the device holds
        m(np.ones((16384, T), dtype=np.int64), past_key_values=m.new_cache(16384), use_cache=True,
          logits_to_keep=1)

    def over_the_cap():      # a 1 GiB pool: the model fits, a batch of long prompts does not
        capped(np.ones((256, T), dtype=np.int64), logits_to_keep=1)

    rows = []
    for what, fn, model, want in [("forward with [4096, T, V] logits", huge_logits, m, want_logits),
                                  ("cache grown past the device", huge_cache, m, want_logits),
                                  ("pool capped at 1 GiB (cuda_memory_limit)", over_the_cap, capped, capped_want)]:
        t = time.perf_counter()
        try:
            fn()
            err = None
        except MemoryError as e:
            err = str(e)
        secs = time.perf_counter() - t
        same = np.array_equal(model(prompt).logits, want)
        if model is m:
            same = same and np.array_equal(m.generate(prompt, max_new_tokens=8, do_sample=False,
                                                      eos_token_id=None), want_gen)
        rows.append({"what": what, "memory_error": err, "seconds": secs, "usable_after": same,
                     "device_used_after_mb": device_used_mb()})
        print(f"  {what:<42} {'MemoryError' if err else 'NO ERROR'} after {secs:.1f} s; "
              f"same results afterwards: {same}\n      {(err or '')[:160]}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--threads-seconds", type=float, default=120)
    ap.add_argument("--interrupts", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    m = MoELlamaForCausalLM.from_pretrained(DEMO, device=DEVICE)
    print(f"device {DEVICE}; demo model ({sum(int(np.prod(v.shape)) for v in m.state_dict().values()) / 1e6:.1f} M parameters), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs", flush=True)
    print("memory:", flush=True)
    mem = memory_figures(m)
    print("threads:", flush=True)
    # bitwise equality needs a fixed thread count: the automatic one follows the machine's load,
    # and oneDNN's products for prompts round differently with another team size
    xoron.set_num_threads(xoron.get_num_threads())
    thr = thread_figures(m, a.threads, a.threads_seconds)
    print("interrupts:", flush=True)
    intr = interrupt_figures(a.interrupts)
    oom = []
    if DEVICE != "cpu":
        print("out of memory:", flush=True)
        oom = out_of_memory_figures(m)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": DEVICE, "memory": mem, "threads": thr, "interrupts": intr, "out_of_memory": oom},
                      f, indent=1)
    ok = all(r["growth_mb"] <= 1.0 and r.get("device_growth_mb", 0) <= 1.0 for r in mem) and \
        thr["mismatches"] == 0 and \
        all(r["max_s"] is not None and r["max_s"] < 0.2 and not r["completed_uninterrupted"] for r in intr) and \
        all(r["memory_error"] and r["usable_after"] for r in oom)
    print("all within bounds" if ok else "OUT OF BOUNDS", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
