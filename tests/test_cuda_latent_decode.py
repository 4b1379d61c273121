"""The decode attention kernel over a 16-bit latent cache (csrc/backends/cuda/decode_attention.cu,
taken by decode steps under the default cuda_attention="auto"): one new token per row, K
expanded on the tensor cores inside the kernel, V absorbed, keys in blocks of 128 split over
several blocks of the grid and merged, 4, 2 or 1 heads per block by the size of the grid.

Shapes that take it: head_dim 64, num_heads == num_kv_heads, kv_lora_rank a multiple of 64 up
to 512, bfloat16 / float16 models with the latent cache. Every test compares single-token steps
through the cache with the same weights under cuda_attention="rows" (K and V of every key
expanded into scratch, then the row-wise kernel: the decode path auto took before) and with the
float64 oracle (on the weights as the model stores them), at context lengths on both sides of
the 128-key blocks, rows of different lengths (left padding), several key blocks per split,
every heads-per-block choice, and in the replayed CUDA graphs of a decode session; the
backend's counts of decode-attention calls show which kernel each model ran. The weights are
drawn with a milder scale-up than test_cuda's, so that attention is peaked enough to show a
wrong key or rotation, yet no near-tie of scores flips under 16-bit rounding of the cached
latents. Marked `cuda`; skips cleanly without a GPU.
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

LATENT = {"cuda_attention": "latent_decode"}  # the kernel at every cached length
ROWS = {"cuda_attention": "rows"}  # the reference: K and V expanded into scratch
# auto takes the kernel from this many keys on (LD_AUTO_MIN_KEYS in decode_attention.cu)
AUTO_MIN_KEYS = 512
AUTO_MIN_ROWS = 64  # from this batch on, auto takes the kernel at every length
MILD = {"q_proj": 3.0, "kv_b_proj": 3.0, "o_proj": 2.0, "gate_proj": 3.0, "up_proj": 3.0, "down_proj": 2.0}


def build(over, seed, dtype, options=None):
    """A model of `dtype` on the GPU with the test's weights (drawn on the CPU: the same for
    every options)."""
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
    # 6 heads, 12 rows over 3 key blocks: a grid large enough for 4 heads per block, so the
    # second head group holds 2 (the other shapes take 2 or 1 heads per block)
    "six_heads_four_per_block": ({"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 6,
                                  "kv_lora_rank": 128}, 12, 382, 4, [0, 7, 0, 130, 0, 0, 1, 0, 0, 0, 64, 0]),
    # rank 192 (48 float4 columns: the merge's split lanes do not tile its 512 threads), one row
    # over 9 key blocks, each its own split
    "rank192_one_row": ({"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                         "kv_lora_rank": 192}, 1, 1100, 3, [0]),
}

# the default configuration's attention (16 heads of 64, rank 512) in narrow layers; one row
# takes 1 head per block up to 8 key blocks (1024 keys), 2 up to 16, 4 beyond (at the 132 SMs
# of an H200: the boundaries move with the GPU's size; the kernel must be right on every side)
DEFAULT_ATTN = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
                "intermediate_size": 64}


def counts(m):
    return m._engine.decode_attention_counts()


def _took(m, before):
    now = counts(m)
    return {k: now[k] - before[k] for k in now}


def _expect_kernel(m, before, fused):
    """Every decode-attention call over the latent cache since `before` took the in-kernel
    expansion (fused) or the expansion into scratch (not fused), and there was at least one;
    fused="both": some calls took each."""
    took = _took(m, before)
    if fused == "both":
        assert took["latent_decode"] > 0 and took["expand"] > 0, took
        return
    want, other = ("latent_decode", "expand") if fused else ("expand", "latent_decode")
    assert took[want] > 0 and took[other] == 0, took


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


def _check_steps(over, b, prompt, steps, pads, dtype, seed, oracle_rows=None, options=LATENT, fused=True):
    m, cfg, w = build(over, seed=seed, dtype=dtype, options=options)
    rows_model, _, _ = build(over, seed=seed, dtype=dtype, options=ROWS)
    t = prompt + steps
    ids = ids_for(cfg, b, t, seed=seed + 1)
    mask = _left_mask(b, t, pads)
    before, before_rows = counts(m), counts(rows_model)
    got = _steps(m, ids, mask, prompt)
    want_rows = _steps(rows_model, ids, mask, prompt)
    _expect_kernel(m, before, fused)
    _expect_kernel(rows_model, before_rows, fused=False)
    err_rows = rel_err(got, want_rows)
    assert err_rows <= TOL_HALF, f"latent decode kernel vs expanding into scratch: {err_rows:.2e}"
    sel = list(range(b)) if oracle_rows is None else oracle_rows
    ref, _ = R.forward(cfg, rounded(w, dtype), ids[sel], attention_mask=mask[sel])
    err_ref = rel_err(got[sel], ref[:, prompt:])
    assert err_ref <= TOL_HALF, f"latent decode kernel vs the float64 oracle: {err_ref:.2e} (vs expanding into scratch: {err_rows:.2e})"


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
    it picks is the oracle's best up to the 16-bit tolerance, and the rows path picks the same
    ones while the oracle's margin is clear."""
    over, b, prompt, _, pads = SHAPES["hd64_rank128"]
    # 250 + 20 new tokens: recorded bounds 256, 320
    _check_generate(over, b, prompt - 4, 20, pads, dtype, seed=51)


@needs_gpu
@pytest.mark.parametrize("prompt", [1020, 2040])
def test_latent_decode_in_graph_replay_across_heads_per_block(prompt):
    """Recorded bounds on both sides of a change of heads per block (1024 keys: 1 -> 2 heads,
    2048: 2 -> 4, one row of the default attention), under auto (above its threshold): each
    recording holds its own choice."""
    _check_generate(DEFAULT_ATTN, 1, prompt, 12, [0], "bfloat16", seed=53, options=None)


@needs_gpu
def test_auto_threshold_in_graph_replay():
    """auto across its threshold in generate(): 440 + 20 tokens are recorded for the bounds 448
    (below: K and V expanded into scratch) and 512 (the kernel); the tokens as the oracle's."""
    over, b, _, _, pads = SHAPES["short_context"]
    assert 448 < AUTO_MIN_KEYS <= 512
    _check_generate(over, b, 440, 20, pads, "bfloat16", seed=57, options=None, fused="both")


def _check_generate(over, b, prompt, new, pads, dtype, seed, options=LATENT, fused=True):
    m, cfg, w = build(over, seed=seed, dtype=dtype, options=options)
    rows_model, _, _ = build(over, seed=seed, dtype=dtype, options=ROWS)
    before = counts(m)
    ids = ids_for(cfg, b, prompt, seed=seed + 1)
    mask = _left_mask(b, prompt, pads)
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    seq = np.asarray(m.generate(ids, **kw))
    seq_rows = np.asarray(rows_model.generate(ids, **kw))
    _expect_kernel(m, before, fused)
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


@needs_gpu
@pytest.mark.parametrize("dtype,prompt", [("bfloat16", 29), ("bfloat16", 126), ("float16", 126),
                                          ("bfloat16", 1022), ("bfloat16", 2046)])
def test_latent_decode_default_attention(dtype, prompt):
    """One row of the default attention shape, eager steps across 128 keys (126), from 1 to 2
    heads per block (1022: 1024 keys) and from 2 to 4 (2046: 2048 keys); the long ones under
    auto, which takes the kernel there."""
    options = None if prompt >= AUTO_MIN_KEYS else LATENT
    _check_steps(DEFAULT_ATTN, 1, prompt, 4, [0], dtype, seed=61, options=options)


@needs_gpu
def test_auto_threshold_eager_steps():
    """auto across its threshold in eager steps: 509 cached keys + 4 steps see 510 .. 513 keys,
    the first two below the threshold (expanded into scratch), the last two the kernel's; all
    as the oracle's."""
    over, b, _, _, pads = SHAPES["short_context"]
    assert AUTO_MIN_KEYS == 512
    _check_steps(over, b, 509, 4, pads, "bfloat16", seed=58, options=None, fused="both")
    m, cfg, _ = build(over, seed=58, dtype="bfloat16")
    layers = _config(over)["num_hidden_layers"]
    ids = ids_for(cfg, b, 513, seed=59)
    before = counts(m)
    _steps(m, ids, np.ones((b, 513), np.int64), 509)
    assert _took(m, before) == {"expand": 2 * layers, "latent_decode": 2 * layers}


@needs_gpu
def test_auto_wide_batch_short_context():
    """auto at AUTO_MIN_ROWS rows takes the kernel at a short context (20 cached keys, rows
    with left padding); the logits as the oracle's and the scratch expansion's."""
    over = SHAPES["short_context"][0]
    pads = [0, 3, 0, 7] * (AUTO_MIN_ROWS // 4)
    _check_steps(over, AUTO_MIN_ROWS, 20, 3, pads, "bfloat16", seed=63, options=None, fused=True)


@needs_gpu
def test_latent_decode_default_attention_rows():
    """3 rows of the default attention shape over 3-4 key blocks: 2 heads per block, rows of
    different lengths."""
    _check_steps(DEFAULT_ATTN, 3, 382, 4, [0, 40, 200], "bfloat16", seed=62)


@needs_gpu
def test_latent_decode_selection():
    """Which decode steps take the kernel at a short context: 16-bit latent caches of a fitting
    shape under latent_decode; under auto only from AUTO_MIN_ROWS rows on (below its key
    threshold), never under rows, with a float32 model, or with head_dim 8; a K/V cache is no
    decode over the latent."""
    over = SHAPES["short_context"][0]

    def run(m, cfg, cache_format="latent"):
        m.cache_format = cache_format
        before = counts(m)
        _steps(m, ids_for(cfg, 2, 9, seed=3), np.ones((2, 9), np.int64), 6)
        now = counts(m)
        return {k: now[k] - before[k] for k in now}

    calls = 3 * _config(over)["num_hidden_layers"]  # 3 steps, one call per layer
    for options, fused in ((None, False), (LATENT, True), (ROWS, False)):
        m, cfg, _ = build(over, seed=5, dtype="bfloat16", options=options)
        took = run(m, cfg)
        assert (took["latent_decode"], took["expand"]) == ((calls, 0) if fused else (0, calls)), (options, took)
        assert run(m, cfg, "kv") == {"expand": 0, "latent_decode": 0}
    m, cfg, _ = build(over, seed=5, dtype="float32")
    assert run(m, cfg) == {"expand": calls, "latent_decode": 0}
    m, cfg, _ = build(over, seed=5, dtype="bfloat16")  # auto, a batch just below and at its row bound
    for b, fused in ((AUTO_MIN_ROWS - 1, False), (AUTO_MIN_ROWS, True)):
        before = counts(m)
        _steps(m, ids_for(cfg, b, 9, seed=3), np.ones((b, 9), np.int64), 6)
        took = _took(m, before)
        assert (took["latent_decode"], took["expand"]) == ((calls, 0) if fused else (0, calls)), (b, took)
    m, cfg, _ = build({"hidden_size": 32}, seed=5, dtype="bfloat16")  # 4 heads of 8
    assert run(m, cfg) == {"expand": calls, "latent_decode": 0}


def test_decode_attention_counts_cpu():
    """The CPU backend does not count: None."""
    m = xoron.MoELlamaForCausalLM(_config({}), device="cpu", seed=0)
    assert m._engine.decode_attention_counts() is None
