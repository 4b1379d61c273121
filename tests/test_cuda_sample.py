"""The CUDA backend's device draw (csrc/backends/cuda/sample.cu: temperature, top-k, nucleus,
min-p and a counter-based generator), called through xoron._testing's hook
(csrc/testing/sample_hooks.c) and held to a numpy reference of the kernel's arithmetic: the
tokens must be EQUAL, for many (seed, step) pairs, random rows at the real vocabulary width and
small odd widths, one row (many parts a row) and 70 rows (few), and crafted rows: ties across
the cut (a part overflowing, more survivors than the kernel keeps), +0 / -0 at the cut, +inf
maxima, tiny temperatures, every nucleus / min-p edge. NaN logits and bad arguments are errors.
Without a top-k (or above 1024) the kernel draws from the whole row (k_sample_whole): its
reference below reproduces its float32 weights op for op and its integer masses exactly, so
those tokens must be equal too.

Exactness: the sums run in the kernel's order in float64 here too. One thing is not bit-for-bit
by construction: CUDA's exp (double, within 1 ulp) against the host's; a 1-ulp difference moves a
weight by 1e-16 relative, which changes a token only when the uniform draw lands that close to a
boundary, so exact comparison over these few thousand draws stays valid.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import xoron  # noqa: E402
from test_cuda import GPU_OK, GPU_WHY  # noqa: E402
from xoron import _testing  # noqa: E402

needs_gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
VOCAB = 151_643
SAMPLE_CAP = 2048  # sample.cu: survivors kept (those above the cut's value, then the lowest-index ties)
TOP_K_MAX = 1024   # XO_DEVICE_TOP_K_MAX
MASK64 = (1 << 64) - 1
XO_EINVAL = 1
BAD_ARGS = "device sampling needs top_k >= 0, temperature > 0, 0 <= top_p <= 1 and 0 <= min_p <= 1"


# ------------------------------------------------------------------ the reference


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def order_keys(x) -> np.ndarray:
    """float32 -> uint32 of the same order (+0 above -0), as the kernel's order_key"""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)


def filtered(row, top_k, temperature=1.0, top_p=1.0, min_p=0.0):
    """(survivors, running sums of their weights, kept) of one row, as k_sample_final leaves them
    before the draw: the keys >= the k-th largest key (every tie kept, -0 dropped when the cut is
    +0), sorted value descending / index ascending, the first SAMPLE_CAP; weights exp of the
    float32 (v - max) / T (a +inf maximum: 1 for its ties, 0 else); the nucleus keeps the top-1
    and the token crossing top_p; min-p after it keeps the prefix with weight >= min_p."""
    row = np.ascontiguousarray(row, np.float32)
    k = min(top_k, row.size)
    key = order_keys(row)
    cut = np.partition(key, row.size - k)[row.size - k]
    surv = np.flatnonzero(key >= cut)
    value_key = key[surv].astype(np.int64)
    value_key[value_key == 0x7FFFFFFF] = 0x80000000  # -0 sorts with +0, by index
    surv = surv[np.lexsort((surv, -value_key))][:SAMPLE_CAP]
    val = row[surv].astype(np.float64)
    mx = val[0]
    if mx == np.inf:
        v = np.where(val == np.inf, 0.0, -np.inf).astype(np.float32)
    else:
        v = np.fmax((val - mx) / np.float64(np.float32(temperature)), -1e30).astype(np.float32)
    ev = np.exp(v.astype(np.float64))
    run = np.cumsum(ev)  # sequential, as the kernel's one-thread loop
    kept = len(surv)
    if np.float32(top_p) < 1:
        before = np.concatenate(([0.0], np.cumsum(ev / run[-1])[:-1]))
        over = np.flatnonzero(before > np.float64(np.float32(top_p)))
        over = over[over > 0]
        if over.size:
            kept = int(over[0])
    if np.float32(min_p) > 0:
        low = np.flatnonzero(~(ev[1:] >= np.float64(np.float32(min_p))))
        if low.size:
            kept = min(kept, int(low[0]) + 1)
    return surv, run, kept


def draw(f, seed: int, step: int, row: int) -> int:
    surv, run, kept = f
    rr = mix64((mix64(seed ^ 0x9E3779B97F4A7C15) + step * 0xD1B54A32D192ED03 + row) & MASK64)
    u = float(rr >> 11) * (1.0 / 9007199254740992.0) * float(run[kept - 1])
    hit = np.flatnonzero(u < run[:kept])
    return int(surv[hit[0] if hit.size else kept - 1])


def reference(logits, seeds, steps, **kw) -> np.ndarray:
    logits = np.atleast_2d(logits)
    fs = [filtered(r, **kw) for r in logits]
    return np.array([[draw(f, int(s), int(t), r) for r, f in enumerate(fs)] for s, t in zip(seeds, steps)], np.int32)


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << 63, n, dtype=np.uint64), rng.integers(0, 1 << 31, n, dtype=np.uint64)


def random_rows(rows, cols, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


# ------------------------------------------------------------------ the reference itself (no GPU)


def test_reference_top1_is_the_first_maximum():
    row = np.array([0.5, 2.0, -1.0, 2.0, 1.0], np.float32)
    f = filtered(row, top_k=1, temperature=1.0)
    assert list(f[0]) == [1, 3] and f[2] == 2  # top-k keeps the tie
    assert filtered(row, top_k=5, temperature=1.0, top_p=0.0)[2] == 1
    assert filtered(row, top_k=5, temperature=1.0, min_p=1.0)[2] == 2


def test_reference_zero_cut_and_infinite_maximum():
    row = np.array([1.0, -0.0, 0.0, -0.0, 0.0, -2.0], np.float32)
    assert list(filtered(row, top_k=2, temperature=1.0)[0]) == [0, 2, 4]      # cut at +0: -0 dropped
    assert list(filtered(row, top_k=4, temperature=1.0)[0]) == [0, 1, 2, 3, 4]  # cut at -0: every zero
    inf = np.array([1.0, np.inf, 3.0, np.inf], np.float32)
    surv, run, kept = filtered(inf, top_k=3, temperature=1.0)
    assert list(surv) == [1, 3, 2] and list(np.diff(np.concatenate(([0.0], run)))) == [1.0, 1.0, 0.0]


def test_reference_draws_follow_the_filtered_distribution():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    seeds, steps = pairs(20000, seed=1)
    got = reference(row, seeds, steps, top_k=4, temperature=0.8)[:, 0]
    p = np.exp((row[:4].astype(np.float64) - 2.0) / np.float64(np.float32(0.8)))
    np.testing.assert_allclose(np.bincount(got, minlength=6)[:4] / len(got), p / p.sum(), atol=0.015)
    assert not np.isin(got, [4, 5]).any()


# ------------------------------------------------------------------ the device against it


@pytest.fixture(scope="module")
def lib():
    h = ctypes.CDLL(_testing.__file__)
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    h.xo_hook_cuda_sample_rows.argtypes = [ctypes.c_char_p, i, p, i, i, i, f, i, f, f, p, p, i, i, p, ctypes.c_char_p, i]
    h.xo_hook_cuda_sample_rows.restype = i
    return h


def device(lib, logits, seeds, steps, *, top_k, temperature=1.0, top_p=1.0, min_p=0.0, offset=0,
           step_on_device=False):
    """(status, message, tokens [draws, rows])"""
    logits = np.ascontiguousarray(np.atleast_2d(logits), np.float32)
    seeds = np.ascontiguousarray(seeds, np.uint64)
    steps = np.ascontiguousarray(steps, np.uint64)
    tokens = np.full((len(seeds), logits.shape[0]), -1, np.int32)
    err = ctypes.create_string_buffer(512)
    rc = lib.xo_hook_cuda_sample_rows(xoron._cuda_plugin.encode(), 0, logits.ctypes.data, logits.shape[0],
                                      logits.shape[1], offset, temperature, top_k, top_p, min_p, seeds.ctypes.data,
                                      steps.ctypes.data, len(seeds), int(step_on_device), tokens.ctypes.data, err,
                                      len(err))
    return rc, err.value.decode(), tokens


def assert_draws_equal(lib, logits, draws=32, seed=0, offset=0, step_on_device=False, **kw):
    seeds, steps = pairs(draws, seed)
    rc, msg, got = device(lib, logits, seeds, steps, offset=offset, step_on_device=step_on_device, **kw)
    assert rc == 0, msg
    np.testing.assert_array_equal(got, reference(logits, seeds, steps, **kw))
    return got


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [1, 2, 50, 64, 1023, 1024])
def test_one_row_of_the_vocabulary(lib, top_k):
    got = assert_draws_equal(lib, random_rows(1, VOCAB, seed=top_k), draws=64, top_k=top_k)
    if top_k > 1:
        assert len(np.unique(got)) > 1  # the draws do spread


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_nucleus_and_min_p(lib, top_p, min_p):
    assert_draws_equal(lib, random_rows(1, VOCAB, seed=7, scale=1.5), draws=48, top_k=64, temperature=0.7,
                       top_p=top_p, min_p=min_p)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(top_k=50, top_p=0.9), dict(top_k=64, temperature=0.7, min_p=0.05),
                                dict(top_k=1024, temperature=2.0), dict(top_k=1)])
def test_seventy_rows(lib, kw):
    assert_draws_equal(lib, random_rows(70, VOCAB, seed=3), draws=4, **kw)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("cols", [1, 3, 5, 1000, 1001, 4099, 8195])
@pytest.mark.parametrize("top_k", [1, 2, 50, 1024])
def test_small_widths_at_every_alignment(lib, cols, top_k):
    logits = random_rows(3, cols, seed=cols)
    for offset in range(4):
        assert_draws_equal(lib, logits, draws=16, seed=offset, offset=offset, top_k=top_k, top_p=0.95)


@needs_gpu
@pytest.mark.cuda
def test_the_step_from_device_memory(lib):
    logits = random_rows(2, VOCAB, seed=5)
    assert_draws_equal(lib, logits, draws=16, top_k=50, top_p=0.9, step_on_device=True)


def tied_row(n_ties, spread, seed=0):
    """ten values above a tie of n_ties at 5.0 (contiguous, or spread over the row), the rest below"""
    rng = np.random.default_rng(seed)
    row = np.minimum(rng.standard_normal(VOCAB).astype(np.float32), 4.0)
    at = np.linspace(0, VOCAB - 1, n_ties).astype(np.int64) if spread else 5000 + np.arange(n_ties)
    row[at] = 5.0
    top = rng.choice(np.setdiff1d(np.arange(VOCAB), at), 10, replace=False)
    row[top] = 5.5 + 0.01 * np.arange(10, dtype=np.float32)
    return row


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("n_ties,spread", [(1500, False),   # one part overflows; every tie survives
                                           (3000, True),    # more survivors than kept, no part overflowing
                                           (6000, True),    # more candidates than the final block holds
                                           (3000, False)])
def test_ties_at_the_cut(lib, n_ties, spread):
    row = tied_row(n_ties, spread)
    surv = filtered(row, top_k=50, temperature=4.0)[0]
    assert len(surv) == min(10 + n_ties, SAMPLE_CAP)
    got = assert_draws_equal(lib, row, draws=96, top_k=50, temperature=4.0)
    assert (row[got[:, 0]] == 5.0).any()  # the ties are drawn


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [1, 50, 1024])
def test_a_row_of_equal_values(lib, top_k):
    row = np.full(VOCAB, 0.25, np.float32)
    got = assert_draws_equal(lib, row, draws=64, top_k=top_k)
    assert got.max() < SAMPLE_CAP


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("positive_zeros", [45, 20])  # cut at +0 (-0 dropped), cut at -0 (every zero)
def test_signed_zeros_at_the_cut(lib, positive_zeros):
    rng = np.random.default_rng(positive_zeros)
    row = (-5.0 - rng.random(VOCAB)).astype(np.float32)
    at = rng.choice(VOCAB, 10 + positive_zeros + 55, replace=False)
    row[at[:10]] = (1e-3 * rng.random(10)).astype(np.float32) + np.float32(1e-4)
    row[at[10:10 + positive_zeros]] = 0.0
    row[at[10 + positive_zeros:]] = -0.0
    surv = filtered(row, top_k=50, temperature=1e-3)[0]
    assert np.signbit(row[surv]).any() == (positive_zeros < 40)
    assert_draws_equal(lib, row, draws=96, top_k=50, temperature=1e-3)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [3, 50])
def test_infinite_maxima(lib, top_k):
    row = random_rows(1, VOCAB, seed=11)[0]
    row[[17, 4000, 90001, 151642, 77]] = np.inf
    row[::7] = -np.inf
    got = assert_draws_equal(lib, row, draws=48, top_k=top_k)
    assert set(got[:, 0]) <= {17, 77, 4000, 90001, 151642}


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 100.0])
def test_extreme_temperatures(lib, temperature):
    logits = random_rows(2, VOCAB, seed=13)
    got = assert_draws_equal(lib, logits, draws=16, top_k=50, temperature=temperature)
    if temperature == 1e-30:
        np.testing.assert_array_equal(got, np.broadcast_to(np.argmax(logits, 1), got.shape))


@needs_gpu
@pytest.mark.cuda
def test_nan_names_its_row_and_first_index(lib):
    logits = random_rows(3, VOCAB, seed=17)
    logits[2, [90000, 4100, 151000]] = np.nan
    rc, msg, _ = device(lib, logits, *pairs(1), top_k=50)
    assert rc == -XO_EINVAL and msg == "logits contain NaN at row 2 (token 4100)"
    one = random_rows(1, 1001, seed=19)
    one[0, [999, 3]] = np.nan
    rc, msg, _ = device(lib, one, *pairs(1), top_k=1024, offset=1)
    assert rc == -XO_EINVAL and msg == "logits contain NaN at row 0 (token 3)"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(top_k=-1), dict(top_k=5, temperature=0.0), dict(top_k=0, temperature=-1.0),
                                dict(top_k=5, min_p=-0.1), dict(top_k=0, min_p=1.5), dict(top_k=0, top_p=-0.1),
                                dict(top_k=5, top_p=1.5), dict(top_k=0, temperature=float("nan"))])
def test_bad_arguments(lib, kw):
    rc, msg, _ = device(lib, random_rows(1, 100), *pairs(1), **kw)
    assert rc == -XO_EINVAL and msg == BAD_ARGS


# ------------------------------------------------------------------ the whole-row draw (top_k 0 or above 1024)

EXP_COEFFS = [np.float32(float.fromhex(h)) for h in
              ("0x1.430912p-13", "0x1.5d87fep-10", "0x1.3b2ab6p-7", "0x1.c6b08ep-5", "0x1.ebfbe0p-3", "0x1.62e430p-1")]
LOG2E = np.float32(float.fromhex("0x1.715476p+0"))


def weight_exp(v):
    """sample.cu's weight_exp, float32 operation for operation"""
    v = np.asarray(v, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        y = v * LOG2E
        ok = y >= np.float32(-125.0)
        y = np.where(ok, y, np.float32(0.0))
        n = np.rint(y)
        f = y - n
        p = np.full_like(f, EXP_COEFFS[0])
        for c in EXP_COEFFS[1:] + [np.float32(1.0)]:
            p = p * f + c
        scale = ((n.astype(np.int32) + 127) << 23).view(np.float32)
        return np.where(ok, p * scale, np.float32(0.0))


def whole_weights(row, top_k, temperature=1.0, top_p=1.0, min_p=0.0):
    """the weights k_sample_whole draws with (0: not kept): the top-k cut by key, weights of the
    float32 tempered distance, the nucleus by integer masses floor(w 2^S), min-p on w"""
    row = np.ascontiguousarray(row, np.float32)
    cols = row.size
    key = order_keys(row)
    mx = row[~np.isnan(row)].max()
    k = top_k if 0 < top_k < cols else 0
    cut = np.partition(key, cols - k)[cols - k] if k else np.uint32(0)
    surv = key >= cut
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isinf(mx):
            v = np.where(row == mx, np.float32(0.0), np.float32(-np.inf))
        else:
            d = row - mx
            v = np.where(d == 0, np.float32(0.0), d * (np.float32(1.0) / np.float32(temperature)))
    w = weight_exp(v)
    kept = surv.copy()
    if np.float32(top_p) < 1:
        s_bits = 62 - (cols - 1).bit_length()
        mass = np.where(surv, np.floor(w.astype(np.float64) * 2.0 ** s_bits), 0).astype(np.uint64)
        total = int(mass.sum(dtype=np.uint64))
        num, den = float(np.float32(top_p)).as_integer_ratio()
        limit = total * num // den
        vk = key.astype(np.int64)
        vk[vk == 0x7FFFFFFF] = 0x80000000  # -0 ties with +0
        pos = np.flatnonzero(mass > 0)
        order = pos[np.argsort(-vk[pos], kind="stable")]
        starts = np.flatnonzero(np.concatenate(([True], np.diff(vk[order]) != 0)))
        group_mass = np.add.reduceat(mass[order], starts)
        above = 0
        for g, gm in enumerate(group_mass):
            if above + int(gm) > limit:
                break
            above += int(gm)
        tie = vk[order[starts[g]]]
        ties = np.flatnonzero(surv & (vk == tie))
        keep = min(len(ties), (limit - above) // (int(gm) // len(ties)) + 1)
        kept &= (vk > tie) | ((vk == tie) & (np.arange(cols) <= ties[keep - 1]))
    if np.float32(min_p) > 0:
        kept &= w >= np.float32(min_p)
    return np.where(kept & (w > 0), w.astype(np.float64), 0.0)


WHOLE_THREADS, WHOLE_SPAN_MIN, WHOLE_MAX_PARTS = 256, 4096, 64  # sample.cu


def whole_slices(cols):
    """(parts, span) of the whole-row draw: by the width alone"""
    parts = min(WHOLE_MAX_PARTS, -(-cols // WHOLE_SPAN_MIN))
    span = (-(-cols // parts) + 3) & ~3
    return -(-cols // span), span


def slice_sums(w, start):
    """k_sample_whole's sums over one slice: thread t adds w[t], w[t + 256], .. in turn, each warp
    its lanes' sums in order, then the warps' in order from `start`; (total, own [256], pre [256])"""
    n = -(-w.size // WHOLE_THREADS) * WHOLE_THREADS
    padded = np.zeros(max(n, WHOLE_THREADS))
    padded[:w.size] = w
    own = np.add.accumulate(padded.reshape(-1, WHOLE_THREADS), axis=0)[-1]
    lanes = own.reshape(-1, 32)
    warp_total = np.add.accumulate(lanes, axis=1)[:, -1]
    warp_pre, acc = np.zeros(len(warp_total)), start
    for i, t in enumerate(warp_total):
        warp_pre[i] = acc
        acc += t
    pre = np.zeros(WHOLE_THREADS)
    for wi in range(len(warp_total)):
        a = warp_pre[wi]
        for lane in range(32):
            pre[32 * wi + lane] = a
            a += lanes[wi, lane]
    return acc, own, pre


class WholeDraws:
    """k_sample_whole's draw from one row's weights (0: not kept): the slices' sums, the slice whose
    start is the last at or below u * total (with a positive sum), then its thread, then its token"""

    def __init__(self, weights):
        self.w = weights
        self.parts, self.span = whole_slices(weights.size)
        self.sums = [slice_sums(weights[p * self.span:(p + 1) * self.span], 0.0)[0] for p in range(self.parts)]

    def draw(self, seed, step, row):
        total = 0.0
        for t in self.sums:
            total += t
        rr = mix64((mix64(seed ^ 0x9E3779B97F4A7C15) + step * 0xD1B54A32D192ED03 + row) & MASK64)
        u = float(rr >> 11) * (1.0 / 9007199254740992.0) * total
        pre, pick, start = 0.0, -1, 0.0
        for p, t in enumerate(self.sums):
            if t > 0 and pre <= u:
                pick, start = p, pre
            pre += t
        sl = self.w[pick * self.span:(pick + 1) * self.span]
        _, own, tpre = slice_sums(sl, start)
        t = int(np.flatnonzero((own > 0) & (tpre <= u)).max())
        cum, last = tpre[t], -1
        for j in range(t, sl.size, WHOLE_THREADS):
            if not sl[j] > 0:
                continue
            cum += sl[j]
            last = j
            if u < cum:
                break
        return pick * self.span + last


def whole_reference(logits, seeds, steps, **kw) -> np.ndarray:
    ds = [WholeDraws(whole_weights(r, **kw)) for r in np.atleast_2d(logits)]
    return np.array([[d.draw(int(s), int(t), r) for r, d in enumerate(ds)] for s, t in zip(seeds, steps)], np.int32)


def assert_whole_draws_equal(lib, logits, draws=32, seed=0, offset=0, step_on_device=False, **kw):
    seeds, steps = pairs(draws, seed)
    rc, msg, got = device(lib, logits, seeds, steps, offset=offset, step_on_device=step_on_device, **kw)
    assert rc == 0, msg
    np.testing.assert_array_equal(got, whole_reference(logits, seeds, steps, **kw))
    return got


def test_reference_weight_exp_is_exp():
    v = -np.concatenate((np.linspace(0, 86, 20001), [1e-30, 1e-7])).astype(np.float32)
    got, want = weight_exp(v).astype(np.float64), np.exp(v.astype(np.float64))
    assert got[0] == 1.0
    assert np.all(np.abs(got - want) <= want * (1e-6 + np.abs(v) * 2 ** -23))
    assert weight_exp(np.float32(-np.inf)) == 0 and weight_exp(np.float32(-87.0)) == 0  # below 2^-125


def test_reference_whole_nucleus_keeps_the_crossing_token():
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float64)).astype(np.float32)
    for top_p, kept in ((0.4, 1), (0.5, 2), (0.79, 2), (0.81, 3), (0.99, 4)):
        assert np.count_nonzero(whole_weights(row, 0, top_p=top_p)) == kept, top_p
    ties = np.zeros(8, np.float32)  # equal weights: the lowest indices stay
    assert list(np.flatnonzero(whole_weights(ties, 0, top_p=0.3))) == [0, 1, 2]
    assert list(np.flatnonzero(whole_weights(ties, 0, top_p=0.25))) == [0, 1, 2]  # 2/8 before it: not past 0.25
    assert list(np.flatnonzero(whole_weights(ties, 0, top_p=0.2))) == [0, 1]


def test_reference_whole_draws_follow_the_weights():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -np.inf], np.float32)
    seeds, steps = pairs(20000, seed=2)
    got = whole_reference(row, seeds, steps, top_k=0, temperature=0.8)[:, 0]
    p = np.exp((row[:5].astype(np.float64) - 2.0) / 0.8)
    np.testing.assert_allclose(np.bincount(got, minlength=6)[:5] / len(got), p / p.sum(), atol=0.015)
    assert not (got == 5).any()


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [0, 1025, 5000, VOCAB - 1, VOCAB, 10 ** 6])
def test_whole_row_of_the_vocabulary(lib, top_k):
    got = assert_whole_draws_equal(lib, random_rows(1, VOCAB, seed=top_k % 97), draws=64, top_k=top_k)
    assert len(np.unique(got)) > 1


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 1.0])
def test_whole_row_nucleus_and_min_p(lib, top_p, min_p):
    assert_whole_draws_equal(lib, random_rows(1, VOCAB, seed=7, scale=1.5), draws=48, top_k=0, temperature=0.7,
                             top_p=top_p, min_p=min_p)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(top_k=0, top_p=0.9), dict(top_k=0, temperature=0.7, min_p=0.05),
                                dict(top_k=2000, temperature=2.0, top_p=0.95), dict(top_k=0, temperature=1.3)])
def test_whole_row_seventy_rows(lib, kw):
    assert_whole_draws_equal(lib, random_rows(70, VOCAB, seed=3), draws=4, **kw)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("cols", [1, 3, 5, 33, 1000, 1025, 4099, 8195])
@pytest.mark.parametrize("top_k", [0, 1500])
def test_whole_row_small_widths_at_every_alignment(lib, cols, top_k):
    logits = random_rows(3, cols, seed=cols)
    for offset in range(4):
        assert_whole_draws_equal(lib, logits, draws=16, seed=offset, offset=offset, top_k=top_k, top_p=0.95)


@needs_gpu
@pytest.mark.cuda
def test_whole_row_step_from_device_memory(lib):
    assert_whole_draws_equal(lib, random_rows(2, VOCAB, seed=5), draws=16, top_k=0, top_p=0.9, step_on_device=True)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("n_ties,spread,top_p", [(3000, True, 0.5), (3000, False, 0.5), (40, True, 0.02),
                                                 (3000, True, 0.999)])
def test_whole_row_nucleus_crossing_inside_ties(lib, n_ties, spread, top_p):
    row = tied_row(n_ties, spread)
    w = whole_weights(row, 0, temperature=1.0, top_p=top_p)
    kept_ties = np.flatnonzero((w > 0) & (row == 5.0))
    assert top_p == 0.999 or 0 < len(kept_ties) < n_ties  # the cut falls inside the tie (but for 0.999)
    got = assert_whole_draws_equal(lib, row, draws=96, top_k=0, top_p=top_p)
    assert set(got[:, 0]) <= set(np.flatnonzero(w > 0))


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_p", [0.5, 1.0])
def test_whole_row_of_equal_values(lib, top_p):
    row = np.full(VOCAB, 0.25, np.float32)  # every warp adds to one bin: one atomic a read
    got = assert_whole_draws_equal(lib, row, draws=64, top_k=0, top_p=top_p)
    if top_p < 1:
        assert got.max() < VOCAB // 2 + 1


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_p", [0.5, 0.97])
def test_whole_row_crowded_crossing_bin(lib, top_p):
    """the nucleus ends inside a distance bin of more survivors than the kernel gathers (8192):
    that row's select reads the row itself, beside rows whose crossing bin is gathered"""
    rng = np.random.default_rng(11)
    rows = []
    for crowd in (6000, 12000, 30000):
        row = np.full(VOCAB, -60.0, np.float32)  # the span is capped, so the crowd shares one bin
        row[rng.choice(VOCAB, crowd, replace=False)] = (5.0 + 0.05 * rng.random(crowd)).astype(np.float32)
        rows.append(row)
    rows.append(random_rows(1, VOCAB, seed=12)[0])
    logits = np.stack(rows)
    got = assert_whole_draws_equal(lib, logits, draws=48, top_k=0, top_p=top_p)
    for r in range(3):
        w = whole_weights(logits[r], 0, top_p=top_p)
        assert 0 < np.count_nonzero(w) < np.count_nonzero(logits[r] > 0)  # the cut is inside the crowd
        assert set(got[:, r]) <= set(np.flatnonzero(w > 0))


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("positive_zeros", [1045, 1020])  # a top-k cut at +0 (-0 dropped), at -0 (every zero)
def test_whole_row_signed_zeros_at_the_cut(lib, positive_zeros):
    rng = np.random.default_rng(positive_zeros)
    row = (-5.0 - rng.random(VOCAB)).astype(np.float32)
    at = rng.choice(VOCAB, 10 + positive_zeros + 55, replace=False)
    row[at[:10]] = (1e-3 * rng.random(10)).astype(np.float32) + np.float32(1e-4)
    row[at[10:10 + positive_zeros]] = 0.0
    row[at[10 + positive_zeros:]] = -0.0
    assert_whole_draws_equal(lib, row, draws=64, top_k=1050, temperature=1e-3)
    assert_whole_draws_equal(lib, row, draws=64, top_k=1050, temperature=1e-3, top_p=0.9)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_whole_row_infinities(lib, top_p):
    row = random_rows(1, VOCAB, seed=11)[0]
    row[::7] = -np.inf
    got = assert_whole_draws_equal(lib, row, draws=64, top_k=0, top_p=top_p)
    assert not np.isinf(row[got[:, 0]]).any()
    row[[17, 4000, 90001, 151642, 77]] = np.inf
    got = assert_whole_draws_equal(lib, row, draws=48, top_k=0, top_p=top_p)
    assert set(got[:, 0]) <= {17, 77, 4000, 90001, 151642}


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 100.0, 1e30])
def test_whole_row_extreme_temperatures(lib, temperature):
    logits = random_rows(2, VOCAB, seed=13)
    for top_p in (0.9, 1.0):
        got = assert_whole_draws_equal(lib, logits, draws=16, top_k=0, temperature=temperature, top_p=top_p)
        if temperature == 1e-30:
            np.testing.assert_array_equal(got, np.broadcast_to(np.argmax(logits, 1), got.shape))


@needs_gpu
@pytest.mark.cuda
def test_whole_row_nan_names_its_row_and_first_index(lib):
    logits = random_rows(3, VOCAB, seed=17)
    logits[1, [90000, 4100, 151000]] = np.nan
    for kw in (dict(top_k=0, top_p=0.9), dict(top_k=0), dict(top_k=3000, min_p=0.1)):
        rc, msg, _ = device(lib, logits, *pairs(1), **kw)
        assert rc == -XO_EINVAL and msg == "logits contain NaN at row 1 (token 4100)", kw


def test_reference_whole_row_is_the_filtered_distribution():
    """the whole-row weights, normalised, are SPEC 7's filtered distribution (float64) to float32 accuracy"""
    import reference_impl as R

    for seed, kw in enumerate([dict(top_k=0), dict(top_k=0, top_p=0.9), dict(top_k=0, top_p=0.5, temperature=0.6),
                               dict(top_k=0, min_p=0.1, temperature=1.7), dict(top_k=300, top_p=0.95)]):
        row = random_rows(1, 5000, seed=seed)[0]
        w = whole_weights(row, **kw)
        want = R.sample_filter(row, kw.get("temperature", 1.0), kw["top_k"], kw.get("top_p", 1.0), kw.get("min_p", 0.0))
        np.testing.assert_array_equal(w > 0, want > 0)
        np.testing.assert_allclose(w / w.sum(), want, rtol=2e-5, atol=1e-12)
