"""generate() as transformers users call it: argument parsing, validation and conversion,
shared by every model class (the numpy MoELlamaForCausalLM and the torch module).

The decode loop itself runs in C (csrc/engine/generate.c, beam_search.c); Python runs per
step only where the caller asks for it (a streamer, logits_processor, stopping_criteria).
A model class calls

    generate(model, input_ids, **kwargs)

where `model` has `_engine` (a xoron._C.Model), `config` (a xoron.LlamaConfig) and
`cache_format` ("latent" or "kv").
"""
from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._tensors import ids_array, mask_array, output, to_numpy

CACHE_FORMATS = {"latent": 0, "kv": 1}
EARLY_STOPPING = {False: 0, True: 1, "never": 2}


@dataclass
class GenerateOutput:
    """generate(..., return_dict_in_generate=True). `sequences` [rows, t + n]; `scores`
    (output_scores=True) and `logits` (output_logits=True) are tuples of n arrays
    [rows, V], the processed scores and the raw logits of each step (with beams, one row per
    beam); `sequences_scores` [rows]: the beam hypotheses' scores; `past_key_values`: the
    cache given in, continued."""
    sequences: Any = None
    scores: Any = None
    logits: Any = None
    sequences_scores: Any = None
    past_key_values: Any = None
    attentions: Any = None      # never materialised
    hidden_states: Any = None   # never materialised

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.sequences, self.scores, self.logits, self.sequences_scores,
                                 self.past_key_values) if v is not None)[key]


# The keywords generate() implements, with xoron's defaults (those of the original model:
# sampling with top_k=50, top_p=0.9).
DEFAULTS = dict(
    attention_mask=None, inputs_embeds=None, past_key_values=None,
    max_new_tokens=None, max_length=None, min_new_tokens=0, min_length=0,
    do_sample=None, temperature=1.0, top_k=50, top_p=0.9, min_p=None, repetition_penalty=1.0,
    no_repeat_ngram_size=0, bad_words_ids=None,
    num_beams=1, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
    pad_token_id=None, eos_token_id=None, seed=None, streamer=None,
    stop_strings=None, tokenizer=None, stopping_criteria=None, logits_processor=None,
    return_dict_in_generate=False, output_scores=False, output_logits=False,
    output_attentions=False, output_hidden_states=False, use_cache=True, generation_config=None,
)
DEFAULT_MAX_NEW_TOKENS = 100

# generation_config fields with no effect here whatever their value: bos_token_id only starts
# a generation that has no prompt, and a prompt is required; use_cache does not change results.
NO_EFFECT = {"bos_token_id", "use_cache", "transformers_version", "_from_model_config", "_commit_hash",
             "_original_object_hash", "generation_kwargs", "decoder_start_token_id", "is_assistant"}
# transformers GenerationConfig fields xoron does not implement, with the default value that
# means "off" (a dict may carry them at these values).
UNSUPPORTED_DEFAULTS = {
    "max_time": None, "num_beam_groups": 1, "penalty_alpha": None, "dola_layers": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
    "force_words_ids": None, "renormalize_logits": False, "constraints": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_decoder_ids": None, "sequence_bias": None,
    "token_healing": False, "guidance_scale": None, "low_memory": None, "watermarking_config": None,
    "encoder_no_repeat_ngram_size": 0, "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4, "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None,
    "assistant_early_exit": None, "assistant_lookbehind": 10, "target_lookbehind": 10,
    "cache_implementation": None, "cache_config": None, "return_legacy_cache": True, "disable_compile": False,
    "compile_config": None, "prefill_chunk_size": None, "top_h": None,
}
# the generation_config fields that are generate() keywords
CONFIG_FIELDS = set(DEFAULTS) - {"attention_mask", "inputs_embeds", "past_key_values", "seed", "streamer",
                                 "tokenizer", "stopping_criteria", "logits_processor", "generation_config"}


def _from_generation_config(gc) -> dict:
    """The generate() keywords a GenerationConfig (all its fields) or a dict (its keys) sets."""
    if gc is None:
        return {}
    if isinstance(gc, dict):
        fields, non_default = dict(gc), {k for k, v in gc.items() if UNSUPPORTED_DEFAULTS.get(k, object()) != v}
    elif hasattr(gc, "to_dict") and hasattr(gc, "to_diff_dict"):
        fields = gc.to_dict()
        non_default = {k for k, v in gc.to_diff_dict().items() if v is not None}
    else:
        raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, "
                        f"got {type(gc).__name__}")
    # a GenerationConfig holds every field of its transformers version: those left at their
    # defaults are off, whatever they are
    unknown = sorted(k for k in fields if k not in CONFIG_FIELDS and k not in NO_EFFECT
                     and k not in UNSUPPORTED_DEFAULTS and k in non_default)
    if unknown:
        raise TypeError(f"generation_config has unknown field(s) {', '.join(map(repr, unknown))}")
    unsupported = sorted(k for k in non_default if k in UNSUPPORTED_DEFAULTS)
    if unsupported:
        raise ValueError(f"generation_config sets field(s) xoron does not support: "
                         f"{', '.join(f'{k}={fields[k]!r}' for k in unsupported)}")
    # None leaves a field to xoron's default
    return {k: v for k, v in fields.items() if k in CONFIG_FIELDS and v is not None}


def _int_arg(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(v)


def _float_arg(v, name: str, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


def _token_ids(v, name: str) -> list:
    ids = [v] if np.ndim(v) == 0 else list(np.asarray(v).reshape(-1))
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{name} must be a token id or a list of them, got {v!r}")
    return [int(i) for i in ids]


def _ragged(seqs, name: str):
    """A list of token-id lists as (values int32, offsets int32 [n + 1]), or (None, None)."""
    if seqs is None:
        return None, None
    if not isinstance(seqs, (list, tuple)) or not all(isinstance(s, (list, tuple, np.ndarray)) for s in seqs):
        raise ValueError(f"{name} must be a list of token-id lists, got {seqs!r}")
    parts = []
    for i, s in enumerate(seqs):
        ids = _token_ids(s, f"{name}[{i}]")
        if not ids:
            raise ValueError(f"{name}[{i}] is empty")
        parts.append(ids)
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int32)
    values = np.asarray([i for p in parts for i in p], dtype=np.int64)
    if values.size and (values.min() < -2**31 or values.max() >= 2**31):
        raise ValueError(f"{name} holds ids outside the int32 range")
    return values.astype(np.int32), offsets


_TOKEN_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _token_table(tokenizer, vocab: int):
    """(bytes uint8, offsets int64 [vocab + 1]) of every token's text, built once per tokenizer."""
    try:
        table = _TOKEN_TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: built per call
        table = None
    if table is not None and len(table[1]) == vocab + 1:
        return table
    if hasattr(tokenizer, "token_bytes"):
        pieces = [tokenizer.token_bytes(i) if i < len(tokenizer) else b"" for i in range(vocab)]
    elif hasattr(tokenizer, "decode"):
        pieces = [tokenizer.decode([i]).encode("utf-8", "surrogatepass") for i in range(vocab)]
    else:
        raise TypeError("tokenizer must have token_bytes(id) or decode(ids) to match stop_strings")
    table = (np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(),
             np.cumsum([0] + [len(p) for p in pieces]).astype(np.int64))
    try:
        _TOKEN_TABLES[tokenizer] = table
    except TypeError:
        pass
    return table


def _callables(v, name: str) -> list:
    """A LogitsProcessorList / StoppingCriteriaList / list of callables / one callable."""
    if v is None:
        return []
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    for f in items:
        if not callable(f):
            raise TypeError(f"{name} must be callables (input_ids, scores) -> ..., got {type(f).__name__}")
    return items


def generate(model, input_ids=None, **kwargs):
    """Generates after the prompt: input_ids [b, t], or inputs_embeds [b, te, H] optionally
    followed by input_ids (README "Generation"). Returns prompt ids + new tokens
    [rows, t + n] (numpy, or torch when the input was torch); rows that finished are padded
    with pad_token_id (eos when unset). A keyword it does not implement is a TypeError
    naming it."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    a = dict(DEFAULTS)
    a.update(_from_generation_config(kwargs.get("generation_config")))
    a.update(kwargs)  # explicit keywords win over generation_config
    if a["output_attentions"]:
        raise ValueError("output_attentions is not supported: the engine never materialises attention weights")
    if a["output_hidden_states"]:
        raise ValueError("output_hidden_states is not supported by generate(); call the model's forward instead")
    config = model.config

    # ---- the prompt ----
    torch_dev = None
    embeds = None
    if a["inputs_embeds"] is not None:
        emb, torch_dev = to_numpy(a["inputs_embeds"], "inputs_embeds")
        if emb.ndim != 3 or not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"inputs_embeds must be a 3-D float array [batch, tokens, hidden], "
                             f"got shape {list(emb.shape)} of {emb.dtype}")
        embeds = np.ascontiguousarray(emb, dtype=np.float32)
    if input_ids is None and embeds is None:
        raise ValueError("generate() needs input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, (list, tuple)):
            _, ids_dev = to_numpy(input_ids, "input_ids")
            torch_dev = torch_dev if ids_dev is None else ids_dev
        prompt = ids_array(input_ids)
    else:
        prompt = np.zeros((embeds.shape[0], 0), dtype=np.int32)
    b, t = prompt.shape
    te = 0 if embeds is None else embeds.shape[1]
    if embeds is not None and embeds.shape[0] != b:
        raise ValueError(f"inputs_embeds has {embeds.shape[0]} rows but input_ids has {b}")
    mask = None
    if a["attention_mask"] is not None:
        mask = mask_array(a["attention_mask"])
        if mask.shape != (b, te + t):
            raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected {[b, te + t]} like the prompt")

    # ---- lengths ----
    max_length = None if a["max_length"] is None else _int_arg(a["max_length"], "max_length")
    if a["max_new_tokens"] is not None:  # wins over max_length, as in transformers
        max_new_tokens = _int_arg(a["max_new_tokens"], "max_new_tokens")
    elif max_length is not None:
        if max_length <= te + t:
            raise ValueError(f"max_length ({max_length}) counts the prompt; it must exceed the prompt's "
                             f"{te + t} tokens (or give max_new_tokens)")
        max_new_tokens = max_length - te - t
    else:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens = max(_int_arg(a["min_new_tokens"] or 0, "min_new_tokens"),
                         _int_arg(a["min_length"] or 0, "min_length") - te - t)

    # ---- search and sampling ----
    num_beams = _int_arg(a["num_beams"] if a["num_beams"] is not None else 1, "num_beams")
    num_return = _int_arg(a["num_return_sequences"] if a["num_return_sequences"] is not None else 1,
                          "num_return_sequences")
    do_sample = a["do_sample"]
    if do_sample is None:  # xoron samples by default; beam search is deterministic
        do_sample = num_beams == 1
    do_sample = bool(do_sample)
    if num_beams == 1 and num_return > 1 and not do_sample:
        raise ValueError("greedy search returns one sequence per prompt: num_return_sequences > 1 needs "
                         "do_sample=True or num_beams >= num_return_sequences")
    # the engine checks what the values mean (ranges, beam sampling); here they are only converted
    top_k = _int_arg(a["top_k"] if a["top_k"] is not None else 0, "top_k")
    temperature = _float_arg(a["temperature"], "temperature", 1.0)
    top_p = _float_arg(a["top_p"], "top_p", 1.0)
    min_p = _float_arg(a["min_p"], "min_p", 0.0)
    repetition_penalty = _float_arg(a["repetition_penalty"], "repetition_penalty", 1.0)
    length_penalty = _float_arg(a["length_penalty"], "length_penalty", 1.0)
    early = a["early_stopping"]
    if early not in EARLY_STOPPING or isinstance(early, (int, float)) and not isinstance(early, bool):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    ngram = _int_arg(a["no_repeat_ngram_size"] or 0, "no_repeat_ngram_size")
    bad, bad_off = _ragged(a["bad_words_ids"], "bad_words_ids")

    eos_token_id = a["eos_token_id"]
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = [] if eos_token_id is None else _token_ids(eos_token_id, "eos_token_id")
    pad_token_id = a["pad_token_id"]
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    pad_token_id = _int_arg(pad_token_id, "pad_token_id")
    seed = a["seed"]
    if seed is None:
        seed = secrets.randbits(63)
    seed = _int_arg(seed, "seed") & ((1 << 64) - 1)

    # ---- stop strings and Python callbacks ----
    stop_strings = a["stop_strings"]
    stop_bytes = stop_off = tok_bytes = tok_off = None
    if stop_strings is not None:
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if a["tokenizer"] is None:
            raise ValueError("stop_strings needs tokenizer= to know the text of each token")
        encoded = [s.encode("utf-8") for s in strings]
        stop_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        stop_off = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int32)
        tok_bytes, tok_off = _token_table(a["tokenizer"], config.vocab_size)
    processors = _callables(a["logits_processor"], "logits_processor")
    criteria = _callables(a["stopping_criteria"], "stopping_criteria")

    def as_user(ids, scores):  # the callbacks see torch tensors when the inputs were torch
        return output(ids, torch_dev), output(scores, torch_dev)

    logits_hook = stop_hook = None
    if processors:
        def logits_hook(ids, scores):
            ids, scores = as_user(ids, scores)
            for f in processors:
                scores = f(ids, scores)
            return to_numpy(scores, "the scores a logits processor returned")[0]
    if criteria:
        def stop_hook(ids, scores):
            done = np.zeros(ids.shape[0], dtype=bool)
            ids, scores = as_user(ids, scores)
            for f in criteria:
                hit = np.asarray(to_numpy(f(ids, scores), "a stopping criterion's result")[0], dtype=bool)
                if hit.ndim == 0:
                    hit = np.full(done.shape, bool(hit))
                if hit.shape != done.shape:
                    return hit  # the engine names the mismatch
                done |= hit
            return done

    # ---- the cache to continue ----
    cache = a["past_key_values"]
    c_cache = getattr(cache, "_c", cache)

    # ---- num_return_sequences with sampling: each prompt row repeated ----
    if num_beams == 1 and num_return > 1:
        if cache is not None:
            raise ValueError("num_return_sequences > 1 with past_key_values is not supported with sampling")
        prompt = np.repeat(prompt, num_return, axis=0)
        mask = None if mask is None else np.repeat(mask, num_return, axis=0)
        embeds = None if embeds is None else np.repeat(embeds, num_return, axis=0)

    streamer = a["streamer"]
    if streamer is not None and num_beams > 1:
        raise ValueError("a streamer cannot follow beam search (the beams change until the end)")
    return_dict = bool(a["return_dict_in_generate"])
    callback = None
    if streamer is not None:
        streamer.put(output(prompt.astype(np.int64), torch_dev))
        callback = (lambda toks: streamer.put(output(toks, torch_dev)))
    seqs, scores, raw, seq_scores, steps, steps_run = model._engine.generate(
        prompt, mask=mask, embeds=embeds, cache=c_cache, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=ngram, bad_words=bad,
        bad_offsets=bad_off, eos_ids=np.asarray(eos, dtype=np.int32), pad_id=pad_token_id, seed=seed,
        cache_format=CACHE_FORMATS[model.cache_format], want_scores=bool(a["output_scores"] and return_dict),
        want_logits=bool(a["output_logits"] and return_dict), num_beams=num_beams, num_return_sequences=num_return if num_beams > 1 else 1,
        length_penalty=length_penalty, early_stopping=EARLY_STOPPING[early], stop_bytes=stop_bytes,
        stop_offsets=stop_off, token_bytes=tok_bytes, token_offsets=tok_off, callback=callback,
        logits_hook=logits_hook, stop_hook=stop_hook)
    if streamer is not None:
        streamer.end()
    seqs = output(seqs[:, :t + steps].astype(np.int64), torch_dev)
    if not return_dict:
        return seqs

    def per_step(x):
        return None if x is None else tuple(output(x[i], torch_dev) for i in range(steps_run))
    return GenerateOutput(sequences=seqs, scores=per_step(scores), logits=per_step(raw),
                          sequences_scores=output(seq_scores, torch_dev), past_key_values=cache)


def generate_stream(model, input_ids=None, **kwargs):
    """Yields the new token ids as they are produced (an int per step for one row, an array
    of one id per row otherwise). Takes generate()'s keyword arguments. Leaving the loop
    early (break, close(), the generator dropped) stops the generation at the next step."""
    import queue
    import threading

    if "streamer" in kwargs:
        raise TypeError("generate_stream() makes its own streamer: 'streamer' is not accepted")
    q: "queue.Queue" = queue.Queue()
    done = object()
    closed = threading.Event()

    class _QueueStreamer:
        first = True

        def put(self, ids):
            if closed.is_set():  # the consumer left: stop the C loop now
                raise _StreamClosed
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
        except _StreamClosed:
            pass
        except BaseException as e:  # re-raised in the consumer
            errors.append(e)
        finally:
            q.put(done)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            arr = np.asarray(item)
            yield int(arr[0]) if arr.shape == (1,) else item
    finally:
        closed.set()
        worker.join()
    if errors:
        raise errors[0]


class _StreamClosed(Exception):
    """Raised by generate_stream's streamer once its consumer has gone."""
