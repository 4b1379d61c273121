"""The BPE model of tokenizer.json: vocabulary, merges applied by rank, unknown-token and
byte-fallback rules, with the ids of each pre-token piece cached."""

from __future__ import annotations

_CACHE_LIMIT = 200_000  # pieces kept before the cache starts over (bounds its memory)


class BpeModel:
    """A tokenizer.json ``model`` of type BPE (`source` names the file in error messages)."""

    def __init__(self, model: dict, source: str):
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(
                f"unsupported BPE options in {source}: continuing_subword_prefix="
                f"{model.get('continuing_subword_prefix')!r}, end_of_word_suffix={model.get('end_of_word_suffix')!r}")
        vocab = model.get("vocab") or {}
        if isinstance(vocab, list):  # very old format: [[token, score], ...]
            vocab = {t[0]: i for i, t in enumerate(vocab)}
        self.vocab: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(model.get("merges") or []):
            if isinstance(m, str):
                parts = m.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"bad merge {m!r} in {source}")
                a, b = parts
            else:
                a, b = m
            self._ranks.setdefault((a, b), rank)
        self._ignore_merges = bool(model.get("ignore_merges", False))
        self._byte_fallback = bool(model.get("byte_fallback", False))
        self._fuse_unk = bool(model.get("fuse_unk", False))
        unk = model.get("unk_token")
        self._unk_id = self.vocab.get(unk) if unk is not None else None
        self._cache: dict[str, list[int]] = {}

    def encode(self, piece: str) -> list[int]:
        """The token ids of one pre-token piece."""
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._bpe(piece)
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[int]:
        vocab = self.vocab
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        symbols = list(word)
        ranks = self._ranks
        while len(symbols) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_pair = r, pair
            if best_pair is None:
                break
            a, b = best_pair
            merged = a + b
            out = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        ids: list[int] = []
        prev_unk = False
        for s in symbols:
            tid = vocab.get(s)
            if tid is not None:
                ids.append(tid)
                prev_unk = False
                continue
            if self._byte_fallback:
                fb = [vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")]
                if all(x is not None for x in fb):
                    ids.extend(fb)
                    prev_unk = False
                    continue
            if self._unk_id is not None:
                if not (self._fuse_unk and prev_unk):
                    ids.append(self._unk_id)
                prev_unk = True
            # no unk token: the symbol is dropped, as in tokenizers
        return ids
