"""The compiled PyTorch peer of benchmarks/bench_gpu.py (benchmarks/torch_peer.py) computes the
same logits as the engine: float32 on the CPU, without compile, prefill and cached decode."""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import torch_peer  # noqa: E402


def test_peer_matches_engine_float32():
    assert torch_peer.selftest(tol=1e-4) <= 1e-4


def test_peer_rejects_overfull_cache():
    import xoron
    peer = torch_peer.TorchPeer.from_xoron(xoron.MoELlamaForCausalLM(torch_peer.TINY, seed=1),
                                           dtype=torch.float32, device="cpu")
    cache = peer.new_cache(1, 4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    peer.prefill(ids, cache)
    with pytest.raises(ValueError, match="full"):
        peer.decode(ids[:, :1], cache)
    with pytest.raises(ValueError, match="cannot take"):
        peer.prefill(ids, cache)
