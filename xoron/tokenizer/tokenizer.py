"""The tokenizer: added tokens, normaliser, pre-tokenizer, BPE and post-processor of a
HuggingFace ``tokenizer.json`` put together, with transformers-style encoding and decoding."""

from __future__ import annotations

from .added_tokens import added_matcher, split_added
from .bpe import BpeModel
from .byte_level import CHAR_TO_BYTE
from .describe import describe
from .encoding import Encoding, as_tensors
from .normalizers import build_normalizer
from .post_processor import PostProcessor
from .pre_tokenizers import build_pre_tokenizer
from .stream_decoder import StreamDecoder

_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>", "<eos>",
                   "<|eos|>", "<|end|>", "[EOS]")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[BOS]")


class Tokenizer:
    """A byte-level BPE tokenizer loaded from a HuggingFace ``tokenizer.json``."""

    def __init__(self, spec: dict, source: str = "<dict>", config: dict | None = None):
        self.source = source
        model = spec.get("model") or {}
        mtype = model.get("type")
        if mtype is None and "merges" in model and "vocab" in model:
            mtype = "BPE"
        if mtype != "BPE":
            raise ValueError(
                f"unsupported tokenizer model type {mtype!r} in {source}: only byte-level BPE "
                f"(GPT-2 / Qwen2.5 style) tokenizer.json files are supported")
        self._bpe_model = BpeModel(model, source)
        self._vocab: dict[str, int] = self._bpe_model.vocab
        self._id_to_token: dict[int, str] = {v: k for k, v in self._vocab.items()}

        # --- added tokens -----------------------------------------------------------------------
        self.added_tokens: list[dict] = [dict(t) for t in spec.get("added_tokens") or []]
        self._added_by_content: dict[str, int] = {}
        for t in self.added_tokens:
            self._added_by_content[t["content"]] = int(t["id"])
            self._id_to_token[int(t["id"])] = t["content"]  # added tokens win, as in tokenizers
        self.special_ids: frozenset[int] = frozenset(int(t["id"]) for t in self.added_tokens if t.get("special"))

        # --- pipeline ---------------------------------------------------------------------------
        self._normalize = build_normalizer(spec.get("normalizer"))
        self._pre_steps: list = []
        flags: dict = {}
        pre = spec.get("pre_tokenizer")
        if pre is not None:
            build_pre_tokenizer(pre, self._pre_steps, flags)
        if not flags.get("byte_level"):
            raise ValueError(
                f"{source} is a BPE tokenizer without a ByteLevel pre-tokenizer (pre_tokenizer: "
                f"{describe(pre)}, decoder: {describe(spec.get('decoder'))}); only byte-level "
                f"BPE (GPT-2 / Qwen2.5 style) is supported")
        dec = spec.get("decoder")
        dec_types = [d.get("type") for d in dec.get("decoders", [])] if dec and dec.get("type") == "Sequence" \
            else ([dec.get("type")] if dec else [])
        if any(t != "ByteLevel" for t in dec_types):
            raise ValueError(f"unsupported decoder {describe(dec)!r} in {source} (expected ByteLevel)")
        self._raw_matcher = added_matcher([t for t in self.added_tokens if not t.get("normalized")], None)
        self._norm_matcher = added_matcher([t for t in self.added_tokens if t.get("normalized")],
                                           self._normalize)
        self._post = PostProcessor(spec.get("post_processor"), self.token_to_id)

        self._bytes_cache: dict[int, bytes] = {}
        ids = list(self._id_to_token)
        self.vocab_size: int = (max(ids) + 1) if ids else 0

        # --- special ids --------------------------------------------------------------------------
        config = config or {}
        self.eos_token_id: int | None = self._find_special(config.get("eos_token"), _EOS_CANDIDATES, last=True)
        self.bos_token_id: int | None = self._find_special(config.get("bos_token"), _BOS_CANDIDATES, last=False)
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        # padded positions are masked out, so without a pad token the EOS token serves
        self.pad_token_id: int | None = self.token_to_id(pad) if isinstance(pad, str) else None
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        side = config.get("padding_side", "left")
        self.padding_side: str = side if side in ("left", "right") else "left"  # left: ready for generate()

    # ------------------------------------------------------------------------------------------
    def _find_special(self, configured, candidates, last: bool) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            tid = self.token_to_id(configured)
            if tid is not None:
                return tid
        tmpl = self._post.wrapping_specials()
        if tmpl:
            if last and tmpl[1] is not None:
                return tmpl[1]
            if not last and tmpl[0] is not None:
                return tmpl[0]
        for name in candidates:
            if name in self._added_by_content:
                return self._added_by_content[name]
        for name in candidates:
            if name in self._vocab:
                return self._vocab[name]
        return None

    # ------------------------------------------------------------------------------------------
    def _pre_tokenize(self, s: str) -> list[str]:
        pieces = [s]
        for step in self._pre_steps:
            nxt: list[str] = []
            for p in pieces:
                nxt.extend(step(p))
            pieces = nxt
        return pieces

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.  Added/special tokens written in the text are recognised;
        ``add_special_tokens`` applies the post-processor (e.g. a BOS from TemplateProcessing)."""
        ids: list[int] = []
        encode_piece = self._bpe_model.encode
        for seg, tid in split_added(text, self._raw_matcher):
            if tid is not None:
                ids.append(tid)
                continue
            if self._normalize is not None:
                seg = self._normalize(seg)
            for seg2, tid2 in split_added(seg, self._norm_matcher):
                if tid2 is not None:
                    ids.append(tid2)
                    continue
                for piece in self._pre_tokenize(seg2):
                    if piece:
                        ids.extend(encode_piece(piece))
        if add_special_tokens:
            ids = self._post.apply(ids)
        return ids

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None,
                 add_special_tokens=True, return_attention_mask=True, padding_side=None):
        """transformers-style encoding: {"input_ids", "attention_mask"} for a string or a list
        of strings. padding=True/"longest" pads to the longest row, "max_length" to
        max_length, on `padding_side` (default self.padding_side, "left": ready for
        generate()); truncation=True cuts rows to max_length. return_tensors: None (lists),
        "np" (int64 arrays) or "pt" (torch tensors)."""
        single = isinstance(text, str)
        if not single and not (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (False, True, "longest_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True or False, got {truncation!r}")
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        truncate = truncation in (True, "longest_first")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if (truncate or padding == "max_length") and max_length is None:
            raise ValueError("truncation=True and padding='max_length' need max_length")
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if truncate:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token (nor an EOS token to pad with): "
                                 "set tokenizer.pad_token_id first")
            for i, r in enumerate(rows):
                fill = max(width - len(r), 0)
                pads, zeros = [self.pad_token_id] * fill, [0] * fill
                rows[i], masks[i] = (pads + r, zeros + masks[i]) if side == "left" else (r + pads, masks[i] + zeros)
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ValueError("the rows have different lengths: give padding=True to return tensors")
            rows, masks = as_tensors(rows, return_tensors), as_tensors(masks, return_tensors)
        elif single:
            rows, masks = rows[0], masks[0]
        enc = Encoding(input_ids=rows)
        if return_attention_mask:
            enc["attention_mask"] = masks
        return enc

    # ------------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token decodes to (b"" for unknown ids)."""
        b = self._bytes_cache.get(token_id)
        if b is None:
            tok = self._id_to_token.get(int(token_id))
            if tok is None:
                b = b""
            elif all(c in CHAR_TO_BYTE for c in tok):
                b = bytes(CHAR_TO_BYTE[c] for c in tok)
            else:  # e.g. an added token written in plain text: its own UTF-8 (as tokenizers does)
                b = tok.encode("utf-8", "surrogatepass")
            self._bytes_cache[token_id] = b
        return b

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = self.special_ids
        buf = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special:
                continue
            buf += self.token_bytes(i)
        return buf.decode("utf-8", "replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """decode() of each row of a list of id lists, a 2-D array or a 2-D tensor."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder: push(token_id) gives the text each token completes."""
        return StreamDecoder(self, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token.get(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        tid = self._added_by_content.get(token)
        return tid if tid is not None else self._vocab.get(token)

    def get_vocab(self) -> dict[str, int]:
        v = dict(self._vocab)
        v.update(self._added_by_content)
        return v

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"eos_token_id={self.eos_token_id})")
