/* Next-token draws on the GPU (SPEC section 7): temperature, top-k, nucleus, draw, so that
 * sampling needs no copy of the logits to the host. One block per row, one launch:
 * 1. one read of the row: each thread keeps its two largest keys; the k-th largest of those
 *    2 x threads keys, T, is at most the row's k-th largest (k distinct values reach it), and
 *    few others reach it unless one thread holds many of the top values;
 * 2. a second read gathers the candidates (keys >= T); they are sorted, and the k-th of the
 *    sorted list gives the exact cut. Should the candidates overflow the shared arrays, an
 *    exact radix select (8 bits a pass over the row) finds the k-th key first;
 * 3. temperature, nucleus, min-p and the draw over the survivors.
 * Semantics as xo_sample_row in csrc/engine/sampling.c: top-k keeps every value tied with the
 * k-th; the nucleus keeps the top-1 and the token that crosses top_p. The generator is
 * counter-based (seed, step, row), so a seed gives the same draws on the GPU every time (they
 * differ from the CPU's stream). */
#include "backends/cuda/common.h"

enum { SAMPLE_THREADS = 1024, SAMPLE_CAP = 2048, SAMPLE_POOL = 2 * SAMPLE_THREADS };

/* float -> unsigned key with the same order */
__device__ __forceinline__ unsigned order_key(float x) {
    unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* f(x, j) for every element of a row, 16-byte loads where the row allows (rows of an odd
 * width start anywhere) */
template <typename F> __device__ __forceinline__ void for_row(const float *z, int cols, F f) {
    const int head = min(cols, (int)((4 - (((uintptr_t)z >> 2) & 3)) & 3));
    if ((int)threadIdx.x < head) f(z[threadIdx.x], (int)threadIdx.x);
    const float4 *body = (const float4 *)(z + head);
    const int nb = (cols - head) >> 2;
    int i = threadIdx.x;
    for (; i + 3 * SAMPLE_THREADS < nb; i += 4 * SAMPLE_THREADS) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = body[i + u * SAMPLE_THREADS];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int j = head + 4 * (i + u * SAMPLE_THREADS);
            f(v[u].x, j);
            f(v[u].y, j + 1);
            f(v[u].z, j + 2);
            f(v[u].w, j + 3);
        }
    }
    for (; i < nb; i += SAMPLE_THREADS) {
        const float4 v = body[i];
        const int j = head + 4 * i;
        f(v.x, j);
        f(v.y, j + 1);
        f(v.z, j + 2);
        f(v.w, j + 3);
    }
    const int done = head + 4 * nb, tail = (int)threadIdx.x + done;
    if (tail < cols) f(z[tail], tail);
}

/* keys[0 .. n) (n a power of two, at most 2 * blockDim) sorted descending in place */
__device__ void sort_keys_desc(unsigned *keys, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int jj = i ^ stride;
                if (jj > i) {
                    const bool descending_block = (i & size) == 0;
                    if ((keys[i] < keys[jj]) == descending_block) {
                        const unsigned t = keys[i];
                        keys[i] = keys[jj];
                        keys[jj] = t;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__global__ __launch_bounds__(SAMPLE_THREADS) void k_sample_rows(int32_t *out, const float *__restrict__ logits, int cols,
                                                                int k, float temperature, float top_p, float min_p, uint64_t seed,
                                                                uint64_t step, const int32_t *step_dev, CuFault *fault) {
    CU_PDL_ENTRY();
    if (step_dev) step = (uint64_t)*step_dev;
    __shared__ float val[SAMPLE_CAP];
    __shared__ int idx[SAMPLE_CAP];
    __shared__ double ev[SAMPLE_CAP];
    __shared__ unsigned pool[SAMPLE_POOL];
    __shared__ unsigned hist[256];
    __shared__ unsigned taken, sel_prefix, sel_remaining;
    const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31;
    const float *z = logits + (size_t)r * cols;

    /* 1. the two largest keys of each thread (0: none); a NaN is reported as the CPU sampler does */
    unsigned t1 = 0, t2 = 0;
    int nan_at = -1;
    for_row(z, cols, [&](float x, int j) {
        if (x != x && nan_at < 0) nan_at = j;
        const unsigned key = order_key(x);
        if (key > t1) {
            t2 = t1;
            t1 = key;
        } else if (key > t2) {
            t2 = key;
        }
    });
    if (nan_at >= 0) cu_report_fault(fault, CU_FAULT_NAN_LOGIT, r, nan_at);
    pool[2 * tid] = t1;
    pool[2 * tid + 1] = t2;
    if (tid == 0) taken = 0;
    __syncthreads();
    sort_keys_desc(pool, SAMPLE_POOL);
    unsigned thr = pool[k - 1];
    bool exact = false; /* thr is the k-th key itself (from the radix select) */

    /* 2. gather the candidates (key >= thr), one shared atomic a warp */
    for (int attempt = 0; attempt < 2; attempt++) {
        for_row(z, cols, [&](float x, int j) {
            const bool want = order_key(x) >= thr;
            const unsigned ballot = __ballot_sync(__activemask(), want);
            if (!want) return;
            const int leader = __ffs(ballot) - 1;
            unsigned base = 0;
            if (lane == leader) base = atomicAdd(&taken, (unsigned)__popc(ballot));
            base = __shfl_sync(ballot, base, leader);
            const unsigned slot = base + __popc(ballot & ((1u << lane) - 1u));
            if (slot < SAMPLE_CAP) {
                val[slot] = x;
                idx[slot] = j;
            }
        });
        __syncthreads();
        if (taken <= SAMPLE_CAP || attempt == 1) break;
        /* too many candidates: the exact k-th key by radix select over the row, then gather again
         * (only keys tied with the k-th can still overflow; the first SAMPLE_CAP of them are kept) */
        if (tid == 0) {
            sel_prefix = 0;
            sel_remaining = (unsigned)k;
        }
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += SAMPLE_THREADS) hist[i] = 0;
            __syncthreads();
            const unsigned want = sel_prefix;
            for_row(z, cols, [&](float x, int) {
                const unsigned key = order_key(x);
                if (shift == 24 || (key >> (shift + 8)) == want) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            });
            __syncthreads();
            if (tid == 0) {
                unsigned cum = 0, rem = sel_remaining;
                int b = 255;
                for (; b > 0; b--) {
                    if (cum + hist[b] >= rem) break;
                    cum += hist[b];
                }
                sel_remaining = rem - cum;
                sel_prefix = (sel_prefix << 8) | (unsigned)b;
            }
            __syncthreads();
        }
        thr = sel_prefix;
        exact = true;
        if (tid == 0) taken = 0;
        __syncthreads();
    }
    const int m = taken < SAMPLE_CAP ? (int)taken : SAMPLE_CAP;
    int n2 = 1;
    while (n2 < m) n2 <<= 1;
    for (int i = m + tid; i < n2; i += SAMPLE_THREADS) {
        val[i] = -INFINITY;
        idx[i] = 0x7fffffff;
    }
    __syncthreads();
    /* bitonic sort: value descending, index ascending on ties */
    for (int size = 2; size <= n2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < n2; i += SAMPLE_THREADS) {
                const int jj = i ^ stride;
                if (jj > i) {
                    const bool first_before = val[i] > val[jj] || (val[i] == val[jj] && idx[i] < idx[jj]);
                    const bool ascending_block = (i & size) == 0;
                    if (ascending_block != first_before) {
                        float tv = val[i]; val[i] = val[jj]; val[jj] = tv;
                        int ti = idx[i]; idx[i] = idx[jj]; idx[jj] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    /* the survivors: keys >= the k-th largest key. In value order that is a prefix of the sorted
     * candidates, except when the cut falls on +0 with -0 beside it (equal values, ordered by
     * index, different keys): then the -0 entries are dropped in place. */
    if (tid == 0) {
        int ms = m;
        if (!exact) { /* the cut from the sorted list (every candidate survives an exact threshold) */
            const int kk = k < m ? k : m;
            const float v = val[kk - 1];
            unsigned cut = order_key(v);
            if (v == 0.0f) {
                int c_pos = 0;
                for (int i = 0; i < m; i++) c_pos += val[i] > 0.0f || (val[i] == 0.0f && !(__float_as_uint(val[i]) >> 31));
                cut = kk <= c_pos ? order_key(0.0f) : order_key(-0.0f);
            }
            int w = 0;
            for (int i = 0; i < m; i++) {
                if (order_key(val[i]) >= cut) {
                    val[w] = val[i];
                    idx[w] = idx[i];
                    w++;
                } else if (val[i] != 0.0f) {
                    break; /* below the cut and not a zero: so is everything after it */
                }
            }
            ms = w;
        }
        taken = (unsigned)ms;
    }
    __syncthreads();
    const int ms = (int)taken;
    /* 3. temperature, nucleus and the draw. The temperature divides the distance to the row's
     * maximum, in double: that cannot overflow however small the temperature (a +inf maximum
     * leaves only its ties). Each term is computed by its own thread; the sums run in order on
     * one thread, so the draw does not depend on the thread count. */
    const double mx = val[0], temp = temperature;
    __syncthreads();
    for (int i = tid; i < ms; i += SAMPLE_THREADS) {
        const float v = mx == INFINITY ? (val[i] == INFINITY ? 0.0f : -INFINITY)
                                       : (float)fmax(((double)val[i] - mx) / temp, -1e30);
        ev[i] = exp((double)v);
    }
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int i = 0; i < ms; i++) total += ev[i];
        int kept = ms;
        if (top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < ms; i++) {
                if (i > 0 && cum > top_p) { kept = i; break; }
                cum += ev[i] / total;
            }
        }
        if (min_p > 0.0f) { /* after the nucleus: drop what is below min_p times the top probability
                             * (ev is exp(v - max), non-increasing along the sorted survivors) */
            int floor_kept = 1;
            while (floor_kept < kept && ev[floor_kept] >= (double)min_p) floor_kept++;
            kept = floor_kept;
        }
        double kept_total = 0.0;
        for (int i = 0; i < kept; i++) kept_total += ev[i];
        const uint64_t rr = mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) + step * 0xd1b54a32d192ed03ULL + blockIdx.x);
        const double u = (double)(rr >> 11) * (1.0 / 9007199254740992.0) * kept_total;
        double cum = 0.0;
        int pick = idx[kept - 1];
        for (int i = 0; i < kept; i++) {
            cum += ev[i];
            if (u < cum) { pick = idx[i]; break; }
        }
        out[blockIdx.x] = pick;
    }
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
    cu_launch(c, k_sample_rows, rows, SAMPLE_THREADS, 0, out, logits, cols, k, temperature, top_p, min_p, seed, step, step_dev,
              c->fault_dev);
    return cu_check_launch(c, "sample_rows");
}
