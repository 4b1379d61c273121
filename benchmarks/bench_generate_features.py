"""generate() throughput on the CPU with the features of issue 11 (streamer, processors, beam
search): the demo model, a short prompt, 64 new tokens, best of three.

    python benchmarks/bench_generate_features.py
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import xoron  # noqa: E402

DEMO = os.path.join(os.path.dirname(xoron.__file__), "demo")


class NullStreamer:
    def put(self, ids):
        pass

    def end(self):
        pass


def main():
    model = xoron.MoELlamaForCausalLM.from_pretrained(DEMO)
    tok = xoron.load_tokenizer(DEMO)
    ids = tok("Once upon a time there was a little", return_tensors="np").input_ids
    cases = [
        ("greedy", dict(do_sample=False)),
        ("greedy + streamer (a read per token)", dict(do_sample=False, streamer=NullStreamer())),
        ("greedy + no_repeat_ngram_size=3", dict(do_sample=False, no_repeat_ngram_size=3)),
        ("greedy + logits_processor (identity)", dict(do_sample=False, logits_processor=lambda i, s: s)),
        ("sampling, min_p=0.05", dict(min_p=0.05, seed=0)),
        ("beam search, num_beams=4", dict(num_beams=4, do_sample=False)),
    ]
    for label, kw in cases:
        model.generate(ids, max_new_tokens=4, **kw)
        best = min(_timed(model, ids, kw) for _ in range(3))
        print(f"{label:40s} {64 / best:7.1f} new tokens/s")


def _timed(model, ids, kw):
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=64, eos_token_id=[], **kw)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
