/* Next-token draws on the GPU (SPEC section 7): temperature, top-k, nucleus, draw, one block per
 * row, so that sampling needs no copy of the logits to the host. Semantics as xo_sample_row in
 * csrc/xo_sampling.c: top-k keeps every value tied with the k-th; the nucleus keeps the top-1 and
 * the token that crosses top_p. The generator is counter-based (seed, step, row), so a seed gives
 * the same draws on the GPU every time (they differ from the CPU's stream). */
#include "cu_common.h"

enum { SAMPLE_THREADS = 1024, SAMPLE_CAP = 2048 };

/* float -> unsigned key with the same order */
__device__ __forceinline__ unsigned order_key(float x) {
    unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned block_count(unsigned mine, unsigned *red) {
    for (int off = 16; off > 0; off >>= 1) mine += __shfl_down_sync(0xffffffffu, mine, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[warp] = mine;
    __syncthreads();
    if (warp == 0) {
        unsigned v = lane < (int)(blockDim.x / 32) ? red[lane] : 0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    return red[0];
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__global__ void k_sample_rows(int32_t *out, const float *__restrict__ logits, int cols, float inv_temp, int top_k,
                              float top_p, uint64_t seed, uint64_t step, const int32_t *step_dev) {
    if (step_dev) step = (uint64_t)*step_dev;
    __shared__ unsigned red[32];
    __shared__ float val[SAMPLE_CAP];
    __shared__ int idx[SAMPLE_CAP];
    __shared__ unsigned taken;
    const float *z = logits + (size_t)blockIdx.x * cols;
    const int k = top_k < cols ? top_k : cols;

    /* 1. the k-th largest value, by a most-significant-bit-first radix select on the keys */
    unsigned prefix = 0;
    for (int bit = 31; bit >= 0; bit--) {
        const unsigned cand = prefix | (1u << bit);
        unsigned mine = 0;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) mine += order_key(z[j]) >= cand;
        if (block_count(mine, red) >= (unsigned)k) prefix = cand;
    }
    /* 2. gather the survivors (values >= the k-th; ties included) */
    if (threadIdx.x == 0) taken = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        if (order_key(z[j]) >= prefix) {
            const unsigned slot = atomicAdd(&taken, 1u);
            if (slot < SAMPLE_CAP) { val[slot] = z[j] * inv_temp; idx[slot] = j; }
        }
    }
    __syncthreads();
    const int m = taken < SAMPLE_CAP ? (int)taken : SAMPLE_CAP;
    int n2 = 1;
    while (n2 < m) n2 <<= 1;
    for (int i = m + threadIdx.x; i < n2; i += blockDim.x) { val[i] = -INFINITY; idx[i] = 0x7fffffff; }
    __syncthreads();
    /* 3. bitonic sort: value descending, index ascending on ties */
    for (int size = 2; size <= n2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n2; i += blockDim.x) {
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
    /* 4. nucleus and the draw (at most SAMPLE_CAP candidates: one thread is enough) */
    if (threadIdx.x == 0) {
        const double mx = val[0];
        double total = 0.0;
        for (int i = 0; i < m; i++) total += exp((double)val[i] - mx);
        int kept = m;
        if (top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < m; i++) {
                if (i > 0 && cum > top_p) { kept = i; break; }
                cum += exp((double)val[i] - mx) / total;
            }
        }
        double kept_total = 0.0;
        for (int i = 0; i < kept; i++) kept_total += exp((double)val[i] - mx);
        const uint64_t r = mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) + step * 0xd1b54a32d192ed03ULL + blockIdx.x);
        const double u = (double)(r >> 11) * (1.0 / 9007199254740992.0) * kept_total;
        double cum = 0.0;
        int pick = idx[kept - 1];
        for (int i = 0; i < kept; i++) {
            cum += exp((double)val[i] - mx);
            if (u < cum) { pick = idx[i]; break; }
        }
        out[blockIdx.x] = pick;
    }
}

xo_status cu_sample_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols, float temperature,
                         int top_k, float top_p, uint64_t seed, uint64_t step, const int32_t *step_dev) {
    CuCtx *c = cu_ctx(be);
    if (rows <= 0 || cols <= 0) return XO_OK;
    if (top_k < 1 || top_k > XO_DEVICE_TOP_K_MAX || !(temperature > 0.0f))
        return cu_fail(c, XO_EINVAL, "device sampling needs 1 <= top_k <= %d and temperature > 0", XO_DEVICE_TOP_K_MAX);
    k_sample_rows<<<rows, SAMPLE_THREADS, 0, c->stream>>>(out, logits, cols, 1.0f / temperature, top_k, top_p, seed, step,
                                                          step_dev);
    return cu_check_launch(c, "sample_rows");
}
