"""Incremental detokenization: the text each generated token completes."""

from __future__ import annotations

import codecs


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the text completed by that token.

    Bytes of a UTF-8 sequence split across tokens are held back until the sequence is complete;
    invalid bytes come out as U+FFFD.  Call ``flush()`` at the end for any incomplete tail.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def reset(self) -> None:
        self._decoder.reset()
