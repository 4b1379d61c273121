"""What 16-bit, int8 and int4 weight storage cost in accuracy, against float32 storage.

    python benchmarks/precision.py [--tokens 1024] [--block 256]

Two models: the packaged demo model on real held-out text (tests/data/heldout_sample.txt),
and the demo's architecture with random weights (the engine's initialisation, seed 0) on
random token ids. For each storage dtype it prints the logits' error relative to float32
storage (max|got - ref| / max|ref|, the measure of docs/MODEL.md section 8), the share of
positions whose top-1 token agrees, and the mean loss. Uses numpy only (no torch).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from xoron import load_tokenizer  # noqa: E402
from xoron.modeling import MoELlamaForCausalLM  # noqa: E402  (the numpy class: no torch needed)

DEMO = os.path.join(ROOT, "xoron", "demo")
TEXT = os.path.join(ROOT, "tests", "data", "heldout_sample.txt")
DTYPES = ("bfloat16", "float16", "int8", "int4")


def windows(ids: np.ndarray, block: int):
    for start in range(0, len(ids) - 1, block):
        w = ids[start:start + block + 1]
        if len(w) >= 2:
            yield w[None]


def run(model, ids: np.ndarray, block: int):
    """(logits of every window, token-weighted mean loss)."""
    logits, total, count = [], 0.0, 0
    for w in windows(ids, block):
        out = model(input_ids=w, labels=w)
        logits.append(out.logits[0])
        total += float(out.loss) * (w.shape[1] - 1)
        count += w.shape[1] - 1
    return logits, total / count


def compare(name: str, build, ids: np.ndarray, block: int) -> None:
    ref_logits, ref_loss = run(build("float32"), ids, block)
    scale = max(float(np.abs(r).max()) for r in ref_logits)
    print(f"\n{name}: {len(ids)} tokens in windows of {block + 1}")
    print(f"| storage | logits error vs float32 | top-1 agreement | loss (float32: {ref_loss:.4f}) |")
    print("|---|---|---|---|")
    for dt in DTYPES:
        logits, loss = run(build(dt), ids, block)
        err = max(float(np.abs(g - r).max()) for g, r in zip(logits, ref_logits)) / scale
        agree = np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(logits, ref_logits)]))
        print(f"| {dt} | {err:.2e} | {100 * agree:.2f}% | {loss:.4f} ({loss - ref_loss:+.4f}) |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of text (and of random ids) to score")
    ap.add_argument("--block", type=int, default=256, help="tokens per forward window")
    args = ap.parse_args()

    tok = load_tokenizer(DEMO)
    with open(TEXT, encoding="utf-8") as f:
        text_ids = np.asarray(tok.encode(f.read())[:args.tokens + 1], dtype=np.int64)
    compare("demo model (bf16 checkpoint), held-out text",
            lambda dt: MoELlamaForCausalLM.from_pretrained(DEMO, dtype=dt), text_ids, args.block)

    config = MoELlamaForCausalLM.from_pretrained(DEMO).config
    random_ids = np.random.default_rng(0).integers(0, config.vocab_size, size=args.tokens + 1)
    float_weights = MoELlamaForCausalLM(config, seed=0).state_dict()

    def random_model(dt):
        m = MoELlamaForCausalLM(config, dtype=dt, _init=False)
        m.load_state_dict(float_weights)
        return m

    compare("demo architecture, random weights (normal(0, 0.02), seed 0), random ids", random_model, random_ids,
            args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
