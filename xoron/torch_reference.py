"""Eager PyTorch implementation of the Xoron MoE-LLaMA model (SPEC.md).

It computes the way the original module does (plain `nn.Linear(bias=False)` layers, a
per-expert Python loop for the MoE, float32 norm statistics and softmax) and its parameter
names are exactly the SPEC state_dict names, so `load_state_dict` works on a SPEC
checkpoint.  Unlike the original it has a working KV cache: per layer the cache keeps only
the normed latent `c` ([b, T, kv_lora_rank]) plus the key position ids and the key mask;
K and V are re-expanded from `c` at every step (SPEC section 4).

Used as the PyTorch baseline in benchmarks and to train small demo models; the forward
pass without a cache is autograd-friendly (no in-place ops on tensors that need grads).

    from xoron.torch_reference import TorchMoELlama   # needs torch; `import xoron` does not
    model = TorchMoELlama.from_pretrained("ckpt_dir", dtype=torch.bfloat16, device="cuda")
    out = model.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DEFAULTS, MOE_DEFAULTS

__all__ = ["TorchMoELlama", "LatentCache", "resolve_config", "load_safetensors_numpy"]

INNER_NORM_EPS = 1e-6  # kv_a_layernorm, q_a_layernorm, router input_norm
TOPK_RENORM_EPS = 1e-5
RING_EPS = 1e-5  # original ring path divides by sum + 1e-5 when keys > chunk (SPEC 4.4)
ROPE_L0, ROPE_BETA_FAST, ROPE_BETA_SLOW = 8192, 32.0, 1.0

# The per-expert MoE fields, each defaulted from the package's one table (xoron.config).
_MOE_COUNTS = {k: v for k, v in MOE_DEFAULTS.items() if k != "use_moe"}


def resolve_config(d: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Flat, fully-defaulted config from a config.json dict (SPEC section 1).

    Accepts the nested `moe_config` form, the Xoron-Dev multimodal form (`num_layers`,
    `num_heads`, flat MoE keys) and its own output (idempotent).  Keyword overrides win over the file.  The result has the
    MoE fields flattened: use_moe, num_experts, num_experts_per_tok, moe_layer_freq,
    moe_intermediate_size.
    """
    d = dict(d)
    if "num_hidden_layers" not in d and "num_layers" in d:
        d["num_hidden_layers"] = d["num_layers"]
    if "num_attention_heads" not in d and "num_heads" in d:
        d["num_attention_heads"] = d["num_heads"]
    cfg = {k: d.get(k, v) for k, v in DEFAULTS.items()}
    cfg["num_key_value_heads"] = d.get("num_key_value_heads", cfg["num_attention_heads"])
    if "moe_config" in d:
        moe = dict(d["moe_config"] or {})
    else:  # Xoron-Dev layout, or an already-resolved flat dict
        moe = {k: d[k] for k in ("use_moe", *_MOE_COUNTS) if k in d}
        if "moe_intermediate_size" in d:
            moe["intermediate_size"] = d["moe_intermediate_size"]
    cfg["use_moe"] = bool(moe.get("use_moe", MOE_DEFAULTS["use_moe"]))
    for k, v in _MOE_COUNTS.items():
        cfg[k] = moe.get(k, v)
    cfg["moe_intermediate_size"] = moe.get("intermediate_size", cfg["intermediate_size"])
    for k, v in overrides.items():
        if k == "moe_config":
            cfg["use_moe"] = bool(v.get("use_moe", MOE_DEFAULTS["use_moe"]))
            for kk in _MOE_COUNTS:
                cfg[kk] = v.get(kk, cfg[kk])
            cfg["moe_intermediate_size"] = v.get("intermediate_size", cfg["moe_intermediate_size"])
        else:
            cfg[k] = v
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
              "ring_attention_chunk_size", "kv_lora_rank", "q_lora_rank", "num_experts",
              "num_experts_per_tok", "moe_layer_freq", "moe_intermediate_size"):
        cfg[k] = int(cfg[k])
    cfg["rms_norm_eps"] = float(cfg["rms_norm_eps"])
    cfg["rope_theta"] = float(cfg["rope_theta"])
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_key_value_heads must divide num_attention_heads")
    return cfg


# --------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), statistics and product in float32."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def yarn_inv_freq(head_dim: int, base: float, max_pos: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float32) and mscale, SPEC section 5 (reversed-direction YaRN)."""
    d, f32 = head_dim, np.float32
    s = max_pos / ROPE_L0
    # base ** (2i / d) rounded once to float32, as the engine's powf gives it (numpy's float32
    # power can be an ulp off, which moves the angles by ~1e-3 rad at positions near 1e5)
    freq = np.power(np.float64(f32(base)), (np.arange(0, d, 2, dtype=f32) / f32(d)).astype(np.float64)).astype(f32)
    extra = (f32(1) / freq).astype(f32)
    inter = (f32(1) / (f32(s) * freq)).astype(f32)
    low = max(math.floor(d * math.log(ROPE_L0 / (ROPE_BETA_FAST * 2 * math.pi))
                         / (2 * math.log(base))), 0)
    high = min(math.ceil(d * math.log(ROPE_L0 / (ROPE_BETA_SLOW * 2 * math.pi))
                         / (2 * math.log(base))), d - 1)
    u = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(max(high - low, 1)), 0, 1)
    inv = (inter * (f32(1) - u.astype(f32)) + extra * u.astype(f32)).astype(f32)
    mscale = 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0
    return inv, mscale


class Rotary:
    """cos/sin from position ids; kept out of the module's buffers so that casting the model
    to bfloat16 never rounds the float32 frequency table."""

    def __init__(self, head_dim: int, base: float, max_pos: int):
        inv, self.mscale = yarn_inv_freq(head_dim, base, max_pos)
        self._inv = torch.from_numpy(inv)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, t] -> cos, sin [b, 1, t, hd] float32 (mscale included)."""
        inv = self._by_device.get(positions.device)
        if inv is None:
            inv = self._inv.to(positions.device)
            self._by_device[positions.device] = inv
        theta = positions.float()[..., None] * inv
        emb = torch.cat([theta, theta], dim=-1)[:, None]
        return emb.cos() * self.mscale, emb.sin() * self.mscale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in float32, cast back to x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rot = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rot * sin).to(x.dtype)


@dataclass
class LatentCache:
    """Per-layer normed latents c [b, T, r], key position ids [b, T], key mask [b, T]."""

    latents: tuple[torch.Tensor, ...]
    positions: torch.Tensor
    mask: Optional[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])


class MLAttention(nn.Module):
    """Latent attention of SPEC section 4: K and V are expanded from the normed latent c."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nh, self.nkv = nh, cfg["num_key_value_heads"]
        self.hd, self.r = H // nh, cfg["kv_lora_rank"]
        self.q_lora_rank = cfg["q_lora_rank"]
        self.ring = cfg["use_ring_attention"]
        self.chunk = cfg["ring_attention_chunk_size"]
        if self.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, INNER_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.hd, bias=False)
        else:
            self.q_proj = nn.Linear(H, nh * self.hd, bias=False)
        self.kv_a_proj = nn.Linear(H, self.r + self.hd, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, INNER_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.r, 2 * self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(nh * self.hd, H, bias=False)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Normed latent c [b, t, r]; the last hd columns of kv_a_proj are discarded."""
        return self.kv_a_layernorm(self.kv_a_proj(x)[..., : self.r])

    def forward(self, x, rope_q, rope_k, allowed, c_past: Optional[torch.Tensor]):
        """x [b,t,H]; rope_q/rope_k (cos, sin) for queries/keys; allowed [b,1,t,T] bool.

        Returns (output [b,t,H], c_all [b,T,r]).
        """
        b, t, _ = x.shape
        if self.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        c = self.latent(x)
        c_all = c if c_past is None else torch.cat([c_past, c], dim=1)
        T = c_all.shape[1]
        kv = self.kv_b_proj(c_all)
        k = kv[..., : self.nkv * self.hd].view(b, T, self.nkv, self.hd).transpose(1, 2)
        v = kv[..., self.nkv * self.hd:].view(b, T, self.nkv, self.hd).transpose(1, 2)
        q = apply_rotary(q, *rope_q)
        k = apply_rotary(k, *rope_k)
        g = self.nh // self.nkv
        if g > 1:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.hd))
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        has_key = allowed.any(dim=-1, keepdim=True)
        if self.ring and T > self.chunk:
            # the original's ring path: exp-sum accumulated per chunk, divided by sum + 1e-5
            m = scores.amax(dim=-1, keepdim=True)
            p = torch.exp(scores - m).masked_fill(~allowed, 0.0)
            probs = p / (p.sum(dim=-1, keepdim=True) + RING_EPS)
        else:
            probs = torch.softmax(scores, dim=-1)
        probs = torch.where(has_key, probs, torch.zeros_like(probs))  # no key -> output 0
        o = torch.matmul(probs.to(v.dtype), v)
        o = o.transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.o_proj(o), c_all


class Router(nn.Module):
    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.input_norm = RMSNorm(hidden, INNER_NORM_EPS)
        self.gate = nn.Linear(hidden, n_experts, bias=False)

    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,H] -> (weights [N,k] float32, expert ids [N,k])."""
        probs = torch.softmax(self.gate(self.input_norm(x)).float(), dim=-1)
        # stable descending sort: ties go to the lower expert index
        top_p, top_i = torch.sort(probs, dim=-1, descending=True, stable=True)
        top_p, top_i = top_p[:, :k], top_i[:, :k]
        top_p = top_p / (top_p.sum(dim=-1, keepdim=True) + TOPK_RENORM_EPS)
        return top_p, top_i


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an always-on shared expert (SPEC section 6)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        H, Ie = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.k = cfg["num_experts_per_tok"]
        self.router = Router(H, cfg["num_experts"])
        self.experts = nn.ModuleList(SwiGLU(H, Ie) for _ in range(cfg["num_experts"]))
        self.shared_expert = SwiGLU(H, Ie)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top_p, top_i = self.router(x, self.k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_i == e)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * top_p[tok, slot, None].to(x.dtype)
            out = out.index_add(0, tok, y)
        out = out + self.shared_expert(x)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], moe: bool):
        super().__init__()
        H = cfg["hidden_size"]
        self.input_layernorm = RMSNorm(H, cfg["rms_norm_eps"])
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(H, cfg["rms_norm_eps"])
        self.mlp = MoE(cfg) if moe else SwiGLU(H, cfg["intermediate_size"])

    def forward(self, h, rope_q, rope_k, allowed, c_past):
        a, c_all = self.self_attn(self.input_layernorm(h), rope_q, rope_k, allowed, c_past)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, c_all


class _Backbone(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        f = cfg["moe_layer_freq"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg["use_moe"] and i % f == f - 1)
            for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


# --------------------------------------------------------------------------- model


class TorchMoELlama(nn.Module):
    """The Xoron MoE-LLaMA causal LM; parameter names match SPEC section 2."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.config = resolve_config(cfg)
        c = self.config
        self.model = _Backbone(c)
        if not c["tie_word_embeddings"]:
            self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.rotary = Rotary(c["hidden_size"] // c["num_attention_heads"], c["rope_theta"],
                             c["max_position_embeddings"])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear and embedding weights ~ N(0, 0.02), norm weights = 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def lm_head_weight(self) -> torch.Tensor:
        if self.config["tie_word_embeddings"]:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @staticmethod
    def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
        pos = mask.long().cumsum(-1) - 1
        return pos.masked_fill(mask == 0, 1)  # SPEC section 7: pads get position 1

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past: Optional[LatentCache] = None,
                use_cache: bool = False):
        """Returns (loss or None, logits [b, t, V] float32, cache or None).

        attention_mask may cover the current tokens only or the past plus current tokens;
        keys whose mask is 0 are never attended to.  Without position_ids, positions come
        from the mask (cumsum - 1, pads 1) or continue from the cache length.
        """
        b, t = input_ids.shape
        dev = input_ids.device
        P = 0 if past is None else past.length

        full_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
            if attention_mask.shape[1] == t and P > 0:
                prev = past.mask if past.mask is not None else torch.ones(
                    b, P, dtype=attention_mask.dtype, device=dev)
                full_mask = torch.cat([prev.to(attention_mask.dtype), attention_mask], dim=1)
            else:
                full_mask = attention_mask
            if full_mask.shape[1] != P + t:
                raise ValueError("attention_mask must cover the current or all tokens")
        elif past is not None and past.mask is not None:
            full_mask = torch.cat([past.mask, torch.ones(b, t, dtype=past.mask.dtype,
                                                         device=dev)], dim=1)

        if position_ids is None:
            if full_mask is not None:
                position_ids = self._positions_from_mask(full_mask)[:, P:]
            else:
                position_ids = torch.arange(P, P + t, device=dev).expand(b, t)
        position_ids = position_ids.to(dev).long().expand(b, t)
        key_pos = position_ids if past is None else torch.cat([past.positions, position_ids], 1)

        T = P + t
        qi = torch.arange(P, T, device=dev)[:, None]
        kj = torch.arange(T, device=dev)[None, :]
        allowed = (kj <= qi)[None, None].expand(b, 1, t, T)
        if full_mask is not None:
            allowed = allowed & full_mask.bool()[:, None, None, :]

        rope_q = self.rotary(position_ids)
        rope_k = rope_q if past is None else self.rotary(key_pos)
        h = self.model.embed_tokens(input_ids)
        latents = []
        for i, layer in enumerate(self.model.layers):
            h, c_all = layer(h, rope_q, rope_k, allowed,
                             None if past is None else past.latents[i])
            latents.append(c_all)
        h = self.model.norm(h)
        logits = F.linear(h, self.lm_head_weight()).float()

        loss = None
        if labels is not None:
            loss = self.loss(logits, labels.to(dev))
        cache = None
        if use_cache:
            cache = LatentCache(tuple(latents), key_pos,
                                None if full_mask is None else full_mask)
        return loss, logits, cache

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Shifted CE, -100 ignored, mean, clamped to [0, 100]; 0 when nothing is valid."""
        lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        lb = labels[:, 1:].reshape(-1)
        if not bool((lb != -100).any()):
            return lg.sum() * 0.0
        return F.cross_entropy(lg, lb, ignore_index=-100).clamp(0.0, 100.0)

    # ------------------------------------------------------------------ generation

    @staticmethod
    def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
        """SPEC section 7 filtering of [b, V] logits; removed entries become -inf."""
        logits = logits.float()
        if temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if temperature != 1.0:
            logits = logits / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sl, si = torch.sort(logits, dim=-1, descending=True, stable=True)
            cum = torch.softmax(sl, dim=-1).cumsum(-1)
            remove = torch.zeros_like(cum, dtype=torch.bool)
            remove[..., 1:] = cum[..., :-1] > top_p
            logits = logits.masked_fill(remove.scatter(-1, si, remove), float("-inf"))
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 seed: Optional[int] = None) -> torch.Tensor:
        """Cached decoding: one prefill, then one token per step. Returns [b, t + n].

        eos/pad default to the config's.  Finished rows are padded with pad (or eos).
        `seed` makes sampling reproducible.
        """
        eos = self.config["eos_token_id"] if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else self.config["pad_token_id"]
        pad = eos if pad is None else pad
        dev = input_ids.device
        gen = None
        if do_sample and seed is not None:
            gen = torch.Generator(device=dev).manual_seed(seed)
        out = input_ids
        b = input_ids.shape[0]
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        _, logits, past = self(input_ids, attention_mask=attention_mask, use_cache=True)
        for step in range(max_new_tokens):
            nl = logits[:, -1]
            if do_sample:
                probs = torch.softmax(self.filter_logits(nl, temperature, top_k, top_p), -1)
                tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:  # argmax is unchanged by a positive temperature
                tok = nl.argmax(dim=-1)
            if eos is not None:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
                finished = finished | (tok == eos)
            out = torch.cat([out, tok[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
                break
            _, logits, past = self(tok[:, None], past=past, use_cache=True)
        return out

    # ------------------------------------------------------------------ loading

    @staticmethod
    def from_pretrained(directory: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **overrides: Any) -> "TorchMoELlama":
        """Load config.json + model.safetensors (SPEC names, or Xoron-Dev `llm.` prefix)."""
        with open(os.path.join(directory, "config.json")) as f:
            cfg = resolve_config(json.load(f), **overrides)
        tensors = load_safetensors_numpy(os.path.join(directory, "model.safetensors"))
        if "model.embed_tokens.weight" not in tensors and "llm.model.embed_tokens.weight" in tensors:
            tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("llm.")}
        with torch.device("meta"):
            model = TorchMoELlama(cfg)
        state = {}
        for name, p in model.state_dict().items():
            if name not in tensors:
                raise KeyError(f"checkpoint is missing tensor {name}")
            arr = tensors[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"tensor {name}: shape {tuple(arr.shape)}, expected {tuple(p.shape)}")
            state[name] = torch.from_numpy(arr).to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load_safetensors_numpy(path: str) -> dict[str, np.ndarray]:
    """Read a safetensors file with numpy only: F32/F16/BF16/F64 -> float32 arrays."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8:8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt, (s, e) = info["dtype"], info["data_offsets"]
            shape = tuple(info["shape"])
            raw = mm[base + s:base + e]
            if dt == "BF16":
                arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            elif dt in _NP_DTYPES:
                arr = np.frombuffer(raw, dtype=np.dtype(_NP_DTYPES[dt]).newbyteorder("<"))
            else:
                raise ValueError(f"tensor {name}: unsupported dtype {dt}")
            out[name] = arr.reshape(shape).astype(np.float32)
    return out
