/* Next-token draws on the GPU (SPEC section 7): temperature, top-k, nucleus, min-p, draw, so that
 * sampling needs no copy of the logits to the host. Keys are the floats mapped to unsigned
 * integers of the same order (+0 above -0). With 1 <= top_k <= TOP_K_CANDIDATES a row is spread
 * over many blocks, two launches:
 * 1. k_sample_part, block (part, row), a slice of the row: one read keeps each thread's four
 *    largest keys; the k-th largest of that pool, found by radix select, is at most the slice's
 *    k-th largest key (0 when the pool holds fewer than k). A second read of the slice gathers
 *    its candidates (keys at or above that threshold) into the part's buffer, counting them all
 *    (more than the buffer holds: the part overflowed), and records the slice's first NaN.
 * 2. k_sample_final, one block per row: every key of the row's top k is a candidate of its own
 *    part, and the largest part threshold is at most the row's k-th key, so the candidates at
 *    or above it hold the survivors. Their exact k-th key (radix select) is the cut, the
 *    survivors (keys >= cut) are sorted (value descending, index ascending on ties), then
 *    temperature, nucleus, min-p and the draw. Should a part overflow, the candidates overflow
 *    the block, or more than SAMPLE_CAP survive (ties at the cut), the block falls back to the
 *    row itself: an exact radix select over it, then an index-ordered gather.
 * Semantics as xo_sample_row in csrc/engine/sampling.c: top-k keeps every value tied with the
 * k-th (at most SAMPLE_CAP survivors: those above the cut's value and the lowest-index ties);
 * the nucleus keeps the top-1 and the token that crosses top_p. The cut is by key, so when it
 * falls on +0 the -0 entries beside it are dropped. A NaN is reported with the row's lowest NaN
 * index. The generator is counter-based (seed, step, row), so a seed gives the same draws on
 * the GPU every time (they differ from the CPU's stream). Without a top-k (top_k 0), or above
 * TOP_K_CANDIDATES, k_sample_whole draws from the whole row in one block (further below). */
#include <float.h>

#include "backends/cuda/common.h"

enum {
    TOP_K_CANDIDATES = 1024,  /* the largest top_k drawn from candidates; above, and without one, the whole row */
    SAMPLE_CAP = 2048,        /* survivors kept */
    ABOVE_CAP = TOP_K_CANDIDATES, /* survivors above the cut's value: fewer than k */
    FINAL_THREADS = 1024,
    PART_THREADS = 256,       /* k <= PART_THREADS; else PART_THREADS_WIDE: the pool stays several times k */
    PART_THREADS_WIDE = 1024,
    PART_SPAN_MIN = 4096,     /* columns a part takes at least */
    MAX_PARTS = 64,
    UNION_CAP = 4096,         /* candidates at or above the best part threshold the final block holds */
    NO_INDEX = 0x7fffffff,
};
/* the final block's two regions (each reused as the draw goes on): the candidates, then the sorted
 * survivors and their weights; the sort keys, then the running sums */
constexpr size_t FINAL_SMEM = UNION_CAP * 8 + SAMPLE_CAP * 8;

/* float -> unsigned key with the same order, and back */
__device__ __forceinline__ unsigned order_key(float x) {
    unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
/* the key with -0 taken as +0: the order of the values themselves */
__device__ __forceinline__ unsigned value_key(unsigned key) { return key == 0x7fffffffu ? 0x80000000u : key; }
/* sorted descending: value descending, index ascending on ties */
__device__ __forceinline__ unsigned long long sort_key(unsigned key, int j) {
    return ((unsigned long long)value_key(key) << 32) | (unsigned)~j;
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned lanes_below() { return (1u << (threadIdx.x & 31)) - 1u; }

/* a slot of *counter for each lane that wants one (one atomic a warp); every lane of the warp calls it */
__device__ __forceinline__ unsigned warp_append(bool want, unsigned *counter) {
    const unsigned ballot = __ballot_sync(0xffffffffu, want);
    unsigned base = 0;
    if (ballot && (threadIdx.x & 31) == 0) base = atomicAdd(counter, (unsigned)__popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    return base + (unsigned)__popc(ballot & lanes_below());
}

/* f(x, j, valid) over z[beg, end), 16-byte loads where the addresses allow (rows of an odd width
 * start anywhere). Every thread of the block makes the same calls, valid false on the padding,
 * so f may use warp-wide intrinsics. */
template <typename F> __device__ __forceinline__ void for_span(const float *z, int beg, int end, F f) {
    const int tid = threadIdx.x, nt = blockDim.x, n = end - beg;
    const int head = min(n, (int)((4 - (((uintptr_t)(z + beg) >> 2) & 3)) & 3));
    if (head > 0) {
        const bool valid = tid < head;
        f(valid ? z[beg + tid] : 0.0f, beg + tid, valid);
    }
    const float4 *body = (const float4 *)(z + beg + head);
    const int nb = (n - head) >> 2;
    for (int base = 0; base < nb; base += 4 * nt) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * nt + tid;
            v[u] = i < nb ? body[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = base + u * nt + tid, j = beg + head + 4 * i;
            const bool valid = i < nb;
            f(v[u].x, j, valid);
            f(v[u].y, j + 1, valid);
            f(v[u].z, j + 2, valid);
            f(v[u].w, j + 3, valid);
        }
    }
    const int done = head + 4 * nb, tail = n - done;
    if (tail > 0) {
        const bool valid = tid < tail;
        f(valid ? z[beg + done + tid] : 0.0f, beg + done + tid, valid);
    }
}

struct SelectScratch {
    unsigned hist[256];
    unsigned prefix, remaining;
    int found;
};

/* one 8-bit pass of the k-th largest by counts, warp-wide: lane l holds bins 255 - 8 l down to
 * 248 - 8 l; the first bin the count from the top takes to *remaining, which becomes what is
 * left to find inside it; -1 (and *remaining kept) when the bins hold fewer */
template <typename Count> __device__ int counted_bin(Count count, unsigned *remaining) {
    const int lane = threadIdx.x & 31;
    unsigned c[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        c[j] = count(255 - 8 * lane - j);
        sum += c[j];
    }
    unsigned incl = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned t = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += t;
    }
    const unsigned rem = *remaining, reach = __ballot_sync(0xffffffffu, incl >= rem);
    int found = -1;
    unsigned left = rem;
    if (reach && lane == __ffs(reach) - 1) {
        unsigned cum = incl - sum;
        int j = 0;
        while (j < 7 && cum + c[j] < rem) cum += c[j++];
        left = rem - cum;
        found = 255 - 8 * lane - j;
    }
    const int src = reach ? __ffs(reach) - 1 : 0;
    found = __shfl_sync(0xffffffffu, found, src);
    left = __shfl_sync(0xffffffffu, left, src);
    if (found >= 0) *remaining = left;
    return found;
}

/* The k-th largest of the keys the block's threads hand in, 8 bits a pass; 0 when there are fewer
 * than k. for_keys(f) calls f(key, valid) the same number of times in every thread. */
template <typename ForKeys> __device__ unsigned block_select(ForKeys for_keys, unsigned k, SelectScratch &s) {
    const int tid = threadIdx.x, lane = tid & 31;
    if (tid == 0) {
        s.prefix = 0;
        s.remaining = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) s.hist[i] = 0;
        __syncthreads();
        const unsigned prefix = s.prefix;
        for_keys([&](unsigned key, bool valid) {
            const bool counted = valid && (shift == 24 || (key >> (shift + 8)) == prefix);
            const unsigned bin = counted ? (key >> shift) & 255u : 256u;
            const unsigned peers = __match_any_sync(0xffffffffu, bin); /* logits crowd a few bins */
            if (counted && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], (unsigned)__popc(peers));
        });
        __syncthreads();
        if (tid < 32) {
            unsigned rem = s.remaining;
            const int b = counted_bin([&](int i) { return s.hist[i]; }, &rem);
            if (lane == 0) {
                s.found = b >= 0;
                if (b >= 0) {
                    s.remaining = rem;
                    s.prefix = (prefix << 8) | (unsigned)b;
                }
            }
        }
        __syncthreads();
        if (!s.found) break;
    }
    const unsigned kth = s.found ? s.prefix : 0u;
    __syncthreads(); /* read before a later select starts over */
    return kth;
}

/* keys[0 .. n) (n a power of two, at most 2 * blockDim) sorted descending in place; up to 128 keys
 * one warp sorts them, without block barriers. The caller synchronises the block after. */
__device__ void sort_desc(unsigned long long *keys, int n) {
    const int lanes = n <= 128 ? 32 : (int)blockDim.x;
    if ((int)threadIdx.x >= lanes) return;
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int p = threadIdx.x; p < n / 2; p += lanes) {
                const int i = 2 * p - (p & (stride - 1)), j = i + stride;
                const unsigned long long a = keys[i], b = keys[j];
                if ((a < b) == ((i & size) == 0)) {
                    keys[i] = b;
                    keys[j] = a;
                }
            }
            if (lanes == 32) __syncwarp();
            else __syncthreads();
        }
    }
}

/* the parts' results, [rows][parts] */
struct PartBuf {
    int *count;    /* candidates found (more than cap: the part overflowed) */
    unsigned *thr; /* the part's threshold */
    int *nan_at;   /* the slice's first NaN, NO_INDEX: none */
    unsigned *key; /* [rows][parts][cap] the candidates' keys and indices, in no order */
    int *idx;
    int parts, span, cap;
};

__global__ __launch_bounds__(PART_THREADS_WIDE) void k_sample_part(PartBuf b, const float *__restrict__ logits, int cols,
                                                                   int k) {
    CU_PDL_ENTRY();
    __shared__ SelectScratch sel;
    __shared__ unsigned taken;
    __shared__ int first_nan;
    const int part = blockIdx.x, r = blockIdx.y;
    const size_t at = (size_t)r * b.parts + part;
    const float *z = logits + (size_t)r * cols;
    const int beg = part * b.span, end = min(cols, beg + b.span);

    unsigned top[4] = {0, 0, 0, 0}; /* descending, 0: none (a key 0 is left out: the pool stays a subset) */
    int nan_at = NO_INDEX;
    for_span(z, beg, end, [&](float x, int j, bool valid) {
        if (!valid) return;
        if (x != x && j < nan_at) nan_at = j;
        const unsigned key = order_key(x);
        if (key > top[3]) {
            top[3] = key;
#pragma unroll
            for (int i = 3; i > 0; i--)
                if (top[i] > top[i - 1]) {
                    const unsigned t = top[i];
                    top[i] = top[i - 1];
                    top[i - 1] = t;
                }
        }
    });
    if (threadIdx.x == 0) {
        taken = 0;
        first_nan = NO_INDEX;
    }
    const unsigned thr = block_select(
        [&](auto f) {
#pragma unroll
            for (int i = 0; i < 4; i++) f(top[i], top[i] != 0);
        },
        (unsigned)k, sel);
    if (nan_at != NO_INDEX) atomicMin(&first_nan, nan_at);

    unsigned *ckey = b.key + at * b.cap;
    int *cidx = b.idx + at * b.cap;
    for_span(z, beg, end, [&](float x, int j, bool valid) {
        const unsigned key = order_key(x);
        const bool want = valid && key >= thr;
        const unsigned slot = warp_append(want, &taken);
        if (want && slot < (unsigned)b.cap) {
            ckey[slot] = key;
            cidx[slot] = j;
        }
    });
    __syncthreads();
    if (threadIdx.x == 0) {
        b.count[at] = (int)taken;
        b.thr[at] = thr;
        b.nan_at[at] = first_nan;
    }
}

__global__ __launch_bounds__(FINAL_THREADS) void k_sample_final(int32_t *out, PartBuf b, const float *__restrict__ logits,
                                                                int cols, int k, float temperature, float top_p,
                                                                float min_p, uint64_t seed, uint64_t step,
                                                                const int32_t *step_dev, CuFault *fault) {
    CU_PDL_ENTRY();
    if (step_dev) step = (uint64_t)*step_dev;
    extern __shared__ __align__(16) unsigned char smem[];
    unsigned *ukey = (unsigned *)smem; /* the candidates at or above the best part threshold */
    int *uidx = (int *)(smem + UNION_CAP * 4);
    unsigned long long *above = (unsigned long long *)smem; /* fallback: the survivors above the cut's value */
    float *val = (float *)smem;                              /* the survivors sorted */
    int *idx = (int *)(smem + SAMPLE_CAP * 4);
    double *ev = (double *)(smem + SAMPLE_CAP * 8);
    unsigned long long *order = (unsigned long long *)(smem + UNION_CAP * 8); /* the survivors' sort keys */
    double *run = (double *)(smem + UNION_CAP * 8); /* after the sort: run[i] = ev[0] + .. + ev[i], in order */
    __shared__ SelectScratch sel;
    __shared__ int part_count[MAX_PARTS], overflow, first_nan, minp_stop, pick_at, kept_s;
    __shared__ unsigned best_thr, n_union, n_surv, n_above, warp_ties[32], warp_off[32], tile_ties;
    __shared__ double total_s, draw_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r = blockIdx.x;
    const float *z = logits + (size_t)r * cols;

    if (tid == 0) {
        overflow = 0;
        first_nan = NO_INDEX;
        best_thr = 0;
        n_union = n_surv = n_above = 0;
    }
    __syncthreads();
    if (tid < b.parts) {
        const size_t at = (size_t)r * b.parts + tid;
        const int found = b.count[at], nan_at = b.nan_at[at];
        part_count[tid] = min(found, b.cap);
        if (found > b.cap) atomicOr(&overflow, 1);
        atomicMax(&best_thr, b.thr[at]);
        if (nan_at != NO_INDEX) atomicMin(&first_nan, nan_at);
    }
    __syncthreads();
    if (tid == 0 && first_nan != NO_INDEX) cu_report_fault(fault, CU_FAULT_NAN_LOGIT, r, first_nan);

    /* the candidates at or above the best threshold, then their exact k-th key and the survivors */
    unsigned cut = 0;
    bool have_cut = false, listed = false;
    if (!overflow) {
        const unsigned thr = best_thr;
        for (int p = warp; p < b.parts; p += FINAL_THREADS / 32) { /* a warp a part, its loads issued together */
            const int n = part_count[p];
            const size_t at = ((size_t)r * b.parts + p) * b.cap;
            for (int s0 = 0; s0 < n; s0 += 4 * 32) {
                unsigned key[4];
                int j[4];
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const int s = s0 + 32 * u + lane;
                    key[u] = s < n ? b.key[at + s] : 0u;
                    j[u] = s < n ? b.idx[at + s] : 0;
                }
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const bool want = s0 + 32 * u + lane < n && key[u] >= thr;
                    const unsigned slot = warp_append(want, &n_union);
                    if (want && slot < UNION_CAP) {
                        ukey[slot] = key[u];
                        uidx[slot] = j[u];
                    }
                }
            }
        }
        __syncthreads();
        const int nu = (int)n_union;
        if (nu <= UNION_CAP) {
            cut = block_select(
                [&](auto f) {
                    for (int base = 0; base < nu; base += FINAL_THREADS) {
                        const int i = base + tid;
                        f(i < nu ? ukey[i] : 0u, i < nu);
                    }
                },
                (unsigned)k, sel);
            have_cut = true;
            for (int base = 0; base < nu; base += FINAL_THREADS) {
                const int i = base + tid;
                const bool want = i < nu && ukey[i] >= cut;
                const unsigned slot = warp_append(want, &n_surv);
                if (want && slot < SAMPLE_CAP) order[slot] = sort_key(ukey[i], uidx[i]);
            }
            __syncthreads();
            listed = n_surv <= SAMPLE_CAP;
        }
    }
    int ms = listed ? (int)n_surv : 0;
    if (!listed) { /* from the row: the survivors above the cut's value (fewer than k), then its ties by index */
        if (!have_cut)
            cut = block_select(
                [&](auto f) { for_span(z, 0, cols, [&](float x, int, bool valid) { f(order_key(x), valid); }); },
                (unsigned)k, sel);
        const unsigned tie = value_key(cut);
        unsigned n_ties = 0; /* the same in every thread */
        for (int base = 0; base < cols; base += FINAL_THREADS) {
            const int j = base + tid;
            const unsigned key = j < cols ? order_key(z[j]) : 0u;
            const bool is_above = j < cols && value_key(key) > tie, is_tie = j < cols && !is_above && key >= cut;
            const unsigned slot = warp_append(is_above, &n_above);
            if (is_above && slot < ABOVE_CAP) above[slot] = sort_key(key, j);
            if (n_ties < SAMPLE_CAP) { /* an ordered append: ties in index order */
                const unsigned ballot = __ballot_sync(0xffffffffu, is_tie);
                if (lane == 0) warp_ties[warp] = (unsigned)__popc(ballot);
                __syncthreads();
                if (warp == 0) {
                    const unsigned own = warp_ties[lane];
                    unsigned incl = own;
#pragma unroll
                    for (int off = 1; off < 32; off <<= 1) {
                        const unsigned t = __shfl_up_sync(0xffffffffu, incl, off);
                        if (lane >= off) incl += t;
                    }
                    warp_off[lane] = incl - own;
                    if (lane == 31) tile_ties = incl;
                }
                __syncthreads();
                const unsigned pos = n_ties + warp_off[warp] + (unsigned)__popc(ballot & lanes_below());
                if (is_tie && pos < SAMPLE_CAP) order[pos] = sort_key(key, j);
                n_ties += tile_ties;
            }
        }
        __syncthreads();
        const int na = (int)min(n_above, (unsigned)ABOVE_CAP), nt = min((int)n_ties, SAMPLE_CAP - na);
        for (int i = tid; i < na; i += FINAL_THREADS) order[nt + i] = above[i];
        ms = nt + na;
        __syncthreads();
    }

    int n2 = 1;
    while (n2 < ms) n2 <<= 1;
    for (int i = ms + tid; i < n2; i += FINAL_THREADS) order[i] = 0; /* below every survivor */
    __syncthreads();
    sort_desc(order, n2);
    __syncthreads();
    /* a -0 survivor reads back as +0: the same weight (-0 - mx and +0 - mx agree once exponentiated) */
    for (int i = tid; i < ms; i += FINAL_THREADS) {
        val[i] = key_value((unsigned)(order[i] >> 32));
        idx[i] = (int)~(unsigned)order[i];
    }
    if (tid == 0) {
        minp_stop = ms;
        pick_at = NO_INDEX;
    }
    __syncthreads();

    /* Temperature, nucleus and the draw. The temperature divides the distance to the row's
     * maximum, in double: that cannot overflow however small the temperature (a +inf maximum
     * leaves only its ties). Each term is computed by its own thread; every sum runs in order on
     * one thread, so the draw does not depend on the thread count: the running total once (the
     * kept total and the draw's cumulative sums are its prefixes), the nucleus's cumulative share
     * once. */
    const double mx = val[0], temp = temperature;
    for (int i = tid; i < ms; i += FINAL_THREADS) {
        const float v = mx == INFINITY ? (val[i] == INFINITY ? 0.0f : -INFINITY)
                                       : (float)fmax(((double)val[i] - mx) / temp, -1e30);
        ev[i] = exp((double)v);
    }
    __syncthreads();
    if (min_p > 0.0f) /* after the nucleus: drop what is below min_p times the top probability (ev is
                       * exp(v - max), non-increasing along the sorted survivors) */
        for (int i = 1 + tid; i < ms; i += FINAL_THREADS)
            if (!(ev[i] >= (double)min_p)) atomicMin(&minp_stop, i);
    if (tid == 0) {
        double total = 0.0;
        for (int i = 0; i < ms; i++) {
            total += ev[i];
            run[i] = total;
        }
        total_s = total;
    }
    __syncthreads();
    const double total = total_s;
    for (int i = tid; i < ms; i += FINAL_THREADS) ev[i] = ev[i] / total; /* from here: the shares */
    __syncthreads();
    if (tid == 0) {
        int kept = ms;
        if (top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < ms; i++) {
                if (i > 0 && cum > top_p) {
                    kept = i;
                    break;
                }
                cum += ev[i];
            }
        }
        if (min_p > 0.0f && minp_stop < kept) kept = minp_stop;
        kept_s = kept;
        const uint64_t rr = mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) + step * 0xd1b54a32d192ed03ULL + blockIdx.x);
        draw_s = (double)(rr >> 11) * (1.0 / 9007199254740992.0) * run[kept - 1];
    }
    __syncthreads();
    const int kept = kept_s;
    const double u = draw_s;
    for (int i = tid; i < kept; i += FINAL_THREADS)
        if (u < run[i]) atomicMin(&pick_at, i);
    __syncthreads();
    if (tid == 0) out[blockIdx.x] = idx[pick_at == NO_INDEX ? kept - 1 : pick_at];
}

/* ---- The whole-row draw: top_k 0 (off) or above TOP_K_CANDIDATES ----
 * A row is split into slices by its width alone (so the draw's order of float64 sums, and its
 * tokens, are the same on any GPU and in any batch), one block each, read by a chain of launches
 * (stages).
 * Each stage's blocks add their slices' histograms into the row's (integer sums: the same in any
 * order); the last block of the stage to finish reads the row's histogram and records the stage's
 * decision, which the next launch reads. The stages:
 *   MAX: the row's maximum (NaN left out) and its first NaN (reported);
 *   KSELECT (a top-k, four 8-bit passes): the k-th largest key, counted as block_select counts;
 *     survivors are the keys at or above it;
 *   DIST, SELECT (top_p < 1, a pass each): the nucleus as a weighted select. A survivor's
 *     weight w = exp of its tempered distance (x - max) * (1 / temperature), in float32
 *     (weight_exp), is a fixed-point mass E = floor(w 2^S), S as large as the row's total allows
 *     in 62 bits. The kept prefix of the sorted survivors (value descending, index ascending) ends
 *     at the value T with A(T) <= L < A(T) + C_T E_T, L = floor(top_p * total), A(T) the mass
 *     strictly above T and C_T its ties: the top-1 and the token crossing top_p stay, as in
 *     xo_sample_row. DIST finds the distance bin (256 over the row's span) holding T, SELECT
 *     gathers that bin's survivors (value key and mass) and its last block finds T's key among
 *     them by four 8-bit passes (or among the row itself when more than the buffer holds crowd
 *     the bin, as in a row of equal values). Of T's ties the lowest-index floor((L - A) / E_T) + 1
 *     stay;
 *   TIES (when some of T's ties go): the index of the last tie kept;
 *   DRAW: min-p on w, each slice's sum of kept weights in float64, in a fixed order (below); the
 *     last block scans the slices, takes the one holding u * total and walks it.
 * The order of the draw's sums: a thread takes indices beg + t, beg + t + nt, .. of its slice in
 * turn, each warp adds its lanes' sums in lane order, the slice its warps' in warp order, the row
 * its slices' in order; the token is the first whose running sum passes u * total along that order
 * (each the last with a positive weight that starts at or below it, should rounding leave none). */
enum { WHOLE_THREADS = 256, WHOLE_WARPS = WHOLE_THREADS / 32, DIST_BINS = 256, WHOLE_SPAN_MIN = 4096, WHOLE_MAX_PARTS = 64 };
/* distances past this many units weigh nothing in 62 bits (e^-44 2^62 < 1): no bins for them */
constexpr float MAX_BIN_SPAN = 44.0f;
enum { ST_MAX, ST_KSELECT, ST_DIST, ST_SELECT, ST_TIES, ST_DRAW };
enum { WHOLE_LAUNCHES = 9 }; /* the most a call makes: MAX, 4 KSELECT, DIST, SELECT, TIES, DRAW */
/* the crossing bin's survivors a row gathers at most (fewer in very wide batches, to bound the
 * buffer): more, and SELECT's last block reads the row itself */
enum { GATHER_CAP = 8192, GATHER_CAP_MIN = 256, GATHER_LOADS = 8 };
constexpr size_t GATHER_BYTES = (size_t)64 << 20;

/* exp(v), v <= 0, from float multiplies and adds alone (no fma, no hardware approximation), so
 * that a host reference reproduces every weight bit for bit: y = v log2(e) = n + f, |f| <= 1/2,
 * 2^n times the degree-6 Taylor polynomial of 2^f (relative error about 1e-7, plus |y| 2^-24 from
 * rounding y); 0 below 2^-125 */
__device__ __forceinline__ float weight_exp(float v) {
    const float y = __fmul_rn(v, 0x1.715476p+0f);
    if (!(y >= -125.0f)) return 0.0f;
    const float n = rintf(y), f = __fsub_rn(y, n);
    float p = 0x1.430912p-13f;
    p = __fadd_rn(__fmul_rn(p, f), 0x1.5d87fep-10f);
    p = __fadd_rn(__fmul_rn(p, f), 0x1.3b2ab6p-7f);
    p = __fadd_rn(__fmul_rn(p, f), 0x1.c6b08ep-5f);
    p = __fadd_rn(__fmul_rn(p, f), 0x1.ebfbe0p-3f);
    p = __fadd_rn(__fmul_rn(p, f), 0x1.62e430p-1f);
    p = __fadd_rn(__fmul_rn(p, f), 1.0f);
    return __fmul_rn(p, __int_as_float(((int)n + 127) << 23));
}

/* a survivor's tempered distance to the row's maximum, its weight and its mass */
struct Tempered {
    float mx, inv_t, scale; /* scale = 2^S */
    float bins_per_unit;    /* distance bins spread over the row's span of distances (at most MAX_BIN_SPAN) */
    bool inf_max;           /* the maximum is +-inf: its ties weigh 1, the rest 0 */
    __device__ __forceinline__ float v(float x) const {
        if (inf_max) return x == mx ? 0.0f : -INFINITY;
        const float d = __fsub_rn(x, mx);
        return d == 0.0f ? 0.0f : __fmul_rn(d, inv_t); /* 0 * inf would be NaN where 1 / temperature overflows */
    }
    __device__ __forceinline__ float weight(float x) const { return weight_exp(v(x)); }
    __device__ __forceinline__ unsigned long long mass(float w) const { return w > 0.0f ? __float2ull_rz(w * scale) : 0ull; }
    /* distance bin: 0 holds the maximum; ordered as the values, ties together (where they fall
     * only decides how fast the select runs, never what it finds) */
    __device__ __forceinline__ unsigned bin(float x) const {
        return (unsigned)fminf(__fmul_rn(-v(x), bins_per_unit), (float)(DIST_BINS - 1));
    }
};

/* floor(p * total) exactly, 0 < p < 1 a float (its 24-bit mantissa times a power of two) */
__device__ __forceinline__ unsigned long long scaled_floor(float p, unsigned long long total) {
    const unsigned bits = __float_as_uint(p), ex = (bits >> 23) & 0xffu;
    const unsigned long long m = ex ? (bits & 0x7fffffu) | 0x800000u : bits & 0x7fffffu;
    const int shift = ex ? 150 - (int)ex : 149; /* p = m / 2^shift, shift >= 24 */
    const unsigned long long lo = m * total, hi = __umul64hi(m, total);
    if (shift >= 128) return 0;
    if (shift >= 64) return hi >> (shift - 64);
    return (lo >> shift) | (hi << (64 - shift));
}

/* a row's decisions so far, written by each stage's last block */
struct WholeRow {
    unsigned max_key, cut, k_prefix, k_remaining;
    unsigned nan_rank; /* 0: no NaN; else 2^31 - the first NaN's index (atomicMax keeps the first) */
    unsigned min_key_inv; /* ~ the smallest finite key (atomicMax from 0) */
    int k_found, m_found, tie_limit; /* tie_limit -1: TIES finds it */
    unsigned dist_bin, m_prefix, tie_count;
    int gather;        /* 1: the crossing bin's survivors fit the row's candidate buffer */
    unsigned gather_n; /* how many SELECT gathered */
    unsigned gather_lo_inv, gather_hi; /* ~ their smallest value key, their largest (atomicMax from 0) */
    unsigned long long limit, above, tie_mass, keep_ties;
    unsigned done[WHOLE_LAUNCHES];
};

struct WholeArgs {
    int32_t *out;
    const float *logits;
    int cols, k, parts, span;
    float temperature, top_p, min_p, mass_scale;
    uint64_t seed, step;
    const int32_t *step_dev;
    CuFault *fault;
    WholeRow *rows;                /* [rows] */
    unsigned long long *hist_mass; /* [rows][WHOLE_LAUNCHES][DIST_BINS] */
    unsigned *hist_count;          /* [rows][WHOLE_LAUNCHES][DIST_BINS] */
    unsigned *part_ties;           /* [rows][parts] */
    double *part_sum;              /* [rows][parts] */
    unsigned *cand_key;            /* [rows][cand_cap] the crossing bin's survivors: value keys */
    unsigned long long *cand_mass; /* [rows][cand_cap] and masses */
    int cand_cap;
};

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long x) {
#pragma unroll
    for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* the warp's own histogram += (m, 1) for each counted lane; one add when the whole warp falls in
 * one bin (a row of equal values would otherwise queue every lane on one address). Every lane of
 * the warp calls it. */
__device__ __forceinline__ void warp_hist_add(unsigned long long *mass, unsigned *count, unsigned bin,
                                              unsigned long long m, bool counted) {
    if (!__any_sync(0xffffffffu, counted)) return;
    const unsigned first = __shfl_sync(0xffffffffu, bin, 0);
    if (__all_sync(0xffffffffu, counted && bin == first)) {
        const unsigned long long sum = warp_sum(m);
        if ((threadIdx.x & 31) == 0) {
            mass[bin] += sum;
            count[bin] += 32u;
        }
    } else if (counted) {
        atomicAdd(&mass[bin], m);
        atomicAdd(&count[bin], 1u);
    }
    __syncwarp();
}

/* counts alone (the top-k select): lanes of one bin counted together, since keys crowd a few bins */
__device__ __forceinline__ void warp_count_add(unsigned *count, unsigned bin, bool counted) {
    if (!__any_sync(0xffffffffu, counted)) return;
    const unsigned peers = __match_any_sync(0xffffffffu, counted ? bin : 0xffffffffu);
    if (counted && (threadIdx.x & 31) == __ffs(peers) - 1) count[bin] += (unsigned)__popc(peers);
    __syncwarp();
}

/* block merge of the warps' histograms into the row's; the caller synchronised the block */
__device__ __forceinline__ void merge_hist(unsigned long long (*wmass)[DIST_BINS], unsigned (*wcount)[DIST_BINS],
                                           unsigned long long *gmass, unsigned *gcount, bool with_mass) {
    for (int i = threadIdx.x; i < DIST_BINS; i += WHOLE_THREADS) {
        unsigned long long m = 0;
        unsigned n = 0;
        for (int w = 0; w < WHOLE_WARPS; w++) {
            if (with_mass) m += wmass[w][i];
            n += wcount[w][i];
        }
        if (m) atomicAdd(&gmass[i], m);
        if (n) atomicAdd(&gcount[i], n);
    }
}

/* the first position i of 0 .. DIST_BINS - 1 whose mass mass_at(i) takes the running sum from
 * *above past limit: *above gains the positions before it; -1 when none does (a row of NaNs).
 * One warp. */
template <typename MassAt>
__device__ int crossing_bin(MassAt mass_at, unsigned long long *above, unsigned long long limit) {
    const int lane = threadIdx.x & 31;
    unsigned long long c[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        c[j] = mass_at(8 * lane + j);
        sum += c[j];
    }
    unsigned long long incl = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long t = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += t;
    }
    const unsigned long long base = *above;
    const unsigned reach = __ballot_sync(0xffffffffu, base + incl > limit);
    int found = -1;
    unsigned long long cum = 0;
    if (reach && lane == __ffs(reach) - 1) {
        cum = base + incl - sum;
        int j = 0; /* the first of the lane's 8 that passes (constant indices: c stays in registers) */
#pragma unroll
        for (int t = 0; t < 7; t++) {
            if (j == t && cum + c[t] <= limit) {
                cum += c[t];
                j = t + 1;
            }
        }
        found = 8 * lane + j;
    }
    const int src = reach ? __ffs(reach) - 1 : 0;
    cum = __shfl_sync(0xffffffffu, cum, src);
    found = __shfl_sync(0xffffffffu, found, src);
    if (found >= 0) *above = cum;
    return found;
}

/* 1 in the block that finishes a stage last (its writes, and every other block's, visible to it) */
__device__ __forceinline__ bool last_block(unsigned *done, int parts) {
    __shared__ unsigned ticket;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) ticket = atomicAdd(done, 1u);
    __syncthreads();
    const bool last = ticket == (unsigned)parts - 1;
    if (last) __threadfence();
    return last;
}

/* T, the value at which the nucleus ends, among the crossing bin's survivors: four 8-bit passes
 * over their value keys, from the top byte, each a histogram of masses among those matching the
 * bytes found so far (keys descending), and of T's ties the ones kept. The whole last block;
 * for_cand(f) calls f(value key, mass, counted) the same number of times in every thread. */
template <typename ForCand>
__device__ __forceinline__ void select_crossing(WholeRow &row, unsigned long long (*wmass)[DIST_BINS], unsigned (*wcount)[DIST_BINS],
                                int cols, unsigned lo, unsigned hi, ForCand for_cand) {
    __shared__ unsigned long long above_s;
    __shared__ unsigned prefix_s;
    __shared__ int found_s;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    /* every candidate's key lies in [lo, hi]: the top bytes they share need no pass (it would find
     * that byte with no mass above it); the last pass always runs, for T's ties */
    const int known = __clz((int)(lo ^ hi)) / 8, first_shift = known >= 3 ? 0 : 24 - 8 * known;
    if (tid == 0) {
        above_s = row.above;
        prefix_s = first_shift == 24 ? 0u : lo >> (first_shift + 8);
        found_s = 1;
    }
    for (int shift = first_shift; shift >= 0; shift -= 8) {
        for (int i = tid; i < WHOLE_WARPS * DIST_BINS; i += WHOLE_THREADS) {
            wmass[i / DIST_BINS][i % DIST_BINS] = 0;
            wcount[i / DIST_BINS][i % DIST_BINS] = 0;
        }
        __syncthreads();
        const unsigned prefix = prefix_s;
        for_cand([&](unsigned vk, unsigned long long m, bool counted) {
            counted = counted && (shift == 24 || (vk >> (shift + 8)) == prefix);
            warp_hist_add(wmass[warp], wcount[warp], (vk >> shift) & 255u, m, counted);
        });
        __syncthreads();
        for (int i = tid; i < DIST_BINS; i += WHOLE_THREADS) {
            for (int w = 1; w < WHOLE_WARPS; w++) {
                wmass[0][i] += wmass[w][i];
                wcount[0][i] += wcount[w][i];
            }
        }
        __syncthreads();
        if (warp == 0) {
            unsigned long long above = above_s;
            const int p = crossing_bin([&](int i) { return wmass[0][DIST_BINS - 1 - i]; }, &above, row.limit);
            const unsigned b = (unsigned)(DIST_BINS - 1 - p);
            if (lane == 0) {
                if (p < 0) {
                    found_s = 0;
                } else {
                    above_s = above;
                    prefix_s = (prefix << 8) | b;
                    if (shift == 0) {
                        const unsigned n = wcount[0][b];
                        const unsigned long long each = wmass[0][b] / n, keep = (row.limit - above) / each + 1;
                        row.tie_count = n;
                        row.tie_mass = each;
                        row.keep_ties = keep < n ? keep : n;
                        row.tie_limit = keep < n ? -1 : cols;
                    }
                }
            }
        }
        __syncthreads();
        if (!found_s) break;
    }
    if (tid == 0) {
        row.m_found = found_s;
        row.above = above_s;
        row.m_prefix = prefix_s;
    }
}

/* select_crossing among the crossing bin's survivors read from the row itself, each pass (more than
 * the buffer holds crowd the bin); apart, so that its registers do not weigh on the common path */
__device__ __noinline__ void select_crossing_in_row(WholeRow &row, unsigned long long (*wmass)[DIST_BINS],
                                                    unsigned (*wcount)[DIST_BINS], const float *z, int cols,
                                                    const Tempered &tp, unsigned cut, unsigned db) {
    select_crossing(row, wmass, wcount, cols, 0u, 0xffffffffu, [&](auto f) {
        for_span(z, 0, cols, [&](float x, int, bool valid) {
            const bool in = valid && order_key(x) >= cut && tp.bin(x) == db;
            const unsigned long long m = in ? tp.mass(tp.weight(x)) : 0ull;
            f(value_key(order_key(x)), m, m != 0);
        });
    });
}

/* the weights of the draw: 0 for a token not kept */
struct Kept {
    Tempered tp;
    unsigned cut, tie_key;
    int tie_limit;
    bool cut_ties;
    float min_p;
    __device__ __forceinline__ float weight(float x, int j) const {
        const unsigned key = order_key(x);
        if (!(key >= cut)) return 0.0f;
        if (cut_ties) {
            const unsigned vk = value_key(key);
            if (vk < tie_key || (vk == tie_key && j > tie_limit)) return 0.0f;
        }
        const float w = tp.weight(x);
        if (!(w > 0.0f) || (min_p > 0.0f && !(w >= min_p))) return 0.0f;
        return w;
    }
};

/* the sum of the kept weights of a slice in the draw's order; with walk, also each thread's sum
 * before its own, from `start` (the slice's first: the sum before the slice) */
__device__ double slice_sums(const Kept &kp, const float *z, int beg, int end, double start, double *own_out,
                             double *pre_out) {
    __shared__ double lane_sum[WHOLE_THREADS], warp_sum_s[WHOLE_WARPS], warp_pre[WHOLE_WARPS + 1];
    const int tid = threadIdx.x;
    double own = 0.0;
    int j = beg + tid;
    for (; j + 3 * WHOLE_THREADS < end; j += 4 * WHOLE_THREADS) { /* four loads in flight, added in order */
        const float x0 = z[j], x1 = z[j + WHOLE_THREADS], x2 = z[j + 2 * WHOLE_THREADS], x3 = z[j + 3 * WHOLE_THREADS];
        own += (double)kp.weight(x0, j);
        own += (double)kp.weight(x1, j + WHOLE_THREADS);
        own += (double)kp.weight(x2, j + 2 * WHOLE_THREADS);
        own += (double)kp.weight(x3, j + 3 * WHOLE_THREADS);
    }
    for (; j < end; j += WHOLE_THREADS) own += (double)kp.weight(z[j], j);
    lane_sum[tid] = own;
    __syncthreads();
    if ((tid & 31) == 0) { /* each warp's lanes in lane order, the warps side by side */
        double wt = 0.0;
        for (int l = 0; l < 32; l++) wt += lane_sum[tid + l];
        warp_sum_s[tid >> 5] = wt;
    }
    __syncthreads();
    if (tid == 0) {
        double acc = start;
        for (int w = 0; w < WHOLE_WARPS; w++) {
            warp_pre[w] = acc;
            acc += warp_sum_s[w];
        }
        warp_pre[WHOLE_WARPS] = acc;
    }
    __syncthreads();
    if (pre_out) {
        const int w = tid >> 5;
        double acc = warp_pre[w];
        for (int l = 0; l < (tid & 31); l++) acc += lane_sum[32 * w + l];
        *pre_out = acc;
    }
    *own_out = own;
    const double total = warp_pre[WHOLE_WARPS];
    __syncthreads();
    return total;
}

__global__ __launch_bounds__(WHOLE_THREADS) void k_sample_whole(WholeArgs a, int stage, int launch, int shift) {
    CU_PDL_ENTRY();
    __shared__ unsigned long long wmass[WHOLE_WARPS][DIST_BINS];
    __shared__ unsigned wcount[WHOLE_WARPS][DIST_BINS];
    __shared__ int first_nan_s, pick_s;
    __shared__ unsigned max_s, min_inv_s, ties_s, warp_n[WHOLE_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, part = blockIdx.x, r = blockIdx.y;
    const float *z = a.logits + (size_t)r * a.cols;
    const int parts = a.parts, span = a.span;
    const int beg = part * span, end = min(a.cols, beg + span);
    WholeRow &row = a.rows[r];
    unsigned long long *gmass = a.hist_mass + ((size_t)r * WHOLE_LAUNCHES + launch) * DIST_BINS;
    unsigned *gcount = a.hist_count + ((size_t)r * WHOLE_LAUNCHES + launch) * DIST_BINS;

    if (stage == ST_MAX) {
        unsigned kmax = 0, kmin_inv = 0;
        int nan_at = NO_INDEX;
        for_span(z, beg, end, [&](float x, int j, bool valid) {
            if (!valid) return;
            if (x != x) nan_at = min(nan_at, j);
            else kmax = max(kmax, order_key(x));
            if (fabsf(x) <= FLT_MAX) kmin_inv = max(kmin_inv, ~order_key(x));
        });
#pragma unroll
        for (int o = 16; o; o >>= 1) {
            kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
            kmin_inv = max(kmin_inv, __shfl_xor_sync(0xffffffffu, kmin_inv, o));
            nan_at = min(nan_at, __shfl_xor_sync(0xffffffffu, nan_at, o));
        }
        if (tid == 0) {
            max_s = 0;
            min_inv_s = 0;
            first_nan_s = NO_INDEX;
        }
        __syncthreads();
        if (lane == 0) {
            atomicMax(&max_s, kmax);
            atomicMax(&min_inv_s, kmin_inv);
            atomicMin(&first_nan_s, nan_at);
        }
        __syncthreads();
        if (tid == 0) {
            atomicMax(&row.max_key, max_s);
            atomicMax(&row.min_key_inv, min_inv_s);
            if (first_nan_s != NO_INDEX) atomicMax(&row.nan_rank, 0x80000000u - (unsigned)first_nan_s);
            if (part == 0) { /* the later stages' starting state (only they read it) */
                row.cut = 0;
                row.k_prefix = 0;
                row.k_remaining = (unsigned)a.k;
                row.k_found = a.k > 0;
                row.m_found = 0;
                row.m_prefix = 0;
                row.tie_limit = a.cols;
                row.above = 0;
            }
        }
        if (last_block(&row.done[launch], parts) && tid == 0) {
            const unsigned nan = __ldcg(&row.nan_rank);
            if (nan) cu_report_fault(a.fault, CU_FAULT_NAN_LOGIT, r, (int)(0x80000000u - nan));
        }
        return;
    }

    Tempered tp;
    tp.mx = key_value(row.max_key);
    tp.inf_max = isinf(tp.mx);
    tp.inv_t = 1.0f / a.temperature;
    tp.scale = a.mass_scale;
    {
        const float span = row.min_key_inv ? (tp.mx - key_value(~row.min_key_inv)) * tp.inv_t : 0.0f;
        tp.bins_per_unit = tp.inf_max ? 1.0f : span > 0.0f ? (float)(DIST_BINS - 1) / fminf(span, MAX_BIN_SPAN) : 0.0f;
    }
    const unsigned cut = row.cut;

    if (stage == ST_KSELECT || stage == ST_DIST) {
        if (stage == ST_KSELECT && !row.k_found) return;
        for (int i = tid; i < WHOLE_WARPS * DIST_BINS; i += WHOLE_THREADS) {
            wmass[i / DIST_BINS][i % DIST_BINS] = 0;
            wcount[i / DIST_BINS][i % DIST_BINS] = 0;
        }
        __syncthreads();
        unsigned long long *wm = wmass[warp];
        unsigned *wc = wcount[warp];
        if (stage == ST_KSELECT) {
            const unsigned prefix = row.k_prefix;
            for_span(z, beg, end, [&](float x, int, bool valid) {
                const unsigned key = order_key(x);
                const bool counted = valid && (shift == 24 || (key >> (shift + 8)) == prefix);
                warp_count_add(wc, (key >> shift) & 255u, counted);
            });
        } else {
            for_span(z, beg, end, [&](float x, int, bool valid) {
                const unsigned long long m = valid && order_key(x) >= cut ? tp.mass(tp.weight(x)) : 0ull;
                warp_hist_add(wm, wc, tp.bin(x), m, m != 0);
            });
        }
        __syncthreads();
        merge_hist(wmass, wcount, gmass, gcount, stage != ST_KSELECT);
        if (!last_block(&row.done[launch], parts) || warp != 0) return;
        if (stage == ST_KSELECT) {
            unsigned rem = row.k_remaining;
            const int b = counted_bin([&](int i) { return __ldcg(&gcount[i]); }, &rem);
            if (lane == 0) {
                row.k_found = b >= 0;
                row.k_remaining = rem;
                row.k_prefix = (row.k_prefix << 8) | (unsigned)(b & 255);
                if (shift == 0) row.cut = b >= 0 ? row.k_prefix : 0u;
            }
        } else {
            unsigned long long total = 0;
            for (int i = lane; i < DIST_BINS; i += 32) total += __ldcg(&gmass[i]);
#pragma unroll
            for (int o = 16; o; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
            const unsigned long long limit = scaled_floor(a.top_p, total);
            unsigned long long above = 0;
            const int b = crossing_bin([&](int i) { return __ldcg(&gmass[i]); }, &above, limit);
            if (lane == 0) {
                row.limit = limit;
                row.above = above;
                row.m_found = b >= 0;
                row.dist_bin = (unsigned)b;
                row.gather = b >= 0 && __ldcg(&gcount[b]) <= (unsigned)a.cand_cap;
            }
        }
        return;
    }

    if (stage == ST_SELECT) {
        if (!row.m_found) return;
        const unsigned db = row.dist_bin;
        /* the mass of a survivor in the crossing bin, as DIST counted them; 0 for any other */
        auto bin_mass = [&](float x, bool valid) {
            return valid && order_key(x) >= cut && tp.bin(x) == db ? tp.mass(tp.weight(x)) : 0ull;
        };
        unsigned *ck = a.cand_key + (size_t)r * a.cand_cap;
        unsigned long long *cm = a.cand_mass + (size_t)r * a.cand_cap;
        const bool gather = row.gather;
        if (gather) {
            unsigned lo_inv = 0, hi = 0;
            for_span(z, beg, end, [&](float x, int, bool valid) {
                const unsigned long long m = bin_mass(x, valid);
                const bool want = m != 0;
                if (!__any_sync(0xffffffffu, want)) return;
                const unsigned slot = warp_append(want, &row.gather_n), vk = value_key(order_key(x));
                if (want) {
                    lo_inv = max(lo_inv, ~vk);
                    hi = max(hi, vk);
                }
                if (want && slot < (unsigned)a.cand_cap) { /* DIST counted at most cand_cap of them */
                    ck[slot] = vk;
                    cm[slot] = m;
                }
            });
#pragma unroll
            for (int o = 16; o; o >>= 1) {
                lo_inv = max(lo_inv, __shfl_xor_sync(0xffffffffu, lo_inv, o));
                hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
            }
            if (lane == 0 && hi) {
                atomicMax(&row.gather_lo_inv, lo_inv);
                atomicMax(&row.gather_hi, hi);
            }
        }
        if (!last_block(&row.done[launch], parts)) return;
        if (gather) {
            const int n = (int)min(__ldcg(&row.gather_n), (unsigned)a.cand_cap);
            const unsigned lo = ~__ldcg(&row.gather_lo_inv), hi = __ldcg(&row.gather_hi);
            select_crossing(row, wmass, wcount, a.cols, lo, hi, [&](auto f) {
                for (int base = 0; base < n; base += GATHER_LOADS * WHOLE_THREADS) {
                    unsigned key[GATHER_LOADS];
                    unsigned long long mass[GATHER_LOADS];
#pragma unroll
                    for (int u = 0; u < GATHER_LOADS; u++) { /* in flight together: a pass is a few round trips */
                        const int i = base + u * WHOLE_THREADS + tid;
                        key[u] = i < n ? __ldcg(&ck[i]) : 0u;
                        mass[u] = i < n ? __ldcg(&cm[i]) : 0ull;
                    }
#pragma unroll
                    for (int u = 0; u < GATHER_LOADS; u++) f(key[u], mass[u], base + u * WHOLE_THREADS + tid < n);
                }
            });
        } else {
            select_crossing_in_row(row, wmass, wcount, z, a.cols, tp, cut, db);
        }
        return;
    }

    const bool cut_ties = a.top_p < 1.0f && row.m_found;
    const unsigned tie_key = row.m_prefix;
    if (stage == ST_TIES) {
        if (!cut_ties || row.tie_limit >= 0) return;
        auto is_tie = [&](float x) {
            const unsigned key = order_key(x);
            return key >= cut && value_key(key) == tie_key;
        };
        unsigned n = 0;
        for (int j = beg + tid; j < end; j += WHOLE_THREADS) n += is_tie(z[j]);
#pragma unroll
        for (int o = 16; o; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
        if (tid == 0) ties_s = 0;
        __syncthreads();
        if (lane == 0) atomicAdd(&ties_s, n);
        __syncthreads();
        if (tid == 0) a.part_ties[(size_t)r * a.parts + part] = ties_s;
        if (!last_block(&row.done[launch], parts)) return;
        /* the slice holding the keep_ties-th tie, then that tie in index order */
        if (tid == 0) {
            unsigned long long before = 0;
            int p = 0;
            for (; p < parts; p++) {
                const unsigned long long t = __ldcg(&a.part_ties[(size_t)r * a.parts + p]);
                if (before + t >= row.keep_ties) break;
                before += t;
            }
            pick_s = p;
            ties_s = (unsigned)(row.keep_ties - before); /* the rank wanted inside slice p */
        }
        __syncthreads();
        const int pb = pick_s * span, pe = min(a.cols, pb + span);
        unsigned seen = 0;
        for (int base = pb; base < pe && seen < ties_s; base += WHOLE_THREADS) {
            const int j = base + tid;
            const bool t = j < pe && is_tie(z[j]);
            const unsigned ballot = __ballot_sync(0xffffffffu, t);
            if (lane == 0) warp_n[warp] = (unsigned)__popc(ballot);
            __syncthreads();
            unsigned off = seen;
            for (int w = 0; w < warp; w++) off += warp_n[w];
            const unsigned rank = off + (unsigned)__popc(ballot & lanes_below()) + 1;
            if (t && rank == ties_s) row.tie_limit = j;
            for (int w = 0; w < WHOLE_WARPS; w++) seen += warp_n[w];
            __syncthreads();
        }
        return;
    }

    /* ST_DRAW */
    Kept kp;
    kp.tp = tp;
    kp.cut = cut;
    kp.tie_key = tie_key;
    kp.tie_limit = row.tie_limit;
    kp.cut_ties = cut_ties;
    kp.min_p = a.min_p;
    double own;
    const double sum = slice_sums(kp, z, beg, end, 0.0, &own, nullptr);
    if (tid == 0) a.part_sum[(size_t)r * a.parts + part] = sum;
    if (!last_block(&row.done[launch], parts)) return;
    __shared__ double start_s, u_s, part_s[WHOLE_MAX_PARTS];
    if (tid < parts) part_s[tid] = __ldcg(&a.part_sum[(size_t)r * a.parts + tid]); /* one round trip, not one a slice */
    __syncthreads();
    if (tid == 0) {
        const uint64_t step = a.step_dev ? (uint64_t)*a.step_dev : a.step;
        double acc = 0.0, pick_start = 0.0;
        int pick = -1;
        for (int p = 0; p < parts; p++) acc += part_s[p]; /* the row's total: pre of the slices are its prefixes */
        const uint64_t rr = mix64(mix64(a.seed ^ 0x9e3779b97f4a7c15ULL) + step * 0xd1b54a32d192ed03ULL + (uint64_t)r);
        const double u = (double)(rr >> 11) * (1.0 / 9007199254740992.0) * acc;
        double pre = 0.0;
        for (int p = 0; p < parts; p++) {
            const double t = part_s[p];
            if (t > 0.0 && pre <= u) {
                pick = p;
                pick_start = pre;
            }
            pre += t;
        }
        pick_s = pick;
        start_s = pick_start;
        u_s = u;
    }
    __syncthreads();
    const int pick = pick_s;
    if (pick < 0) { /* no weight anywhere: a row of NaNs (reported) */
        if (tid == 0) a.out[r] = row.nan_rank ? (int)(0x80000000u - row.nan_rank) : 0;
        return;
    }
    const int pb = pick * span, pe = min(a.cols, pb + span);
    double pre;
    slice_sums(kp, z, pb, pe, start_s, &own, &pre);
    const double u = u_s;
    if (tid == 0) pick_s = -1;
    __syncthreads();
    if (own > 0.0 && pre <= u) atomicMax(&pick_s, tid);
    __syncthreads();
    if (tid == pick_s) {
        double cum = pre;
        int last = -1, hit = -1;
        for (int j = pb + tid; j < pe; j += WHOLE_THREADS) {
            const float w = kp.weight(z[j], j);
            if (!(w > 0.0f)) continue;
            cum += (double)w;
            last = j;
            if (u < cum) {
                hit = j;
                break;
            }
        }
        a.out[r] = hit >= 0 ? hit : last;
    }
}

/* the whole-row draw's launches (k 0: no top-k) */
static xo_status whole_row(CuCtx *c, int32_t *out, const float *logits, int rows, int cols, int k, float temperature,
                           float top_p, float min_p, uint64_t seed, uint64_t step, const int32_t *step_dev) {
    int parts = (cols + WHOLE_SPAN_MIN - 1) / WHOLE_SPAN_MIN;
    if (parts > WHOLE_MAX_PARTS) parts = WHOLE_MAX_PARTS;
    const int span = ((cols + parts - 1) / parts + 3) & ~3;
    parts = (cols + span - 1) / span;
    int bits = 0;
    while (bits < 31 && (1L << bits) < (long)cols) bits++;
    const size_t per_row = sizeof(WholeRow) + (size_t)WHOLE_LAUNCHES * DIST_BINS * 12 + (size_t)parts * 12;
    char *buf = (char *)cu_alloc(c, (size_t)rows * per_row); /* zero-filled: the counters and histograms */
    if (!buf) return cu_fail_more(c, XO_ENOMEM, "device sampling (%d rows)", rows);
    WholeArgs a;
    a.out = out;
    a.logits = logits;
    a.cols = cols;
    a.k = k;
    a.parts = parts;
    a.span = span;
    a.temperature = temperature;
    a.top_p = top_p;
    a.min_p = min_p;
    a.mass_scale = ldexpf(1.0f, 62 - bits); /* a row's masses sum below 2^62 */
    a.seed = seed;
    a.step = step;
    a.step_dev = step_dev;
    a.fault = c->fault_dev;
    a.hist_mass = (unsigned long long *)buf;
    a.part_sum = (double *)(a.hist_mass + (size_t)rows * WHOLE_LAUNCHES * DIST_BINS);
    a.rows = (WholeRow *)(a.part_sum + (size_t)rows * parts);
    a.hist_count = (unsigned *)(a.rows + rows);
    a.part_ties = a.hist_count + (size_t)rows * WHOLE_LAUNCHES * DIST_BINS;
    a.cand_key = nullptr;
    a.cand_mass = nullptr;
    a.cand_cap = 0;
    char *cand = nullptr;
    if (top_p < 1.0f) {
        size_t cap = GATHER_BYTES / 12 / (size_t)rows;
        if (cap > GATHER_CAP) cap = GATHER_CAP;
        if (cap < GATHER_CAP_MIN) cap = GATHER_CAP_MIN;
        if (cap > (size_t)cols) cap = (size_t)cols;
        cand = (char *)cu_alloc_raw(c, (size_t)rows * cap * 12);
        if (!cand) {
            cu_free(c, buf);
            return cu_fail_more(c, XO_ENOMEM, "device sampling (%d rows)", rows);
        }
        a.cand_mass = (unsigned long long *)cand;
        a.cand_key = (unsigned *)(a.cand_mass + (size_t)rows * cap);
        a.cand_cap = (int)cap;
    }
    const dim3 grid((unsigned)parts, (unsigned)rows);
    int launch = 0;
    cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_MAX, launch++, 0);
    for (int shift = 24; k > 0 && shift >= 0; shift -= 8)
        cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_KSELECT, launch++, shift);
    if (top_p < 1.0f) {
        cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_DIST, launch++, 0);
        cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_SELECT, launch++, 0);
        cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_TIES, launch++, 0);
    }
    cu_launch(c, k_sample_whole, grid, WHOLE_THREADS, 0, a, (int)ST_DRAW, launch++, 0);
    if (cand) cu_free(c, cand);
    cu_free(c, buf);
    return cu_check_launch(c, "sample_rows");
}


xo_status cu_sample_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols, float temperature,
                         int top_k, float top_p, float min_p, uint64_t seed, uint64_t step, const int32_t *step_dev) {
    CuCtx *c = cu_ctx(be);
    if (rows <= 0 || cols <= 0) return XO_OK;
    if (top_k < 0 || !(temperature > 0.0f) || !(top_p >= 0.0f && top_p <= 1.0f) || !(min_p >= 0.0f && min_p <= 1.0f))
        return cu_fail(c, XO_EINVAL, "device sampling needs top_k >= 0, temperature > 0, 0 <= top_p <= 1 and 0 <= min_p <= 1");
    if (rows > 65535) return cu_fail(c, XO_EINVAL, "device sampling takes at most 65535 rows at once (got %d)", rows);
    if (top_k == 0 || top_k > TOP_K_CANDIDATES) return whole_row(c, out, logits, rows, cols, top_k < cols ? top_k : 0,
                                                               temperature, top_p, min_p, seed, step, step_dev);
    const int k = top_k < cols ? top_k : cols;
    /* parts of PART_SPAN_MIN columns at least, enough to spread a few rows over the GPU (more rows
     * fill it themselves), few enough that their candidates (about k each) fit the final block */
    int parts = (cols + PART_SPAN_MIN - 1) / PART_SPAN_MIN;
    const int spread = (2 * c->num_sms + rows - 1) / rows, fit = UNION_CAP / (2 * k);
    if (parts > spread) parts = spread;
    if (parts > fit) parts = fit;
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    if (parts < 1) parts = 1;
    const int span = ((cols + parts - 1) / parts + 3) & ~3;
    parts = (cols + span - 1) / span;
    const int cap = span < 2 * k + 128 ? span : 2 * k + 128; /* k and some: more means ties, the fallback */
    const size_t slots = (size_t)rows * parts;

    cudaError_t e = cudaFuncSetAttribute(k_sample_final, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)FINAL_SMEM);
    if (e != cudaSuccess) return cu_check(c, e, "sample_rows (shared memory)");
    char *buf = (char *)cu_alloc_raw(c, slots * (3 + 2 * (size_t)cap) * 4);
    if (!buf) return cu_fail_more(c, XO_ENOMEM, "device sampling (%d rows)", rows);
    PartBuf b;
    b.count = (int *)buf;
    b.thr = (unsigned *)(b.count + slots);
    b.nan_at = (int *)(b.thr + slots);
    b.key = (unsigned *)(b.nan_at + slots);
    b.idx = (int *)(b.key + slots * cap);
    b.parts = parts;
    b.span = span;
    b.cap = cap;
    cu_launch(c, k_sample_part, dim3((unsigned)parts, (unsigned)rows), k <= PART_THREADS ? PART_THREADS : PART_THREADS_WIDE,
              0, b, logits, cols, k);
    cu_launch(c, k_sample_final, rows, FINAL_THREADS, FINAL_SMEM, out, b, logits, cols, k, temperature, top_p, min_p, seed,
              step, step_dev, c->fault_dev);
    cu_free(c, buf);
    return cu_check_launch(c, "sample_rows");
}
