#!/usr/bin/env python3
"""Train the small demo checkpoint shipped in ``xoron/demo`` with the PyTorch reference model.

The model is exactly the Xoron MoE-LLaMA architecture of SPEC.md (``xoron/torch_reference.py``):
MLA attention with a latent (kv_lora_rank) narrower than the hidden size, the (reversed) YaRN
rotary embedding, MoE with a shared expert on every second layer (top-2 of 4 experts) and tied
embeddings, over the 4096-token byte-level BPE vocabulary of ``xoron/demo/tokenizer.json``.

Training: random windows of ``--seq-len`` tokens from ``train_ids.npy``; AdamW with fp32 master
weights and bf16 autocast on CUDA (fp32 on CPU); linear warmup then cosine decay to 10 %; grad
clipping; residual dropout applied through forward hooks (training only; it adds no weights and
the saved model is the plain architecture). The held-out loss over all non-overlapping windows of
``heldout_ids.npy`` is evaluated every ``--eval-every`` steps and at the end; the checkpoint with
the lowest held-out loss is the one saved (with a cosine schedule that is normally the last).

The run is bounded by ``--epochs`` (tokens seen / training tokens) and by ``--time-limit``
seconds of wall time: after ``--calib-steps`` steps the step time is measured and, if the epoch
budget would not fit, the number of steps (and with it the cosine schedule) is shortened so
that training, evaluation and saving end inside the limit. ``--steps N`` fixes the step count.

Output (``--out``): ``config.json`` (flat HF style with nested ``moe_config``), the bf16 weights
as ``model.safetensors`` or, above ``--shard-bytes``, as ``model-0000k-of-0000n.safetensors``
shards plus ``model.safetensors.index.json``, and ``train_log.json`` (the measured numbers).
Only torch and numpy are needed (safetensors is written with numpy/struct).

    python tools/train_demo.py --data data --out /tmp/demo                 # H200: ~2 min
    python tools/train_demo.py --steps 3 --device cpu --out /tmp/smoke     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a source checkout without installing
from xoron.torch_reference import TorchMoELlama  # noqa: E402

# The demo model (SPEC section 1 field names). max_position_embeddings 4096 gives the YaRN
# factor s = 4096 / 8192 = 0.5: mscale = 1 and the low (fast) dims blend towards 2x frequency.
DEMO_CONFIG = {
    "architectures": ["MoELlamaForCausalLM"],
    "model_type": "xoron_moe_llama",
    "vocab_size": 4096,
    "hidden_size": 320,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 5,
    "num_key_value_heads": 5,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_ring_attention": True,
    "ring_attention_chunk_size": 4096,
    "kv_lora_rank": 128,
    "q_lora_rank": 0,
    "bos_token_id": None,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
    "moe_config": {
        "use_moe": True,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 2,
        "intermediate_size": 512,
    },
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- safetensors


def _bf16_bytes(t: torch.Tensor) -> bytes:
    """Round-to-nearest-even bf16 bytes (little endian) of a float tensor."""
    u16 = t.detach().to("cpu", torch.float32).contiguous().to(torch.bfloat16).view(torch.int16)
    return u16.numpy().astype("<i2").tobytes()


def _write_safetensors(path: str, items: list[tuple[str, list[int], bytes]]) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, data in items:
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, data in items:
            f.write(data)
    return 8 + len(raw) + off


def save_checkpoint(state: dict[str, torch.Tensor], config: dict, out: str,
                    shard_bytes: int) -> list[tuple[str, int]]:
    """config.json + bf16 safetensors (sharded when the tensors exceed shard_bytes)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    items = [(n, list(t.shape), _bf16_bytes(t)) for n, t in sorted(state.items())]
    total = sum(len(d) for _, _, d in items)
    shards: list[list] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + len(it[2]) + 16384 > shard_bytes:  # 16 KiB header headroom
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += len(it[2])
    written = []
    for stale in os.listdir(out):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out, stale))
    if len(shards) == 1:
        written.append(("model.safetensors",
                        _write_safetensors(os.path.join(out, "model.safetensors"), shards[0])))
    else:
        weight_map = {}
        for k, sh in enumerate(shards):
            fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            written.append((fn, _write_safetensors(os.path.join(out, fn), sh)))
            weight_map.update({n: fn for n, _, _ in sh})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    return written


# --------------------------------------------------------------------------- training


def add_residual_dropout(model: TorchMoELlama, p: float) -> None:
    """Dropout on each attention / MLP output before it joins the residual stream (training
    mode only). Hooks, so the module and its state_dict stay the plain architecture."""
    if p <= 0:
        return

    def hook(mod, inp, out):
        if not mod.training:
            return out
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, True),) + tuple(out[1:])
        return F.dropout(out, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * c["hidden_size"] * c["moe_intermediate_size"]
    n_moe = sum(1 for i in range(c["num_hidden_layers"])
                if c["use_moe"] and i % c["moe_layer_freq"] == c["moe_layer_freq"] - 1)
    inactive = n_moe * (c["num_experts"] - c["num_experts_per_tok"]) * per_expert
    emb = c["vocab_size"] * c["hidden_size"]
    return {"total": total, "active_per_token": total - inactive, "embedding": emb,
            "non_embedding": total - emb}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, amp: bool) -> float:
    """Mean next-token loss over all windows (each has seq_len - 1 predictions)."""
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(x, labels=x)
        tot += float(loss) * x.shape[0]
        n += x.shape[0]
    model.train()
    return tot / n


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "data"),
                    help="folder with train_ids.npy and heldout_ids.npy")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "demo_model"),
                    help="output folder (copy its config.json and *.safetensors* to xoron/demo)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=0, help="default 32 on CUDA, 2 on CPU")
    ap.add_argument("--epochs", type=float, default=12.0, help="training tokens seen / train set size")
    ap.add_argument("--steps", type=int, default=0, help="fix the step count (overrides --epochs)")
    ap.add_argument("--time-limit", type=float, default=450.0, help="wall seconds for the whole run")
    ap.add_argument("--calib-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--shard-bytes", type=int, default=15_000_000)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    t_start = time.time()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    amp = dev.type == "cuda"
    if not args.batch_size:
        args.batch_size = 32 if amp else 2
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log(f"python {platform.python_version()} torch {torch.__version__} device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if amp else ""))

    train_np = np.load(os.path.join(args.data, "train_ids.npy")).astype(np.int64)
    held_np = np.load(os.path.join(args.data, "heldout_ids.npy")).astype(np.int64)
    train = torch.from_numpy(train_np).to(dev)
    T = args.seq_len
    n_held = len(held_np) // T
    held = torch.from_numpy(held_np[: n_held * T].reshape(n_held, T)).to(dev)
    if not amp and args.steps and args.steps <= 10:
        held = held[:4]  # CPU smoke test: a few windows are enough
    log(f"train tokens {len(train_np):,}  held-out tokens {len(held_np):,} "
        f"({held.shape[0]} windows of {T})")

    model = TorchMoELlama(DEMO_CONFIG).to(dev)
    assert model.config["kv_lora_rank"] < model.config["hidden_size"]
    params = count_params(model)
    log(f"parameters: {params}")
    add_residual_dropout(model, args.dropout)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp)

    tokens_per_step = args.batch_size * T
    if args.steps:
        total_steps = args.steps
    else:
        total_steps = max(1, int(round(args.epochs * len(train_np) / tokens_per_step)))
    log(f"planned steps {total_steps} ({tokens_per_step} tokens/step, "
        f"{total_steps * tokens_per_step / len(train_np):.2f} epochs)")

    gen = torch.Generator().manual_seed(args.seed)
    hi = len(train_np) - T
    arange_T = torch.arange(T, device=dev)
    history: list[dict] = []
    best = (float("inf"), -1, None)
    run_loss = torch.zeros((), device=dev)
    run_n = 0
    step = 0
    t_train = time.time()
    eval_cost = 0.0
    last_train = float("nan")

    def do_eval(s: int) -> float:
        nonlocal best, eval_cost
        t0 = time.time()
        hl = evaluate(model, held, args.eval_batch, amp)
        eval_cost = max(eval_cost, time.time() - t0)
        history.append({"step": s, "tokens": s * tokens_per_step, "heldout_loss": hl,
                        "train_loss": last_train, "time_s": round(time.time() - t_start, 1)})
        if hl < best[0]:
            best = (hl, s, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        log(f"eval step {s:5d}  heldout loss {hl:.4f}  ppl {math.exp(hl):8.2f}  "
            f"(best {best[0]:.4f} @ {best[1]})  t={time.time() - t_start:.0f}s")
        return hl

    while step < total_steps:
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, hi + 1, (args.batch_size,), generator=gen).to(dev)
        x = train[starts[:, None] + arange_T]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        run_loss += loss.detach()
        run_n += 1
        step += 1

        if step == args.calib_steps and not args.steps:
            if amp:
                torch.cuda.synchronize()
            per_step = (time.time() - t_train) / step
            # leave room for the evaluations still to come and the final eval + save
            n_evals = total_steps // args.eval_every + 2
            remaining = args.time_limit - (time.time() - t_start) - 20.0 - n_evals * max(eval_cost, 2.0)
            fit = step + int(0.92 * remaining / per_step)
            log(f"calibration: {per_step * 1e3:.1f} ms/step; {fit} steps fit in the time limit")
            if fit < total_steps:
                total_steps = max(fit, step + 1)
                log(f"shortened to {total_steps} steps "
                    f"({total_steps * tokens_per_step / len(train_np):.2f} epochs)")

        if step % args.log_every == 0 or step == total_steps:
            last_train = float(run_loss) / run_n
            run_loss.zero_()
            run_n = 0
            log(f"step {step:5d}/{total_steps}  loss {last_train:.4f}  lr {lr:.2e}  "
                f"gnorm {float(gnorm):.3f}  t={time.time() - t_start:.0f}s")
        if step % args.eval_every == 0 and step < total_steps:
            do_eval(step)
        if time.time() - t_start > args.time_limit - 15.0 - eval_cost and step < total_steps:
            log(f"time limit reached at step {step}: stopping")
            break

    if run_n:
        last_train = float(run_loss) / run_n
    if amp:
        torch.cuda.synchronize()
    train_wall = time.time() - t_train
    final_held = do_eval(step)
    # train loss of the final weights, measured without dropout on 64 fixed training windows
    g2 = torch.Generator().manual_seed(args.seed + 1)
    tw = torch.randint(0, hi + 1, (min(64, max(4, held.shape[0])),), generator=g2).to(dev)
    train_eval = evaluate(model, train[tw[:, None] + arange_T], args.eval_batch, amp)

    hl_best, step_best, state = best
    config = dict(DEMO_CONFIG)
    written = save_checkpoint(state, config, args.out, args.shard_bytes)
    summary = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "args": vars(args),
        "device": torch.cuda.get_device_name(dev) if amp else platform.processor() or "cpu",
        "torch": torch.__version__,
        "parameters": params,
        "steps": step,
        "tokens_per_step": tokens_per_step,
        "tokens_seen": step * tokens_per_step,
        "epochs": step * tokens_per_step / len(train_np),
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "final_train_loss_running": last_train,
        "final_train_loss_eval": train_eval,
        "final_heldout_loss": final_held,
        "saved_step": step_best,
        "saved_heldout_loss": hl_best,
        "files": written,
        "history": history,
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"saved step {step_best} (heldout {hl_best:.4f}, ppl {math.exp(hl_best):.2f}) to {args.out}: "
        + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in written))
    log(f"done: {step} steps, {step * tokens_per_step:,} tokens, train {train_wall:.0f}s, "
        f"total {time.time() - t_start:.0f}s; final train loss {train_eval:.4f}, "
        f"heldout {final_held:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
