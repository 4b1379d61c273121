/* Next-token draws on the GPU (SPEC section 7): temperature, top-k, nucleus, min-p, draw, so that
 * sampling needs no copy of the logits to the host. Keys are the floats mapped to unsigned
 * integers of the same order (+0 above -0). A row is spread over many blocks, two launches:
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
 * the GPU every time (they differ from the CPU's stream). */
#include "backends/cuda/common.h"

enum {
    SAMPLE_CAP = 2048,        /* survivors kept */
    ABOVE_CAP = XO_DEVICE_TOP_K_MAX, /* survivors above the cut's value: fewer than k */
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
        if (tid < 32) { /* lane l: bins 255 - 8 l down to 248 - 8 l; the first bin the count from the top reaches */
            unsigned c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                c[j] = s.hist[255 - 8 * lane - j];
                sum += c[j];
            }
            unsigned incl = sum;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const unsigned t = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += t;
            }
            const unsigned rem = s.remaining, reach = __ballot_sync(0xffffffffu, incl >= rem);
            if (lane == 0) s.found = reach != 0;
            if (reach && lane == __ffs(reach) - 1) {
                unsigned cum = incl - sum;
                int j = 0;
                while (j < 7 && cum + c[j] < rem) cum += c[j++];
                s.remaining = rem - cum;
                s.prefix = (prefix << 8) | (unsigned)(255 - 8 * lane - j);
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

xo_status cu_sample_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols, float temperature,
                         int top_k, float top_p, float min_p, uint64_t seed, uint64_t step, const int32_t *step_dev) {
    CuCtx *c = cu_ctx(be);
    if (rows <= 0 || cols <= 0) return XO_OK;
    if (top_k < 1 || top_k > XO_DEVICE_TOP_K_MAX || !(temperature > 0.0f) || !(min_p >= 0.0f && min_p <= 1.0f))
        return cu_fail(c, XO_EINVAL, "device sampling needs 1 <= top_k <= %d, temperature > 0 and 0 <= min_p <= 1",
                       XO_DEVICE_TOP_K_MAX);
    if (rows > 65535) return cu_fail(c, XO_EINVAL, "device sampling takes at most 65535 rows at once (got %d)", rows);
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
