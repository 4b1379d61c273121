"""The decode attention kernel over a 16-bit latent cache (csrc/backends/cuda/decode_attention.cu,
option cuda_attention="latent_decode"): one new token per row, K expanded on the tensor cores
inside the kernel, V absorbed, keys in blocks of 128 split over several blocks of the grid and
merged.

Shapes that take it: head_dim 64, num_heads == num_kv_heads, kv_lora_rank a multiple of 64 up
to 512, bfloat16 / float16 models with the latent cache. Every test compares single-token steps
through the cache with the same weights under the default options (the row-wise kernel over K
and V expanded into scratch; the prefill is the same) and with the float64 oracle (on the
weights as the model stores them), at context lengths on both sides of the 128-key blocks, rows
of different lengths (left padding), several key blocks per split, and in the replayed CUDA
graphs of a decode session. The weights are drawn with a milder scale-up than test_cuda's, so
that attention is peaked enough to show a wrong key or rotation, yet no near-tie of scores
flips under 16-bit rounding of the cached latents. Marked `cuda`; skips cleanly without a GPU.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import reference_impl as R  # noqa: E402
import xoron  # noqa: E402
from test_cuda import GPU_OK, GPU_WHY, TOL_HALF, _config, ids_for, rel_err, rounded  # noqa: E402

needs_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
pytestmark = pytest.mark.cuda

LATENT = {"cuda_attention": "latent_decode"}
MILD = {"q_proj": 3.0, "kv_b_proj": 3.0, "o_proj": 2.0, "gate_proj": 3.0, "up_proj": 3.0, "down_proj": 2.0}


def build(over, seed, dtype, options=None):
    config = _config(over)
    cfg = R.RefConfig.from_dict(config)
    w = R.random_weights(cfg, seed)
    for name, a in w.items():
        kind = name.rsplit(".", 2)[-2]
        if kind in MILD:
            w[name] = (a * np.float32(MILD[kind])).astype(np.float32)
    m = xoron.MoELlamaForCausalLM(config, dtype=dtype, device="cuda", seed=0, options=options)
    m.load_state_dict(w, strict=True)
    return m, cfg, w

# name -> (overrides, batch, prompt length, single-token steps, left pads per row)
SHAPES = {
    # 4 heads (one head group), rank 128: the steps cross the 256-key block boundary
    "hd64_rank128": ({"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 128},
                     3, 254, 4, [0, 5, 130]),
    # 6 heads: the second head group holds 2; the full rank 512; across 128 keys
    "six_heads_rank512": ({"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 6,
                           "kv_lora_rank": 512}, 2, 126, 4, [0, 3]),
    # a short context: one partly filled key block
    "short_context": ({"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64},
                      2, 5, 3, [0, 2]),
}


def _steps(m, ids, mask, prompt):
    """Logits of the single-token steps after `prompt` tokens went through the cache at once."""
    out = m(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache, logits = out.past_key_values, []
    for i in range(prompt, ids.shape[1]):
        out = m(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(np.asarray(out.logits)[:, -1])
    return np.stack(logits, axis=1)


def _left_mask(b, t, pads):
    mask = np.ones((b, t), np.int64)
    for r, n in enumerate(pads):
        mask[r, :n] = 0
    return mask


def _check_steps(over, b, prompt, steps, pads, dtype, seed, oracle_rows=None):
    m, cfg, w = build(over, seed=seed, dtype=dtype, options=LATENT)
    rows_model, _, _ = build(over, seed=seed, dtype=dtype)
    t = prompt + steps
    ids = ids_for(cfg, b, t, seed=seed + 1)
    mask = _left_mask(b, t, pads)
    got = _steps(m, ids, mask, prompt)
    want_rows = _steps(rows_model, ids, mask, prompt)
    err_rows = rel_err(got, want_rows)
    assert err_rows <= TOL_HALF, f"latent decode kernel vs the default path: {err_rows:.2e}"
    sel = list(range(b)) if oracle_rows is None else oracle_rows
    ref, _ = R.forward(cfg, rounded(w, dtype), ids[sel], attention_mask=mask[sel])
    err_ref = rel_err(got[sel], ref[:, prompt:])
    assert err_ref <= TOL_HALF, f"latent decode kernel vs the float64 oracle: {err_ref:.2e} (vs the default path: {err_rows:.2e})"


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_latent_decode_steps(name, dtype):
    over, b, prompt, steps, pads = SHAPES[name]
    _check_steps(over, b, prompt, steps, pads, dtype, seed=31 + list(SHAPES).index(name))


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_latent_decode_several_blocks_per_split(dtype):
    """17 rows x 16 heads: few key splits, so each block of the grid walks several key blocks of
    1100+ keys (the online softmax carried across blocks, the next block's loads in flight)."""
    over = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
            "intermediate_size": 64}
    pads = [0] * 17
    pads[3], pads[9] = 200, 601
    _check_steps(over, 17, 1100, 2, pads, dtype, seed=41, oracle_rows=[0, 3, 9])


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_latent_decode_in_graph_replay(dtype):
    """generate() runs its steps as replayed CUDA graphs (past read from the device): every token
    it picks is the oracle's best up to the 16-bit tolerance, and the default path picks the
    same ones while the oracle's margin is clear."""
    over, b, prompt, _, pads = SHAPES["hd64_rank128"]
    m, cfg, w = build(over, seed=51, dtype=dtype, options=LATENT)
    rows_model, _, _ = build(over, seed=51, dtype=dtype)
    ids = ids_for(cfg, b, prompt - 4, seed=52)  # 250 + 20 new tokens: recorded bounds 256, 320
    mask = _left_mask(b, prompt - 4, pads)
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None)
    seq = np.asarray(m.generate(ids, **kw))
    seq_rows = np.asarray(rows_model.generate(ids, **kw))
    t0 = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((b, seq.shape[1] - t0), np.int64)], axis=1)
    ref, _ = R.forward(cfg, rounded(w, dtype), seq, attention_mask=full_mask)
    scale = float(np.max(np.abs(ref[:, t0 - 1:-1])))
    for r in range(b):
        agree = True
        for i in range(t0, seq.shape[1]):
            z = ref[r, i - 1]
            top2 = np.sort(z)[-2:]
            assert z[seq[r, i]] >= top2[1] - TOL_HALF * scale, (r, i)
            if agree and top2[1] - top2[0] > 2 * TOL_HALF * scale:
                assert seq_rows[r, i] == seq[r, i], (r, i)
            agree = agree and seq_rows[r, i] == seq[r, i]  # after a (near-tie) divergence the contexts differ
