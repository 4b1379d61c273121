"""Mutation fuzzing of the Python loader path: from_pretrained on mutated checkpoint
directories (config.json, model.safetensors.index.json, the safetensors shards), then a
short forward when a mutant loads.

A case passes when it loads, or fails with ValueError, OSError, TypeError or MemoryError
(the errors the loader promises). Any other exception, a crash (the worker dies by a
signal) or a hang (a case running past --case-timeout) is a finding: the case's directory
is copied to --findings and the run exits non-zero.

Cases run in a worker process, restarted after a crash; case i is generated from
random.Random(seed, i), so --seed and a case number reproduce it (--replay DIR reruns one).

    python fuzz/fuzz_loader.py --seconds 60 --findings build/fuzz/findings
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import queue
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's own build when it is built in place, else the installed xoron
IN_PLACE = bool(glob.glob(os.path.join(ROOT, "xoron", "_C*.so")))
if IN_PLACE:
    sys.path.insert(0, ROOT)
EXPECTED = (ValueError, OSError, TypeError, MemoryError)

ODD_VALUES = [0, -1, 1, 2, 3, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 63, -2 ** 63, 10 ** 30, 0.5, -0.0, 1e-300,
              1e308, float("nan"), float("inf"), -float("inf"), True, False, None, "", "12", "x" * 300, [], [1, 2],
              {}, {"a": 1}]


# ---- seed checkpoints ----

def _write_safetensors(path, tensors: dict):
    import numpy as np
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def make_seeds(dest: str) -> list:
    """Seed checkpoint directories: the test checkpoint, a small single-file one, the same
    sharded with an index, and one in the Xoron-Dev multimodal layout (prefix llm.)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import small_config

    from xoron import MoELlamaForCausalLM
    seeds = [os.path.join(ROOT, "tests", "data", "tiny_ring")]
    cfg = small_config(use_moe=True, num_hidden_layers=2, moe_layer_freq=2, q_lora_rank=8)
    m = MoELlamaForCausalLM(cfg, seed=0)
    single = os.path.join(dest, "single")
    m.save_pretrained(single)
    seeds.append(single)
    sd = m.state_dict()
    names = sorted(sd)
    sharded = os.path.join(dest, "sharded")
    os.makedirs(sharded, exist_ok=True)
    shutil.copy(os.path.join(single, "config.json"), sharded)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in halves.items():
        _write_safetensors(os.path.join(sharded, fname), {n: sd[n] for n in part})
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: fn for fn, part in halves.items() for n in part}}, f)
    seeds.append(sharded)
    dev = os.path.join(dest, "xoron_dev")
    os.makedirs(dev, exist_ok=True)
    with open(os.path.join(dev, "config.json"), "w") as f:
        json.dump({"vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
                   "intermediate_size": cfg["intermediate_size"], "num_layers": 2, "num_heads": 4,
                   "num_kv_heads": 4, "use_moe": False, "kv_lora_rank": 16, "max_position_embeddings": 4096,
                   "tie_word_embeddings": True}, f)
    m2 = MoELlamaForCausalLM(small_config(max_position_embeddings=4096), seed=1)
    _write_safetensors(os.path.join(dev, "model.safetensors"),
                       {"llm." + k: v for k, v in m2.state_dict().items()} | {"vision.w": sd[names[0]][:2]})
    seeds.append(dev)
    regressions = os.path.join(ROOT, "tests", "data", "fuzz_seeds")
    if os.path.isdir(regressions):
        for entry in sorted(os.listdir(regressions)):
            p = os.path.join(regressions, entry)
            if os.path.isdir(p) and os.path.exists(os.path.join(p, "config.json")):
                seeds.append(p)
    return seeds


# ---- mutations ----

def _mutate_bytes(rng: random.Random, data: bytes, limit: int) -> bytes:
    """A few byte-level edits within the first `limit` bytes (the header, for safetensors)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(min(len(b), limit))
        op = rng.randrange(6)
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0, 0x22, 0x5C, 0x7B, 0x7D, 0x2C, 0x3A, 0x80, 0xC3, 0xFF])
        elif op == 2:
            del b[i:i + rng.randint(1, 16)]
        elif op == 3:
            b[i:i] = rng.choice([b"\xff\xfe", b"\\u0000", b'"', b"[", b"{", b"1e999", b"-1", b"\xc3"])
        elif op == 4:
            j = rng.randrange(len(b))
            b[i], b[j] = b[j], b[i]
        else:
            b[i:i] = b[i:i + rng.randint(1, 64)]
    return bytes(b)


def _odd(rng: random.Random):
    # a copy: the lists and dicts among them are mutated later, and a shared one could end up
    # holding itself (json.dumps: "Circular reference detected")
    return copy.deepcopy(rng.choice(ODD_VALUES))


def _mutate_json_value(rng: random.Random, d):
    """Replaces, deletes or adds one entry somewhere in a JSON object."""
    if not isinstance(d, dict) or not d:
        return _odd(rng)
    key = rng.choice(sorted(d, key=str))
    op = rng.randrange(5)
    if op == 0:
        del d[key]
    elif op == 1 and isinstance(d[key], dict):
        _mutate_json_value(rng, d[key])
    elif op == 2:
        d["unknown_" + str(rng.randrange(100))] = _odd(rng)
    elif op == 3 and isinstance(d[key], (int, float)) and not isinstance(d[key], bool):
        d[key] = rng.choice([d[key] * 2, d[key] + 1, d[key] - 1, -d[key], d[key] * 1000, d[key] // 2])
    else:
        d[key] = _odd(rng)
    return d


def _mutate_json_file(rng: random.Random, path: str):
    with open(path, "rb") as f:
        raw = f.read()
    if rng.random() < 0.3:
        out = _mutate_bytes(rng, raw, len(raw))
    else:
        d = json.loads(raw)
        for _ in range(rng.randint(1, 3)):
            d = _mutate_json_value(rng, d)
        out = json.dumps(d).encode()
    with open(path, "wb") as f:
        f.write(out)


def _mutate_safetensors(rng: random.Random, path: str):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    op = rng.randrange(5)
    if op == 0:  # raw bytes of the header
        data = _mutate_bytes(rng, data, min(len(data), 8 + n))
    elif op == 1:  # truncated
        data = data[:rng.randrange(len(data) + 1)]
    elif op == 2:  # another header length
        length = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), 2 ** 63, 2 ** 64 - 1]) % 2 ** 64
        data = struct.pack("<Q", length) + data[8:]
    else:  # one entry of the header rewritten
        try:
            header = json.loads(data[8:8 + n])
        except ValueError:
            header = None
        if isinstance(header, dict) and header:
            name = rng.choice(sorted(header))
            entry = header[name]
            if isinstance(entry, dict) and rng.random() < 0.8:
                field = rng.choice(["dtype", "shape", "data_offsets"])
                entry[field] = rng.choice([_odd(rng), "F64", "BF16", "F16", "I8", "U8", [0, 0], [2 ** 40],
                                           [1, 2, 3, 4, 5, 6, 7, 8, 9], [-1], [0, 2 ** 64 - 1]])
            else:
                header[rng.choice([name, name + "x", "", "__metadata__"])] = _odd(rng)
            raw = json.dumps(header).encode()
            data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    with open(path, "wb") as f:
        f.write(data)


def make_case(seeds: list, seed: int, index: int, dest: str) -> str:
    """Writes case `index` into `dest` (emptied first); returns what was mutated."""
    rng = random.Random(seed * 1_000_003 + index)
    src = rng.choice(seeds)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    files = sorted(os.listdir(dest))
    touched = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        name = rng.choice(files)
        p = os.path.join(dest, name)
        if name.endswith(".json"):
            try:
                _mutate_json_file(rng, p)
            except ValueError:  # already not JSON: mutate its bytes
                with open(p, "rb") as f:
                    raw = f.read()
                with open(p, "wb") as f:
                    f.write(_mutate_bytes(rng, raw, len(raw)))
        elif name.endswith(".safetensors"):
            _mutate_safetensors(rng, p)
        else:
            continue
        touched.append(name)
    return f"{os.path.basename(src)}: {', '.join(touched)}"


# ---- running ----

def run_one(path: str) -> str:
    """The outcome of loading `path` (and a forward when it loads): a class name."""
    import numpy as np

    from xoron import MoELlamaForCausalLM
    try:
        m = MoELlamaForCausalLM.from_pretrained(path)
        out = m(np.array([[1, 2, 3]], dtype=np.int64)).logits
        if out.shape != (1, 3, m.config.vocab_size):
            return "wrong logits shape"
        return "loaded"
    except EXPECTED as e:
        return type(e).__name__ if isinstance(e, (OSError, TypeError, MemoryError)) else "ValueError"


def worker(seeds_dir: str, seed: int, first: int, work: str):
    seeds = json.load(open(os.path.join(seeds_dir, "seeds.json")))
    case = os.path.join(work, "case")
    i = first
    while True:
        what = make_case(seeds, seed, i, case)
        print(f"start {i} {what}", flush=True)
        try:
            outcome = run_one(case)
        except BaseException as e:  # noqa: BLE001 - an unexpected exception is the finding
            outcome = f"unexpected {type(e).__name__}: {str(e)[:200]}"
        print(f"done {i} {outcome}", flush=True)
        i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("XORON_FUZZ_SEED", "0")) or None)
    ap.add_argument("--findings", default=os.path.join(ROOT, "build", "fuzz", "findings"))
    ap.add_argument("--case-timeout", type=float, default=60)
    ap.add_argument("--replay", help="run one case directory and print its outcome")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        seeds_dir, seed, first, work = a.worker
        worker(seeds_dir, int(seed), int(first), work)
        return 0
    if a.replay:
        print(run_one(a.replay))
        return 0
    seed = a.seed if a.seed is not None else random.randrange(1, 1 << 30)
    os.makedirs(a.findings, exist_ok=True)
    work = tempfile.mkdtemp(prefix="xoron-fuzz-")
    seeds_dir = os.path.join(work, "seeds")
    os.makedirs(seeds_dir)
    seeds = make_seeds(seeds_dir)
    with open(os.path.join(seeds_dir, "seeds.json"), "w") as f:
        json.dump(seeds, f)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if IN_PLACE:
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    deadline = time.monotonic() + a.seconds
    counts: dict = {}
    findings = []

    def record(kind: str, num: int, what: str, outcome: str):
        counts[kind] = counts.get(kind, 0) + 1
        if kind in ("unexpected", "wrong logits shape", "hang", "crash"):
            findings.append((num, what, outcome))
            make_case(seeds, seed, num, os.path.join(a.findings, f"{kind.split()[0]}-{seed}-{num}"))

    next_case = 0
    while time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", seeds_dir, str(seed),
                                 str(next_case), work], stdout=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
        current, started, killed = None, time.monotonic(), False
        while True:
            now = time.monotonic()
            if now >= deadline or (current and now - started > a.case_timeout):
                killed = True
                proc.kill()
                proc.wait()
                if current and now - started > a.case_timeout:
                    record("hang", current[0], current[1], "hang")
                    next_case = current[0] + 1
                break
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:  # the worker ended
                proc.wait()
                break
            kind, num, rest = line.rstrip("\n").split(" ", 2)
            if kind == "start":
                current, started = (int(num), rest), time.monotonic()
            elif current is not None:
                record("unexpected" if rest.startswith("unexpected") else rest, int(num), current[1], rest)
                current, next_case = None, int(num) + 1
        if not killed and current is not None:  # the worker died inside a case
            record("crash", current[0], current[1], f"crash (exit {proc.returncode})")
            next_case = current[0] + 1
    total = sum(counts.values())
    shutil.rmtree(work, ignore_errors=True)
    print(f"fuzz_loader: seed {seed}, {total} cases in {a.seconds:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for num, what, outcome in findings:
        print(f"  finding: case {num} ({what}): {outcome}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
