"""Streamers for generate(streamer=...): the transformers shape (put(ids) / end())."""
from __future__ import annotations

import sys

import numpy as np

from .tokenizer import StreamDecoder


class TextStreamer:
    """Prints the text of the new tokens as generate() produces them (one prompt row).

    TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=False, file=None)

    A character whose UTF-8 bytes are split across tokens is printed once its last byte
    arrives; `end()` prints any incomplete tail (as U+FFFD) and a newline. `file` defaults to
    sys.stdout."""

    def __init__(self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = False, file=None):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.file = file
        self._prompt_seen = False

    def put(self, value) -> None:
        ids = np.asarray(value.tolist() if hasattr(value, "tolist") else value)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"TextStreamer prints one row; got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.ndim != 1 or ids.shape[0] > 1 and self._prompt_seen:
            raise ValueError(f"TextStreamer prints one row; got token ids of shape {list(ids.shape)}")
        first = not self._prompt_seen
        self._prompt_seen = True
        if first and self.skip_prompt:
            return
        self._write("".join(self.decoder.push(int(i)) for i in ids))

    def end(self) -> None:
        self._write(self.decoder.flush() + "\n")
        self.decoder.reset()
        self._prompt_seen = False

    def _write(self, text: str) -> None:
        if text:
            out = self.file if self.file is not None else sys.stdout
            out.write(text)
            out.flush()
