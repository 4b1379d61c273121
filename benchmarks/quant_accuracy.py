"""Accuracy of the CPU weight formats on the demo model's held-out text (issue 14).

    python benchmarks/quant_accuracy.py                  # float32 / bf16 / int8 / int4 as stored
    python benchmarks/quant_accuracy.py --sensitivity    # which tensors int8's error comes from
    python benchmarks/quant_accuracy.py --levels         # how fine a rounding the targets need
    python benchmarks/quant_accuracy.py --groups         # smaller groups, a searched scale

tests/data/heldout_sample.txt, tokenised, in windows of 257 tokens (256 scored positions each),
each window one full forward. Against float32, per scored position: the largest absolute logit
difference over the vocabulary; reported are its maximum, the positions where it exceeds 0.3,
and the share of positions whose argmax agrees; plus perplexity.

The engine's own formats run in two ways: as a forward over whole windows (the widened-tile
products, float32 activations) and, with --gemv, with every product on the matrix-vector kernels
(cpu_gemv_max_rows=1000: what decode runs, int8/int4 against activations rounded to int16).

--sensitivity and --levels round chosen tensors in numpy the way the engine's int8 does (group
of 32 along the input, symmetric, scale max|group| / levels) and load them into a float32
model: --sensitivity one class of tensors at a time, --levels finer roundings of every tensor
(levels 127 is int8 exactly), --groups int8 with smaller groups or a searched scale; each with
and without the (tied) embedding kept in float32.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import xoron  # noqa: E402
from xoron.modeling import MoELlamaForCausalLM  # noqa: E402

DEMO = os.path.join(os.path.dirname(xoron.__file__), "demo")
GROUP = 32
CLASSES = {
    "embedding (tied LM head)": r"embed_tokens",
    "attention (q, kv_a, kv_b, o)": r"self_attn\.(q_proj|kv_a_proj|kv_b_proj|o_proj)",
    "dense FFN layers": r"layers\.\d+\.mlp\.(gate|up|down)_proj",
    "routed experts": r"mlp\.experts\.",
    "shared experts": r"shared_expert",
}


def windows():
    tok = xoron.load_tokenizer(os.path.join(DEMO, "tokenizer.json"))
    with open(os.path.join(ROOT, "tests", "data", "heldout_sample.txt"), encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read()), dtype=np.int64)
    return [ids[s:s + 257][None] for s in range(0, len(ids) - 1, 256) if len(ids) - s >= 2]


def run(model, wins):
    total, count, logits = 0.0, 0, []
    for w in wins:
        out = model(input_ids=w, labels=w)
        total += float(out.loss) * (w.shape[1] - 1)
        count += w.shape[1] - 1
        logits.append(np.asarray(out.logits)[0])
    return float(np.exp(total / count)), np.concatenate(logits)


def row(name, ppl, logits, ppl32, l32):
    d = np.abs(logits - l32).max(axis=-1)
    agree = float(np.mean(logits.argmax(-1) == l32.argmax(-1)))
    print(f"| {name} | {ppl:.4f} | {ppl / ppl32 - 1:+.2%} | {d.max():.3f} | {int((d > 0.3).sum())} | "
          f"{np.sqrt(np.mean((logits - l32) ** 2)):.4f} | {agree:.2%} |", flush=True)


def rounded(w, levels, group=GROUP, search=False):
    """w rounded per group along the input to integers in [-levels, levels] times
    max|group| / levels (the engine's int8 for levels = 127, group = 32); with search, each
    group's scale is instead the one of max|group| x {0.70, 0.71, ..., 1.00} / levels with the
    least squared error."""
    o, k = w.shape
    g = -(-k // group)
    p = np.zeros((o, g * group), np.float32)
    p[:, :k] = w
    p = p.reshape(o, g, group)
    mx = np.abs(p).max(axis=2, keepdims=True)
    best, best_err = None, None
    for f in (np.linspace(0.7, 1.0, 31) if search else [1.0]):
        top = (mx * np.float32(f)).astype(np.float32)
        inv = (np.float32(levels) / np.where(top > 0, top, 1)).astype(np.float32)
        q = np.clip(np.rint(p * inv), -levels, levels)
        back = q * (top / np.float32(levels)).astype(np.float32)
        err = ((back - p) ** 2).sum(axis=2, keepdims=True)
        if best is None:
            best, best_err = back, err
        else:
            better = err < best_err
            best, best_err = np.where(better, back, best), np.where(better, err, best_err)
    return best.reshape(o, g * group)[:, :k].astype(np.float32)


def emulated(sd, patterns, levels, group=GROUP, search=False):
    out = dict(sd)
    for n, w in sd.items():
        if w.ndim == 2 and ".router." not in n and any(re.search(p, n) for p in patterns):
            out[n] = rounded(w, levels, group, search)
    m = MoELlamaForCausalLM.from_pretrained(DEMO)
    m.load_state_dict(out)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "int8", "int4"])
    ap.add_argument("--gemv", action="store_true", help="also every product on the matrix-vector kernels")
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--levels", action="store_true")
    ap.add_argument("--groups", action="store_true", help="int8 with groups of 16 and 8, and a searched scale")
    a = ap.parse_args()
    wins = windows()
    f32 = MoELlamaForCausalLM.from_pretrained(DEMO)
    ppl32, l32 = run(f32, wins)
    print(f"python {' '.join(sys.argv)}\n")
    print(f"{sum(w.shape[1] - 1 for w in wins)} scored positions ({sum(w.shape[1] for w in wins)} logit rows compared) in {len(wins)} windows; float32 perplexity "
          f"{ppl32:.4f}\n")
    top2 = np.sort(l32, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    print("float32's two best logits lie " + ", ".join(f"within {t} of each other at {np.mean(gap < t):.2%}"
                                                       for t in (0.01, 0.03, 0.1)) + " of the positions\n")
    print("| case | perplexity | vs float32 | max logit diff | positions > 0.3 | rms logit diff | argmax agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dt in a.dtypes:
        row(dt, *run(MoELlamaForCausalLM.from_pretrained(DEMO, dtype=dt), wins), ppl32, l32)
        if a.gemv:
            m = MoELlamaForCausalLM.from_pretrained(DEMO, dtype=dt, options={"cpu_gemv_max_rows": 1000})
            row(f"{dt}, matrix-vector kernels", *run(m, wins), ppl32, l32)
    sd = f32.state_dict()
    if a.sensitivity:
        for name, pat in CLASSES.items():
            row(f"int8 (numpy) on the {name} only", *run(emulated(sd, [pat], 127), wins), ppl32, l32)
        row("int8 (numpy) on all", *run(emulated(sd, list(CLASSES.values()), 127), wins), ppl32, l32)
    if a.levels:
        rest = [p for n, p in CLASSES.items() if not n.startswith("embedding")]
        for levels in (127, 255, 511, 1023):
            row(f"levels +-{levels}, every tensor", *run(emulated(sd, list(CLASSES.values()), levels), wins),
                ppl32, l32)
            row(f"levels +-{levels}, embedding float32", *run(emulated(sd, rest, levels), wins), ppl32, l32)
    if a.groups:
        rest = [p for n, p in CLASSES.items() if not n.startswith("embedding")]
        for group, search in ((16, False), (8, False), (32, True)):
            name = f"int8 (numpy), group {group}" + (", searched scale" if search else "")
            row(f"{name}, every tensor", *run(emulated(sd, list(CLASSES.values()), 127, group, search), wins),
                ppl32, l32)
            row(f"{name}, embedding float32", *run(emulated(sd, rest, 127, group, search), wins), ppl32, l32)


if __name__ == "__main__":
    main()
