"""Decode over a 16-bit K/V cache at head_dim 64 (csrc/backends/cuda/attention.cu, k_attn_kv16):
fewer than 16 queries per row off the tensor cores, the work split over keys as the row-wise
kernel splits it (the split count follows batch rows x heads and the context), each quarter warp
sharing one key. Against a float64 oracle on the values the kernel reads (float32 Q, the cache's
16-bit K and V widened exactly), so what remains is float32 arithmetic: contexts across the split
and 64-key step boundaries, GQA, batch rows with hidden keys and a row that sees none, several
queries of a row (causal among themselves). Marked `cuda`; skips cleanly without a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from test_cuda_attention_hopper import make_inputs, needs_gpu, oracle, rel_err, run_attention

pytestmark = pytest.mark.cuda
TOL = 2e-5


def check(inputs):
    got, counts = run_attention(inputs, {})
    assert counts == {"mma": 0, "hopper": 0}, counts  # off the tensor cores
    err = rel_err(got, oracle(inputs, f16_operands=False))
    assert err <= TOL, f"{inputs['shape']}: {err:.2e}"


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("past", [0, 1, 15, 16, 63, 64, 65, 1000, 4095, 4096, 4097])
def test_one_query_across_split_and_step_boundaries(past, dtype):
    check(make_inputs(batch=1, t=1, past=past, nh=4, nkv=4, dtype=dtype, seed=past))


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_batch_rows_gqa_hidden_keys_and_a_row_that_sees_nothing(dtype):
    past = 777
    inputs = make_inputs(batch=3, t=1, past=past, nh=8, nkv=2, dtype=dtype, seed=3,
                         hidden={0: list(range(0, past, 3)), 1: list(range(past + 1))})
    got, _ = run_attention(inputs, {})
    assert not np.any(got.reshape(3, -1)[1]), "row 1 sees no key: its output is 0"
    check(inputs)


@needs_gpu
@pytest.mark.parametrize("t", [2, 15])
def test_several_queries_of_a_row(t):
    check(make_inputs(batch=2, t=t, past=130, nh=4, nkv=1, dtype="bfloat16", seed=t, hidden={1: [0, 5, 131]}))


@needs_gpu
def test_many_rows_one_split():
    """80 rows x 16 heads: enough blocks to fill an H200 (8 per multiprocessor), so each takes all
    of its row's keys (no split)"""
    check(make_inputs(batch=80, t=1, past=300, nh=16, nkv=16, dtype="bfloat16", seed=9))
