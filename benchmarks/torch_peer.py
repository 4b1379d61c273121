"""The compiled PyTorch peer: the strongest plain-PyTorch version of the Xoron MoE-LLaMA a
user would write for inference, the yardstick of benchmarks/bench_gpu.py (issue 12).

- A static K/V cache in the model's dtype, [layers, batch, nkv, slots, hd] for K and for V,
  allocated once per (batch, slots) and marked static so CUDA graphs may write into it.
- The decode step under `torch.compile(mode="reduce-overhead", fullgraph=True)`: one CUDA
  graph per step (static shapes: one per cache size); the step position is a tensor, so
  every step replays the same graph; weights and cache are static addresses.
  Attention is `scaled_dot_product_attention` over the whole static cache with a mask of
  the filled slots (the usual static-cache formulation).
- MoE without a host loop: with fewer routed slots (tokens x top-k) than experts, the chosen
  experts' weights are gathered and applied by batched products; otherwise every expert
  runs on every token and the routing weights (zero for experts not chosen) mask them.
- Prefill: eager, flash `scaled_dot_product_attention(is_causal=True)`, K/V written into the
  cache; the routed experts run one product per expert on the tokens sorted to it (E host
  iterations per layer, nothing per token), and the logits of the last position only.

It loads the same weights as xoron (`TorchPeer.from_xoron(model)`) and computes SPEC
sections 3-6 with float32 norm statistics, rotary and softmax. Like xoron it keeps the residual
stream and the router in float32 (the products take 16-bit inputs): in bfloat16 throughout, its
logits are 3e-2 (batch 1) to 1e-1 (batch 8) away from float32 ones, beyond SPEC section 8. The ring formulation's
denominator epsilon (SPEC 4.4) is not reproduced, which the SPEC allows.

    python benchmarks/torch_peer.py --selftest    # CPU, tiny config, no compile
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

INNER_NORM_EPS = 1e-6  # kv_a_layernorm, q_a_layernorm, router input_norm (SPEC section 3)
TOPK_RENORM_EPS = 1e-5
ROPE_L0, ROPE_BETA_FAST, ROPE_BETA_SLOW = 8192, 32.0, 1.0


def yarn_inv_freq(hd: int, base: float, max_pos: int) -> tuple[torch.Tensor, float]:
    """SPEC section 5 (the trained, reversed-direction YaRN), in float32."""
    f32 = np.float32
    s = max_pos / ROPE_L0
    # base ** (2i / d) rounded once to float32, as the engine's powf gives it (numpy's float32
    # power can be an ulp off, which moves the angles by ~1e-3 rad at positions near 1e5)
    freq = np.power(np.float64(f32(base)), (np.arange(0, hd, 2, dtype=f32) / f32(hd)).astype(np.float64)).astype(f32)
    extra, inter = (f32(1) / freq).astype(f32), (f32(1) / (f32(s) * freq)).astype(f32)
    low = max(math.floor(hd * math.log(ROPE_L0 / (ROPE_BETA_FAST * 2 * math.pi)) / (2 * math.log(base))), 0)
    high = min(math.ceil(hd * math.log(ROPE_L0 / (ROPE_BETA_SLOW * 2 * math.pi)) / (2 * math.log(base))), hd - 1)
    u = np.clip((np.arange(hd // 2, dtype=f32) - f32(low)) / f32(max(high - low, 1)), 0, 1).astype(f32)
    inv = (inter * (f32(1) - u) + extra * u).astype(f32)
    return torch.from_numpy(inv), 1.0 if s <= 1 else 0.1 * math.log(s) + 1.0


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, t, hd] * cos + rotate_half(x) * sin; cos/sin [b, 1, t, hd] float32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    return (x32 * cos + torch.cat([-x32[..., half:], x32[..., :half]], -1) * sin).to(x.dtype)


class StaticKVCache:
    """K and V per layer, [b, nkv, slots, hd] each, in the model's dtype; `length` tokens filled
    (all rows). One tensor per layer, as transformers' StaticCache keeps them: the compiled
    step's in-place writes then go to whole graph inputs, not to slices of one shared tensor."""

    def __init__(self, layers: int, batch: int, nkv: int, slots: int, hd: int, dtype, device):
        self.k = [torch.zeros(batch, nkv, slots, hd, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.length = 0
        if self.k[0].is_cuda:  # the graph writes the step's keys in place
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]


class TorchPeer:
    """Weights as plain tensors (stacked per layer where that serves the compiled step)."""

    def __init__(self, cfg: dict[str, Any], sd: dict[str, torch.Tensor], dtype, device):
        self.cfg = cfg
        self.dtype, self.device = dtype, torch.device(device)
        H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        self.nh, self.nkv, self.hd, self.r = nh, cfg["num_key_value_heads"], H // nh, cfg["kv_lora_rank"]
        self.k_top, self.eps = cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
        inv, self.mscale = yarn_inv_freq(self.hd, cfg["rope_theta"], cfg["max_position_embeddings"])
        self.inv_freq = inv.to(self.device)

        def w(name):
            return sd[name].to(device=self.device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = self.embed if cfg["tie_word_embeddings"] else w("lm_head.weight")
        self.final_norm = w("model.norm.weight")
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            L = {"in_norm": w(p + "input_layernorm.weight"), "post_norm": w(p + "post_attention_layernorm.weight"),
                 "kv_a": w(a + "kv_a_proj.weight")[: self.r].contiguous(),  # the last hd rows feed nothing
                 "kv_a_norm": w(a + "kv_a_layernorm.weight"), "kv_b": w(a + "kv_b_proj.weight"),
                 "o": w(a + "o_proj.weight")}
            if cfg["q_lora_rank"] > 0:
                L.update(q_a=w(a + "q_a_proj.weight"), q_a_norm=w(a + "q_a_layernorm.weight"), q_b=w(a + "q_b_proj.weight"))
            else:
                L["q"] = w(a + "q_proj.weight")
            f = cfg["moe_layer_freq"]
            L["moe"] = cfg["use_moe"] and i % f == f - 1
            m = p + "mlp."
            if L["moe"]:
                E = cfg["num_experts"]
                L["router_norm"] = w(m + "router.input_norm.weight")
                L["router"] = sd[m + "router.gate.weight"].to(device=self.device, dtype=torch.float32)
                L["gate_up"] = torch.stack([torch.cat([w(f"{m}experts.{e}.gate_proj.weight"),
                                                       w(f"{m}experts.{e}.up_proj.weight")]) for e in range(E)])
                L["down"] = torch.stack([w(f"{m}experts.{e}.down_proj.weight") for e in range(E)])
                L["s_gate_up"] = torch.cat([w(m + "shared_expert.gate_proj.weight"), w(m + "shared_expert.up_proj.weight")])
                L["s_down"] = w(m + "shared_expert.down_proj.weight")
            else:
                L["s_gate_up"] = torch.cat([w(m + "gate_proj.weight"), w(m + "up_proj.weight")])
                L["s_down"] = w(m + "down_proj.weight")
            self.layers.append(L)
        self._step = self._decode_step

    @classmethod
    def from_xoron(cls, model, dtype=torch.bfloat16, device="cuda") -> "TorchPeer":
        """The same weights and config as a xoron.MoELlamaForCausalLM."""
        c = model.config
        moe = dict(c.moe_config or {})
        cfg = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps", "rope_theta", "tie_word_embeddings", "kv_lora_rank",
                                          "q_lora_rank")}
        cfg.update(use_moe=bool(moe.get("use_moe", False)), num_experts=int(moe.get("num_experts", 8)),
                   num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)),
                   moe_layer_freq=int(moe.get("moe_layer_freq", 2)))
        # the torch module's state_dict holds tensors (views of the engine), the numpy class's arrays
        sd = {k: (v.detach().float().cpu().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(v))
              for k, v in model.state_dict().items()}
        return cls(cfg, sd, dtype, device)

    def compile(self) -> None:
        """The decode step as one CUDA graph per step (needs a GPU). The weights are marked static
        as an nn.Module's parameters would be: the replayed graph reads them where they are."""
        for t in self._weights():
            torch._dynamo.mark_static_address(t)
        self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True)

    def _weights(self) -> list[torch.Tensor]:
        ts = [self.embed, self.lm_head, self.final_norm, self.inv_freq]
        for L in self.layers:
            ts += [v for v in L.values() if isinstance(v, torch.Tensor)]
        return ts

    def new_cache(self, batch: int, slots: int) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, self.nkv, slots, self.hd, self.dtype, self.device)

    # ---------------------------------------------------------------- pieces

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [t] -> cos, sin [1, 1, t, hd] float32, mscale included."""
        theta = pos.float()[:, None] * self.inv_freq
        emb = torch.cat([theta, theta], -1)[None, None]
        return emb.cos() * self.mscale, emb.sin() * self.mscale

    def _qkv(self, L, x, cos, sin):
        """x [b, t, H] -> q [b, nh, t, hd], k, v [b, nkv, t, hd]; q and k rotated."""
        b, t, _ = x.shape
        q = x @ L["q"].T if "q" in L else rms_norm(x @ L["q_a"].T, L["q_a_norm"], INNER_NORM_EPS) @ L["q_b"].T
        c = rms_norm(x @ L["kv_a"].T, L["kv_a_norm"], INNER_NORM_EPS)
        kv = c @ L["kv_b"].T
        W = self.nkv * self.hd
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        k = kv[..., :W].view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = kv[..., W:].view(b, t, self.nkv, self.hd).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _expand_heads(self, k, v):
        g = self.nh // self.nkv
        return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

    def _norm(self, h, w):
        """RMSNorm of the float32 residual stream, as the products' input dtype"""
        return rms_norm(h, w, self.eps).to(self.dtype)

    def _route(self, L, x):
        """x [n, H] -> top-k weights [n, k] (x's dtype) and expert ids [n, k] (SPEC section 6), in float32."""
        probs = torch.softmax(rms_norm(x.float(), L["router_norm"], INNER_NORM_EPS) @ L["router"].T, -1)
        top_p, top_i = torch.topk(probs, self.k_top, dim=-1)
        return (top_p / (top_p.sum(-1, keepdim=True) + TOPK_RENORM_EPS)).to(x.dtype), top_i

    @staticmethod
    def _swiglu(x, gate_up, down):
        g, u = (x @ gate_up.T).chunk(2, -1)
        return (F.silu(g) * u) @ down.T

    def _moe_no_loop(self, L, x):
        """x [n, H]: routed experts without a host loop (decode); float32 [n, H] out."""
        n, H = x.shape
        top_p, top_i = self._route(L, x)
        E = L["gate_up"].shape[0]
        if n * self.k_top < E:  # gather the chosen experts' weights
            flat = top_i.reshape(-1)
            xs = x.repeat_interleave(self.k_top, 0)[:, :, None]                   # [n*k, H, 1]
            g, u = torch.bmm(L["gate_up"][flat], xs)[..., 0].chunk(2, -1)
            y = torch.bmm(L["down"][flat], (F.silu(g) * u)[:, :, None])[..., 0]   # [n*k, H]
            routed = (y.view(n, self.k_top, H).float() * top_p[..., None].float()).sum(1)
        else:  # every expert on every token, masked by the routing weights
            dense = torch.zeros(n, E, dtype=torch.float32, device=x.device).scatter(1, top_i, top_p.float())
            g, u = torch.einsum("nh,eoh->eno", x, L["gate_up"]).chunk(2, -1)
            y = torch.einsum("eni,ehi->enh", F.silu(g) * u, L["down"])
            routed = torch.einsum("ne,enh->nh", dense, y.float())
        return routed + self._swiglu(x, L["s_gate_up"], L["s_down"]).float()

    def _moe_grouped(self, L, x):
        """x [n, H]: each expert once on the tokens routed to it (prefill); float32 [n, H] out."""
        top_p, top_i = self._route(L, x)
        out = self._swiglu(x, L["s_gate_up"], L["s_down"]).float()
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=L["gate_up"].shape[0]).tolist()
        tok = order // self.k_top
        weight = top_p.reshape(-1)[order]
        start = 0
        for e, cnt in enumerate(counts):
            if cnt:
                sl = slice(start, start + cnt)
                y = self._swiglu(x[tok[sl]], L["gate_up"][e], L["down"][e]).float() * weight[sl, None].float()
                out.index_add_(0, tok[sl], y)
            start += cnt
        return out

    # ---------------------------------------------------------------- passes

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor:
        """ids [b, t] at positions cache.length ..: fills the cache; float32 logits of the last
        position [b, V] (or of every position [b, t, V] with all_logits)."""
        b, t = ids.shape
        P = cache.length
        if P + t > cache.slots:
            raise ValueError(f"cache of {cache.slots} slots cannot take {P + t} tokens")
        cos, sin = self._rope(torch.arange(P, P + t, device=self.device))
        h = self.embed[ids].float()
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(L, self._norm(h, L["in_norm"]), cos, sin)
            cache.k[li][:, :, P:P + t] = k
            cache.v[li][:, :, P:P + t] = v
            if P == 0:
                kk, vv = self._expand_heads(k, v)
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
            else:
                kk, vv = self._expand_heads(cache.k[li][:, :, :P + t], cache.v[li][:, :, :P + t])
                allowed = torch.arange(P + t, device=self.device)[None, :] <= torch.arange(P, P + t, device=self.device)[:, None]
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
            h = h + o.transpose(1, 2).reshape(b, t, -1) @ L["o"].T
            x = self._norm(h, L["post_norm"])
            if L["moe"]:
                h = h + self._moe_grouped(L, x.reshape(b * t, -1)).view(b, t, -1)
            else:
                h = h + self._swiglu(x, L["s_gate_up"], L["s_down"])
        cache.length = P + t
        h = h if all_logits else h[:, -1]
        return (self._norm(h, self.final_norm) @ self.lm_head.T).float()

    def _decode_step(self, ids, pos, k_cache, v_cache):
        """ids [b, 1] at position pos ([1] int64, the same for every row): writes K/V at slot pos
        of each layer's cache tensor, attends to slots 0 .. pos. Returns float32 logits [b, V]."""
        b = ids.shape[0]
        cos, sin = self._rope(pos)
        visible = (torch.arange(k_cache[0].shape[2], device=ids.device) <= pos)[None, None, None, :]
        h = self.embed[ids].float()
        for li, L in enumerate(self.layers):
            q, k, v = self._qkv(L, self._norm(h, L["in_norm"]), cos, sin)
            k_cache[li].index_copy_(2, pos, k)
            v_cache[li].index_copy_(2, pos, v)
            kk, vv = self._expand_heads(k_cache[li], v_cache[li])
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=visible)
            h = h + o.transpose(1, 2).reshape(b, 1, -1) @ L["o"].T
            x = self._norm(h, L["post_norm"])
            if L["moe"]:
                h = h + self._moe_no_loop(L, x.view(b, -1)).view(b, 1, -1)
            else:
                h = h + self._swiglu(x, L["s_gate_up"], L["s_down"])
        return (self._norm(h[:, 0], self.final_norm) @ self.lm_head.T).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, cache: StaticKVCache, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token per row [b, 1] at the cache's next slot. Returns float32 logits [b, V]
        (under compile: the graph's output buffer, valid until the next step)."""
        if cache.length >= cache.slots:
            raise ValueError(f"cache of {cache.slots} slots is full")
        if pos is None:
            pos = torch.tensor([cache.length], device=self.device)
        out = self._step(ids, pos, cache.k, cache.v)
        cache.length += 1
        return out


# ---------------------------------------------------------------------- self-test

TINY = {
    "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "use_ring_attention": True, "ring_attention_chunk_size": 4096, "kv_lora_rank": 24, "q_lora_rank": 0,
    "moe_config": {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 2, "moe_layer_freq": 2,
                   "intermediate_size": 80},
}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def selftest(tol: float = 1e-4, batch: int = 3, prompt: int = 7, steps: int = 5, seed: int = 0) -> float:
    """Float32 on the CPU, no compile: the peer's prefill and decode logits against xoron's
    full forward over the same weights (with and without q_lora, both MoE paths: batch 1
    gathers experts, `batch` rows mask all). Returns the largest relative error."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xoron

    worst = 0.0
    for q_lora, b in ((0, batch), (16, 1)):
        cfg = dict(TINY, q_lora_rank=q_lora)
        model = xoron.MoELlamaForCausalLM(cfg, seed=seed)
        # larger weights than the 0.02 init, so that attention and routing are far from uniform
        model.load_state_dict({k: v * (1.0 if k.endswith("norm.weight") else 6.0) for k, v in model.state_dict().items()})
        peer = TorchPeer.from_xoron(model, dtype=torch.float32, device="cpu")
        ids = np.random.default_rng(seed + b).integers(0, cfg["vocab_size"], size=(b, prompt + steps))
        full = np.asarray(model(ids).logits)                                        # [b, t, V]
        cache = peer.new_cache(b, prompt + steps)
        t_ids = torch.from_numpy(ids)
        got = [peer.prefill(t_ids[:, :prompt], cache, all_logits=True).numpy()]
        for s in range(steps):
            got.append(peer.decode(t_ids[:, prompt + s:prompt + s + 1], cache).numpy()[:, None])
        err = rel_err(np.concatenate(got, 1), full)
        last = rel_err(peer.prefill(t_ids, peer.new_cache(b, prompt + steps)).numpy(), full[:, -1])
        print(f"q_lora_rank={q_lora} batch={b}: peer vs xoron logits, prefill+decode {err:.2e}, "
              f"prefill last position {last:.2e}")
        worst = max(worst, err, last)
    if not worst <= tol:
        raise AssertionError(f"peer logits differ from xoron's by {worst:.2e} (> {tol:.0e})")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selftest", action="store_true", help="check the peer against xoron on the CPU (tiny config)")
    args = ap.parse_args()
    if not args.selftest:
        ap.error("nothing to do: the peer is run by benchmarks/bench_gpu.py; pass --selftest to check it")
    torch.manual_seed(0)
    print(f"selftest passed: largest relative error {selftest():.2e}")


if __name__ == "__main__":
    main()
