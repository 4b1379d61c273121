#!/usr/bin/env python3
"""Train the demo model's byte-level BPE tokenizer and write the token-id training files.

Dev-time tool: needs the HuggingFace ``tokenizers`` package (``pip install tokenizers``) and
numpy; the shipped runtime loader is the dependency-free package ``xoron/tokenizer/``.

Input : ``data/train.txt`` and ``data/heldout.txt`` from ``tools/prepare_corpus.py`` (documents
        separated by a line holding only ``<|endoftext|>``).
Output: ``xoron/demo/tokenizer.json``   GPT-2 style byte-level BPE: NFC normaliser, ByteLevel
                                        pre-tokenizer (GPT-2 regex, no prefix space), ByteLevel
                                        decoder; special token ``<|endoftext|>`` = id 0 (EOS).
        ``data/train_ids.npy``          uint16 token ids: EOS doc EOS doc ... doc EOS
        ``data/heldout_ids.npy``        same layout for the held-out documents.

The BPE trainer is deterministic for a given input, so re-running reproduces the same file.

Usage:  python tools/train_tokenizer.py [--data data] [--vocab-size 4096] [--out xoron/demo/tokenizer.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import time

import numpy as np

EOS = "<|endoftext|>"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_documents(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [d.strip("\n") for d in text.split(f"\n{EOS}\n")]
    return [d for d in docs if d]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def encode_documents(tok, docs: list[str], eos_id: int) -> np.ndarray:
    out: list[int] = [eos_id]
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos_id)
    arr = np.asarray(out, dtype=np.int64)
    assert arr.max() < 65536
    return arr.astype(np.uint16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "data"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default=os.path.join(REPO, "xoron", "demo", "tokenizer.json"))
    ap.add_argument("--no-check", action="store_true", help="skip the xoron.tokenizer cross-check")
    args = ap.parse_args(argv)

    train_docs = read_documents(os.path.join(args.data, "train.txt"))
    held_docs = read_documents(os.path.join(args.data, "heldout.txt"))
    print(f"train: {len(train_docs)} documents, heldout: {len(held_docs)} documents")

    t0 = time.time()
    tok, trainer = build_tokenizer(args.vocab_size)
    tok.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    eos_id = tok.token_to_id(EOS)
    assert eos_id == 0, eos_id
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tok.save(args.out, pretty=True)
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"trained in {time.time() - t0:.1f}s: vocab {tok.get_vocab_size()} (EOS {EOS!r} = {eos_id}); "
          f"wrote {args.out} ({os.path.getsize(args.out):,} bytes, sha256 {digest[:16]})")

    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        ids = encode_documents(tok, docs, eos_id)
        path = os.path.join(args.data, f"{name}_ids.npy")
        np.save(path, ids)
        nbytes = sum(len(d.encode()) for d in docs)
        print(f"wrote {path}: {ids.size:,} tokens ({nbytes / max(1, ids.size - len(docs) - 1):.2f} bytes/token)")

    if not args.no_check:
        # Cross-check the dependency-free runtime loader against the reference implementation.
        # loaded by file path: the check needs neither the built extension nor an installed xoron
        package = os.path.join(REPO, "xoron", "tokenizer")
        spec = importlib.util.spec_from_file_location("xoron_tokenizer", os.path.join(package, "__init__.py"),
                                                      submodule_search_locations=[package])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its modules import one another relatively
        spec.loader.exec_module(mod)
        ours = mod.load_tokenizer(args.out)
        t0 = time.time()
        n = 0
        for d in held_docs:
            ref = tok.encode(d, add_special_tokens=False).ids
            got = ours.encode(d)
            n += len(ref)
            if got != ref:
                raise SystemExit("xoron.tokenizer disagrees with tokenizers on a held-out document")
            if ours.decode(got) != d:
                raise SystemExit("xoron.tokenizer does not round-trip a held-out document")
        print(f"xoron.tokenizer matches tokenizers on the held-out set ({n:,} tokens, {time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
