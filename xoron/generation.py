"""generate() as transformers users call it: argument parsing, validation and conversion,
shared by every model class (the numpy MoELlamaForCausalLM and the torch module).

The decode loop itself runs in C (csrc/engine/generate.c). A model class calls

    generate(model, input_ids, **kwargs)

where `model` has `_engine` (a xoron._C.Model), `config` (a xoron.LlamaConfig) and
`cache_format` ("latent" or "kv").
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._tensors import ids_array, mask_array, output, to_numpy

CACHE_FORMATS = {"latent": 0, "kv": 1}


@dataclass
class GenerateOutput:
    """generate(..., return_dict_in_generate=True): `sequences` [b, t + n]; with
    output_scores=True, `scores` is a tuple of n processed-score arrays [b, V]."""
    sequences: Any = None
    scores: Any = None

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else (self.sequences, self.scores)[key]


# The keywords generate() implements, with their defaults.
DEFAULTS = dict(
    max_new_tokens=100, temperature=1.0, top_k=50, top_p=0.9, do_sample=True, pad_token_id=None,
    eos_token_id=None, attention_mask=None, seed=None, min_new_tokens=0, repetition_penalty=1.0,
    streamer=None, return_dict_in_generate=False, output_scores=False,
)


def generate(model, input_ids=None, **kwargs):
    """Generates up to max_new_tokens after input_ids [b, t] (README "Generation"). Returns
    prompt + new tokens [b, t + n] (numpy, or torch when the input was torch); rows that
    finished are padded with pad_token_id (eos when unset). A keyword it does not implement
    is a TypeError naming it."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    a = dict(DEFAULTS, **kwargs)
    config = model.config
    torch_dev = None
    if not isinstance(input_ids, (list, tuple)):
        _, torch_dev = to_numpy(input_ids, "input_ids")
    prompt = ids_array(input_ids)
    b, t = prompt.shape
    mask = None
    if a["attention_mask"] is not None:
        mask = mask_array(a["attention_mask"])
        if mask.shape != (b, t):
            raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected {[b, t]} like input_ids")
    max_new_tokens = _int_arg(a["max_new_tokens"], "max_new_tokens")
    min_new_tokens = _int_arg(a["min_new_tokens"], "min_new_tokens")
    top_k = _int_arg(a["top_k"] if a["top_k"] is not None else 0, "top_k")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (got {top_k})")
    do_sample = bool(a["do_sample"])
    temperature = float(a["temperature"] if a["temperature"] is not None else 1.0)
    top_p = float(a["top_p"] if a["top_p"] is not None else 1.0)
    repetition_penalty = float(a["repetition_penalty"] if a["repetition_penalty"] is not None else 1.0)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (got {repetition_penalty})")
    eos_token_id = a["eos_token_id"]
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = [] if eos_token_id is None else ([int(eos_token_id)] if np.ndim(eos_token_id) == 0
                                            else [int(e) for e in eos_token_id])
    pad_token_id = a["pad_token_id"]
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    seed = a["seed"]
    if seed is None:
        seed = secrets.randbits(63)
    streamer = a["streamer"]
    return_dict = bool(a["return_dict_in_generate"])
    callback = None
    if streamer is not None:
        streamer.put(output(prompt.astype(np.int64), torch_dev))
        callback = (lambda toks: streamer.put(output(toks, torch_dev)))
    seqs, scores, steps = model._engine.generate(
        prompt, mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, np.asarray(eos, dtype=np.int32), int(pad_token_id), int(seed) & ((1 << 64) - 1),
        CACHE_FORMATS[model.cache_format], bool(a["output_scores"] and return_dict), callback)
    if streamer is not None:
        streamer.end()
    seqs = output(seqs[:, :t + steps].astype(np.int64), torch_dev)
    if not return_dict:
        return seqs
    sc = None
    if scores is not None:
        sc = tuple(output(scores[i], torch_dev) for i in range(steps))
    return GenerateOutput(sequences=seqs, scores=sc)


def generate_stream(model, input_ids=None, **kwargs):
    """Yields the new token ids as they are produced (an int per step for one row, an array
    of one id per row otherwise). Takes generate()'s keyword arguments."""
    import queue
    import threading

    if "streamer" in kwargs:
        raise TypeError("generate_stream() makes its own streamer: 'streamer' is not accepted")
    q: "queue.Queue" = queue.Queue()
    done = object()

    class _QueueStreamer:
        first = True

        def put(self, ids):
            if self.first:  # the prompt
                self.first = False
                return
            q.put(ids)

        def end(self):
            pass

    errors = []

    def run():
        try:
            generate(model, input_ids, streamer=_QueueStreamer(), **kwargs)
        except BaseException as e:  # re-raised in the consumer
            errors.append(e)
        finally:
            q.put(done)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while True:
        item = q.get()
        if item is done:
            break
        arr = np.asarray(item)
        yield int(arr[0]) if arr.shape == (1,) else item
    worker.join()
    if errors:
        raise errors[0]


def _int_arg(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(v)
