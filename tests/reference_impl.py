"""Pure-numpy float64 oracle for the Xoron MoE-LLaMA model (SPEC.md sections 1-7).

This module is the test reference for the engine: it is written for clarity and exactness,
not speed, and needs nothing but numpy.  Everything runs in float64 except the rotary
frequency table, which SPEC section 5 defines in float32 (see `rope_cos_sin`).

Conventions worth knowing (see SPEC.md for the contract):

* Attention: a query with no allowed key at all (for example a left-pad query whose own
  mask entry is 0 and whose earlier keys are all pads) gets an attention output of exactly
  zero instead of NaN.
* With `use_ring_attention` and a key length above `ring_attention_chunk_size`, attention is
  evaluated chunk by chunk over the keys with an online softmax and, like the original
  module, divides by `sum_of_exponentials + ring_eps` (default 1e-5, SPEC 4.4).  Pass
  `ring_eps=0.0` to `forward` to get the plain softmax from the chunked path.
* MoE layers evaluate every expert on every token and weight the outputs by the (mostly
  zero) routing matrix: exact in float64, and cheap for the small test configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Any, Mapping

import numpy as np

__all__ = [
    "RefConfig",
    "random_weights",
    "rope_inv_freq",
    "rope_cos_sin",
    "forward",
    "forward_hidden",
    "sample_filter",
    "greedy_generate",
    "load_safetensors",
]

ROPE_ORIGINAL_MAX_POS = 8192  # L0 of SPEC section 5
ROPE_BETA_FAST = 32.0
ROPE_BETA_SLOW = 1.0
INNER_NORM_EPS = 1e-6  # kv_a_layernorm, q_a_layernorm, router input_norm (SPEC section 3)
TOPK_RENORM_EPS = 1e-5  # SPEC section 6
RING_EPS = 1e-5  # SPEC section 4.4


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class RefConfig:
    """Model configuration with the defaults of SPEC section 1."""

    vocab_size: int = 151643
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = True
    use_ring_attention: bool = True
    ring_attention_chunk_size: int = 4096
    kv_lora_rank: int = 512
    q_lora_rank: int = 0
    use_moe: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_freq: int = 2
    moe_intermediate_size: int | None = None  # None -> intermediate_size

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for the rotary embedding")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        """SPEC section 2: layer i is MoE iff use_moe and i % freq == freq - 1."""
        f = self.moe_layer_freq
        return bool(self.use_moe) and i % f == f - 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RefConfig":
        """Build from a config.json-style dict (flat, optional nested `moe_config`).

        Also understands the Xoron-Dev multimodal layout (`num_layers`, `num_heads` and flat
        MoE keys; nkv = nh and expert width = intermediate_size there).
        """
        d = dict(d)
        if "num_hidden_layers" not in d and "num_layers" in d:
            d["num_hidden_layers"] = d["num_layers"]
        if "num_attention_heads" not in d and "num_heads" in d:
            d["num_attention_heads"] = d["num_heads"]
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and not f.name.startswith("moe_") and f.name not in (
                "use_moe", "num_experts", "num_experts_per_tok"):
                kw[f.name] = d[f.name]
        moe = d.get("moe_config")
        if moe is None and "use_moe" in d:  # Xoron-Dev flat MoE keys
            moe = {k: d[k] for k in ("use_moe", "num_experts", "num_experts_per_tok",
                                     "moe_layer_freq") if k in d}
            if "moe_intermediate_size" in d:
                moe["intermediate_size"] = d["moe_intermediate_size"]
        moe = dict(moe or {})
        kw["use_moe"] = bool(moe.get("use_moe", False)) if moe else False
        for k in ("num_experts", "num_experts_per_tok", "moe_layer_freq"):
            if k in moe:
                kw[k] = int(moe[k])
        if "intermediate_size" in moe:
            kw["moe_intermediate_size"] = int(moe["intermediate_size"])
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings",
                  "ring_attention_chunk_size", "kv_lora_rank", "q_lora_rank"):
            if k in kw:
                kw[k] = int(kw[k])
        if kw.get("num_key_value_heads") is not None:
            kw["num_key_value_heads"] = int(kw["num_key_value_heads"])
        for k in ("rms_norm_eps", "rope_theta"):
            if k in kw:
                kw[k] = float(kw[k])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (flat plus nested `moe_config`)."""
        d = dataclasses.asdict(self)
        moe = {
            "use_moe": d.pop("use_moe"),
            "num_experts": d.pop("num_experts"),
            "num_experts_per_tok": d.pop("num_experts_per_tok"),
            "moe_layer_freq": d.pop("moe_layer_freq"),
            "intermediate_size": d.pop("moe_intermediate_size"),
        }
        d["moe_config"] = moe
        return d


# --------------------------------------------------------------------------- weights


def random_weights(cfg: RefConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the exact SPEC section-2 names and shapes.

    Linears ~ N(0, 0.02); embeddings ~ N(0, 0.7) so logits are O(1); norm weights
    1 + 0.1*N(0,1); router gates ~ N(0, 0.5) so routing really depends on the input.
    """
    rng = np.random.default_rng(seed)
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nh, nkv, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_lora_rank

    def lin(out: int, inp: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * std).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (rng.standard_normal((V, H)) * 0.7).astype(np.float32)
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        if cfg.q_lora_rank > 0:
            w[p + "self_attn.q_a_proj.weight"] = lin(cfg.q_lora_rank, H)
            w[p + "self_attn.q_a_layernorm.weight"] = norm(cfg.q_lora_rank)
            w[p + "self_attn.q_b_proj.weight"] = lin(nh * hd, cfg.q_lora_rank)
        else:
            w[p + "self_attn.q_proj.weight"] = lin(nh * hd, H)
        w[p + "self_attn.kv_a_proj.weight"] = lin(r + hd, H)
        w[p + "self_attn.kv_a_layernorm.weight"] = norm(r)
        w[p + "self_attn.kv_b_proj.weight"] = lin(2 * nkv * hd, r)
        w[p + "self_attn.o_proj.weight"] = lin(H, nh * hd)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        if cfg.is_moe_layer(i):
            Ie = cfg.moe_intermediate_size
            w[p + "mlp.router.input_norm.weight"] = norm(H)
            w[p + "mlp.router.gate.weight"] = lin(cfg.num_experts, H, 0.5)
            for name in [f"experts.{e}" for e in range(cfg.num_experts)] + ["shared_expert"]:
                w[p + f"mlp.{name}.gate_proj.weight"] = lin(Ie, H)
                w[p + f"mlp.{name}.up_proj.weight"] = lin(Ie, H)
                w[p + f"mlp.{name}.down_proj.weight"] = lin(H, Ie)
        else:
            I = cfg.intermediate_size
            w[p + "mlp.gate_proj.weight"] = lin(I, H)
            w[p + "mlp.up_proj.weight"] = lin(I, H)
            w[p + "mlp.down_proj.weight"] = lin(H, I)
    w["model.norm.weight"] = norm(H)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = lin(V, H, 0.1)
    return w


# --------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: RefConfig) -> tuple[np.ndarray, float]:
    """YaRN-variant inverse frequencies (float32, [hd/2]) and mscale, SPEC section 5.

    The low indices (high frequencies) are interpolated, the reverse of published YaRN.
    """
    d = cfg.head_dim
    base = float(cfg.rope_theta)
    s = cfg.max_position_embeddings / ROPE_ORIGINAL_MAX_POS
    f32 = np.float32
    exps = np.arange(0, d, 2, dtype=f32) / f32(d)
    # base ** (2i / d) rounded once to float32 (numpy's float32 power can be an ulp off, which
    # moves theta = p * inv_freq by ~1e-3 rad at positions near 1e5)
    freq = np.power(np.float64(f32(base)), exps.astype(np.float64)).astype(f32)
    extra = (f32(1.0) / freq).astype(f32)
    inter = (f32(1.0) / (f32(s) * freq)).astype(f32)
    low = max(math.floor(d * math.log(ROPE_ORIGINAL_MAX_POS / (ROPE_BETA_FAST * 2 * math.pi))
                         / (2 * math.log(base))), 0)
    high = min(math.ceil(d * math.log(ROPE_ORIGINAL_MAX_POS / (ROPE_BETA_SLOW * 2 * math.pi))
                         / (2 * math.log(base))), d - 1)
    u = (np.arange(d // 2, dtype=f32) - f32(low)) / f32(max(high - low, 1))
    u = np.clip(u, 0, 1).astype(f32)
    inv_freq = (inter * (f32(1) - u) + extra * u).astype(f32)
    mscale = 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0
    return inv_freq, mscale


def rope_cos_sin(cfg: RefConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape positions.shape + (hd,), float64, already scaled by mscale.

    theta = p * inv_freq is formed in float32 (as the original does); cos/sin of that
    float32 angle are then evaluated in float64.
    """
    inv_freq, mscale = rope_inv_freq(cfg)
    pos = np.asarray(positions).astype(np.float32)
    theta = (pos[..., None] * inv_freq).astype(np.float32).astype(np.float64)
    emb = np.concatenate([theta, theta], axis=-1)
    return np.cos(emb) * mscale, np.sin(emb) * mscale


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [b, heads, t, d]; cos/sin [b, t, d]."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rot * sin[:, None]


# --------------------------------------------------------------------------- blocks


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def _swiglu(x: np.ndarray, w: Mapping[str, np.ndarray], p: str) -> np.ndarray:
    g = x @ w[p + "gate_proj.weight"].T
    u = x @ w[p + "up_proj.weight"].T
    return (_silu(g) * u) @ w[p + "down_proj.weight"].T


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def _attend_full(q, k, v, allowed):
    """Plain masked softmax attention. q [b,h,t,d], k/v [b,h,T,d], allowed [b,1,t,T]."""
    s = (q @ np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed, np.exp(s - m), 0.0)
    den = p.sum(axis=-1, keepdims=True)
    out = p @ v
    return np.where(den > 0, out / np.where(den > 0, den, 1.0), 0.0)


def _attend_chunked(q, k, v, allowed, chunk: int, eps: float):
    """Online-softmax attention over key chunks of `chunk` (SPEC 4.4 formulation)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    b, h, t, d = q.shape
    T = k.shape[2]
    m = np.full((b, h, t, 1), -np.inf)
    den = np.zeros((b, h, t, 1))
    acc = np.zeros((b, h, t, v.shape[-1]))
    for s0 in range(0, T, chunk):
        kc, vc, al = k[:, :, s0:s0 + chunk], v[:, :, s0:s0 + chunk], allowed[..., s0:s0 + chunk]
        s = np.where(al, (q @ np.swapaxes(kc, -1, -2)) * scale, -np.inf)
        m_new = np.maximum(m, np.max(s, axis=-1, keepdims=True))
        m_safe = np.where(np.isfinite(m_new), m_new, 0.0)
        corr = np.where(np.isfinite(m), np.exp(m - m_safe), 0.0)
        p = np.where(al, np.exp(s - m_safe), 0.0)
        acc = acc * corr + p @ vc
        den = den * corr + p.sum(axis=-1, keepdims=True)
        m = m_new
    has_key = den > 0
    return np.where(has_key, acc / np.where(has_key, den + eps, 1.0), 0.0)


def _attention(cfg, w, p, x, cos, sin, allowed, ring_eps):
    b, t, _ = x.shape
    nh, nkv, hd, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank > 0:
        qa = _rms_norm(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"],
                       INNER_NORM_EPS)
        q = qa @ w[p + "q_b_proj.weight"].T
    else:
        q = x @ w[p + "q_proj.weight"].T
    q = q.reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
    c = (x @ w[p + "kv_a_proj.weight"].T)[..., :r]  # last hd columns are discarded
    c = _rms_norm(c, w[p + "kv_a_layernorm.weight"], INNER_NORM_EPS)
    kv = c @ w[p + "kv_b_proj.weight"].T
    k = kv[..., : nkv * hd].reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
    v = kv[..., nkv * hd:].reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    g = nh // nkv
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    if cfg.use_ring_attention and t > cfg.ring_attention_chunk_size:
        o = _attend_chunked(q, k, v, allowed, cfg.ring_attention_chunk_size, ring_eps)
    else:
        o = _attend_full(q, k, v, allowed)
    o = o.transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
    return o @ w[p + "o_proj.weight"].T


def _route(cfg: RefConfig, w, p, x2d):
    """Routing weights [N, E] (zeros for unselected experts), SPEC section 6."""
    z = _rms_norm(x2d, w[p + "router.input_norm.weight"], INNER_NORM_EPS) @ w[p + "router.gate.weight"].T
    probs = _softmax(z)
    K = cfg.num_experts_per_tok
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :K]  # ties: lower index first
    pk = np.take_along_axis(probs, idx, axis=-1)
    pk = pk / (pk.sum(axis=-1, keepdims=True) + TOPK_RENORM_EPS)
    route = np.zeros_like(probs)
    np.put_along_axis(route, idx, pk, axis=-1)
    return route


def _moe(cfg: RefConfig, w, p, x):
    b, t, H = x.shape
    x2 = x.reshape(b * t, H)
    route = _route(cfg, w, p, x2)
    out = _swiglu(x2, w, p + "shared_expert.")
    for e in range(cfg.num_experts):
        sel = route[:, e] != 0
        if np.any(sel):
            out[sel] += route[sel, e:e + 1] * _swiglu(x2[sel], w, p + f"experts.{e}.")
    return out.reshape(b, t, H)


# --------------------------------------------------------------------------- model


def _default_positions(input_ids: np.ndarray, attention_mask) -> np.ndarray:
    b, t = input_ids.shape
    if attention_mask is None:
        return np.broadcast_to(np.arange(t), (b, t)).copy()
    m = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    pos[m == 0] = 1  # SPEC section 7: pads get position 1
    return pos


def forward_hidden(cfg: RefConfig, weights: Mapping[str, np.ndarray], input_ids,
                   attention_mask=None, position_ids=None, ring_eps: float = RING_EPS):
    """Hidden states like HF `output_hidden_states`: L+1 arrays [b, t, H] (float64).

    Entry 0 is the embedding output, entry i the output of layer i-1, and the last entry
    is the final-normed output of the last layer.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    b, t = ids.shape
    if position_ids is None:
        position_ids = _default_positions(ids, attention_mask)
    pos = np.broadcast_to(np.asarray(position_ids, dtype=np.int64), (b, t))
    cos, sin = rope_cos_sin(cfg, pos)
    causal = np.tril(np.ones((t, t), dtype=bool))
    allowed = np.broadcast_to(causal, (b, 1, t, t))
    if attention_mask is not None:
        keymask = np.asarray(attention_mask).astype(bool).reshape(b, 1, 1, t)
        allowed = allowed & keymask

    h = w["model.embed_tokens.weight"][ids]
    hidden = [h]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        h = h + _attention(cfg, w, p + "self_attn.", x, cos, sin, allowed, ring_eps)
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if cfg.is_moe_layer(i):
            h = h + _moe(cfg, w, p + "mlp.", x)
        else:
            h = h + _swiglu(x, w, p + "mlp.")
        if i < cfg.num_hidden_layers - 1:
            hidden.append(h)
    hidden.append(_rms_norm(h, w["model.norm.weight"], cfg.rms_norm_eps))
    return hidden


def _lm_head(cfg: RefConfig, weights) -> np.ndarray:
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return np.asarray(weights[name], dtype=np.float64)


def causal_lm_loss(logits: np.ndarray, labels) -> float:
    """Shifted cross-entropy, -100 ignored, mean, clamped to [0, 100]; 0 if nothing valid."""
    labels = np.asarray(labels, dtype=np.int64)
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    valid = lb != -100
    if not np.any(valid):
        return 0.0
    lg, lb = lg[valid], lb[valid]
    m = lg.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(lg - m).sum(axis=-1)) + m[:, 0]
    nll = lse - lg[np.arange(lb.size), lb]
    return float(np.clip(nll.mean(), 0.0, 100.0))


def forward(cfg: RefConfig, weights: Mapping[str, np.ndarray], input_ids,
            attention_mask=None, position_ids=None, labels=None,
            ring_eps: float = RING_EPS):
    """Full forward. Returns (logits float64 [b, t, V], loss float or None)."""
    hidden = forward_hidden(cfg, weights, input_ids, attention_mask, position_ids, ring_eps)
    logits = hidden[-1] @ _lm_head(cfg, weights).T
    loss = None if labels is None else causal_lm_loss(logits, labels)
    return logits, loss


# --------------------------------------------------------------------------- generation


def sample_filter(logits_row, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Next-token distribution after SPEC section-7 filtering (float64 [V], 0 = removed).

    * temperature != 1: logits / temperature.
    * top_k > 0: keep the logits >= the k-th largest (ties at the threshold are kept).
    * top_p < 1: sort descending (stable, so ties keep lower index first), cumulative
      softmax; drop a token when the cumulative probability *before* it already exceeds
      top_p, i.e. keep every token up to and including the first one whose cumulative
      probability crosses top_p (the top-1 is always kept).
    * min_p > 0 (after those): drop a token whose probability is below min_p times the top
      token's, i.e. a logit below max + log(min_p).
    Finally a softmax over the kept tokens.
    """
    z = np.asarray(logits_row, dtype=np.float64).copy()
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if temperature != 1.0:
        z = z / temperature
    if top_k > 0:
        kth = np.sort(z)[::-1][min(top_k, z.size) - 1]
        z[z < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        cum = np.cumsum(_softmax(z[order]))
        remove = np.zeros(z.size, dtype=bool)
        remove[1:] = cum[:-1] > top_p
        z[order[remove]] = -np.inf
    if min_p > 0.0:
        z[z < z.max() + np.log(min_p)] = -np.inf
    return _softmax(z)


def greedy_generate(cfg: RefConfig, weights: Mapping[str, np.ndarray], prompt_ids,
                    max_new_tokens: int, attention_mask=None) -> np.ndarray:
    """Greedy decoding by repeated full forwards (no cache). Returns [b, t + n] int64."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    for _ in range(max_new_tokens):
        logits, _ = forward(cfg, weights, ids, attention_mask=mask)
        nxt = np.argmax(logits[:, -1], axis=-1)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        if mask is not None:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    return ids


# --------------------------------------------------------------------------- io


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader: F32/F16/BF16 (and F64) tensors -> float32 arrays."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        start, end = info["data_offsets"]
        raw = data[base + start:base + end]
        shape = tuple(info["shape"])
        if dt == "BF16":
            u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
            arr = (u16 << 16).view(np.float32)
        elif dt in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<"))
        else:
            raise ValueError(f"tensor {name}: unsupported dtype {dt}")
        out[name] = arr.reshape(shape).astype(np.float32)
    return out


def load_checkpoint(directory) -> tuple[RefConfig, dict[str, np.ndarray]]:
    """Read config.json + model.safetensors from a checkpoint directory."""
    with open(os.path.join(directory, "config.json")) as f:
        cfg = RefConfig.from_dict(json.load(f))
    return cfg, load_safetensors(os.path.join(directory, "model.safetensors"))
