"""Command line: python -m xoron {generate,eval,bench,info}."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


class CliError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"xoron: error: {message}\n")
        sys.exit(2)


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return parse


def _float_in(name, lo, hi, lo_open=True):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if (v <= lo if lo_open else v < lo) or v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return v
    return parse


def _int(name):
    def parse(s):
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
    return parse


def _model_dir(path):
    d = path or DEMO_DIR
    if not os.path.isdir(d):
        raise CliError(f"model directory {d!r} does not exist")
    if not os.path.exists(os.path.join(d, "config.json")):
        raise CliError(f"{d!r} is not a checkpoint (no config.json)")
    return d


def _load(args):
    from . import load_tokenizer
    from .modeling import MoELlamaForCausalLM  # the numpy class: the CLI never needs torch (nor its import time)
    d = _model_dir(args.model)
    tok_path = os.path.join(d, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise CliError(f"no tokenizer.json in {d!r}")
    tok = load_tokenizer(tok_path)
    model = MoELlamaForCausalLM.from_pretrained(d, dtype=args.dtype, device=args.device)
    return model, tok


def cmd_generate(args):
    from .tokenizer import StreamDecoder
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    model, tok = _load(args)
    ids = tok.encode(prompt)
    if not ids:
        raise CliError("the prompt is empty after tokenisation")
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    decoder = StreamDecoder(tok, skip_special_tokens=True)
    out = sys.stdout
    out.write(prompt)
    out.flush()

    class Printer:
        first = True

        def put(self, token_ids):
            if self.first:  # the prompt
                self.first = False
                return
            text = decoder.push(int(token_ids[0]))
            if text:
                out.write(text)
                out.flush()

        def end(self):
            out.write(decoder.flush())
            out.write("\n")
            out.flush()

    t0 = time.perf_counter()
    seqs = model.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, do_sample=not args.greedy, seed=args.seed,
                          eos_token_id=eos, repetition_penalty=args.repetition_penalty, streamer=Printer())
    dt = time.perf_counter() - t0
    new = seqs.shape[1] - len(ids)
    sys.stderr.write(f"[xoron] prompt tokens: {len(ids)}, new tokens: {new}, {dt:.2f} s, "
                     f"{new / dt if dt > 0 else 0:.1f} tokens/s ({model.device}, {model.dtype})\n")
    return 0


def cmd_eval(args):
    import numpy as np
    model, tok = _load(args)
    if not os.path.exists(args.file):
        raise CliError(f"no such file: {args.file}")
    with open(args.file, "r", encoding="utf-8") as f:
        ids = tok.encode(f.read())
    block = args.block
    if len(ids) < 2:
        raise CliError("the file holds fewer than two tokens")
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for start in range(0, len(ids) - 1, block):  # one forward per window, not per token
        window = np.asarray(ids[start:start + block + 1], dtype=np.int64)[None]
        if window.shape[1] < 2:
            break
        out = model(input_ids=window, labels=window)
        n = window.shape[1] - 1
        total += float(out.loss) * n
        count += n
    loss = total / count
    dt = time.perf_counter() - t0
    print(f"tokens: {count}, loss: {loss:.4f}, perplexity: {float(np.exp(loss)):.3f} "
          f"({dt:.1f} s, {count / dt:.0f} tokens/s)")
    return 0


def cmd_bench(args):
    import numpy as np
    model, tok = _load(args)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompt = rng.integers(0, V, size=(1, args.prompt_tokens))
    model(input_ids=prompt[:, :8])  # warm-up
    t0 = time.perf_counter()
    model(input_ids=prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    seqs = model.generate(prompt[:, :8], max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[])
    decode = time.perf_counter() - t0
    n = seqs.shape[1] - 8
    print(f"prefill: {args.prompt_tokens} tokens in {prefill * 1e3:.1f} ms ({args.prompt_tokens / prefill:.0f} tokens/s)")
    print(f"decode:  {n} tokens in {decode * 1e3:.1f} ms ({n / decode:.1f} tokens/s, batch 1, {model.device}, {model.dtype})")
    return 0


def cmd_info(args):
    from . import _C
    from .config import engine_dict, read_config_json, resolve_config
    from .modeling import _tensor_prefix, _weight_files
    d = _model_dir(args.path)
    cfg = resolve_config(read_config_json(os.path.join(d, "config.json")))
    files = _weight_files(d)
    prefix = _tensor_prefix(files)
    tensors = []
    for f in files:
        tensors += [(n, t, s) for n, t, s in _C.read_safetensors_header(f) if n.startswith(prefix)]
    total = 0
    dtypes = {}
    for _, t, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        total += n
        dtypes[t] = dtypes.get(t, 0) + n
    print(json.dumps(cfg.to_dict(), indent=2))
    e = engine_dict(cfg)
    H, I, Ie, L = e["hidden_size"], e["intermediate_size"], e["moe_intermediate_size"], e["num_hidden_layers"]
    print(f"files: {len(files)} ({', '.join(os.path.basename(f) for f in files)})"
          + (f", tensor prefix {prefix!r}" if prefix else ""))
    print(f"tensors: {len(tensors)}, parameters: {total:,} ({', '.join(f'{k}: {v:,}' for k, v in dtypes.items())})")
    if e["use_moe"]:
        k, E = e["num_experts_per_tok"], e["num_experts"]
        moe_layers = sum(1 for i in range(L) if i % e["moe_layer_freq"] == e["moe_layer_freq"] - 1)
        inactive = moe_layers * (E - k) * 3 * H * Ie
        print(f"active parameters per token: {total - inactive:,} (top-{k} of {E} experts on {moe_layers} MoE layers)")
    return 0


def build_parser():
    p = _Parser(prog="python -m xoron", description="xoron: fast inference for Xoron MoE-LLaMA.")
    sub = p.add_subparsers(dest="command", metavar="{generate,eval,bench,info}", parser_class=_Parser)

    def threads(sp):
        sp.add_argument("--threads", type=_int("--threads"), default=None,
                        help="CPU threads (default: the physical cores, or OMP_NUM_THREADS when set)")

    def common(sp):
        threads(sp)
        sp.add_argument("--model", help="checkpoint directory (default: the packaged demo model)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8", "int4"])

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("prompt", nargs="?", default="Once upon a time", help="the prompt ('-' reads stdin)")
    common(g)
    g.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=100)
    g.add_argument("--temperature", type=_float_in("--temperature", 0.0, 100.0), default=0.8)
    g.add_argument("--top-k", type=_positive_int("--top-k"), default=50)
    g.add_argument("--top-p", type=_float_in("--top-p", 0.0, 1.0), default=0.95)
    g.add_argument("--repetition-penalty", type=_float_in("--repetition-penalty", 0.0, 100.0), default=1.1)
    g.add_argument("--seed", type=_positive_int("--seed"), default=None)
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="held-out loss and perplexity of a text file")
    e.add_argument("file")
    common(e)
    e.add_argument("--block", type=_positive_int("--block"), default=256, help="tokens per window (default 256)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="a short speed check (prefill and batch-1 decode)")
    common(b)
    b.add_argument("--prompt-tokens", type=_positive_int("--prompt-tokens"), default=128)
    b.add_argument("--new-tokens", type=_positive_int("--new-tokens"), default=64)
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="print a checkpoint's config and parameter counts")
    i.add_argument("path", nargs="?", help="checkpoint directory (default: the demo model)")
    threads(i)
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "block", 1) == 0:
        parser.error("--block must be positive")
    try:
        if args.threads is not None:
            from . import set_num_threads
            set_num_threads(args.threads)
        return args.func(args)
    except (CliError, ValueError, OSError, RuntimeError, MemoryError) as e:
        sys.stderr.write(f"xoron: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
