/* Next-token draws on the GPU (SPEC section 7): temperature, top-k, nucleus, draw, so that
 * sampling needs no copy of the logits to the host. The k-th largest logit of each row is
 * found by a radix select of 8 bits a pass, each pass a histogram over many blocks; then one
 * block per row gathers the survivors, sorts them and draws. Semantics as xo_sample_row in
 * csrc/engine/sampling.c: top-k keeps every value tied with the k-th; the nucleus keeps the top-1 and
 * the token that crosses top_p. The generator is counter-based (seed, step, row), so a seed gives
 * the same draws on the GPU every time (they differ from the CPU's stream). */
#include "backends/cuda/common.h"

enum { SAMPLE_THREADS = 1024, SAMPLE_CAP = 2048 };

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

/* The k-th largest key of each row by radix select, 8 bits a pass, spread over many blocks:
 * sel[r] = {prefix of the k-th key so far, how many keys still to skip inside it}. */
struct TopkSel {
    unsigned prefix, remaining;
};

enum { HIST_BLOCKS_PER_ROW = 64 };

/* pass `shift` (24, 16, 8, 0): count the digit (key >> shift) & 255 of the keys whose higher
 * bits equal the prefix found so far. The first pass reads every logit, so it also reports a
 * NaN as a fault (as the CPU sampler does; one atomic a thread, only when it met one). */
__global__ void k_topk_hist(unsigned *hist, const TopkSel *__restrict__ sel, const float *__restrict__ logits, int cols,
                            int shift, CuFault *fault) {
    CU_PDL_ENTRY();
    __shared__ unsigned h[256];
    const int r = blockIdx.y;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
    __syncthreads();
    const float *z = logits + (size_t)r * cols;
    const unsigned want = sel[r].prefix;
    int nan_at = -1;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
        const float x = z[j];
        if (x != x && nan_at < 0) nan_at = j;
        const unsigned key = order_key(x);
        if (shift == 24 || (key >> (shift + 8)) == want) atomicAdd(&h[(key >> shift) & 255u], 1u);
    }
    if (shift == 24 && nan_at >= 0) cu_report_fault(fault, CU_FAULT_NAN_LOGIT, r, nan_at);
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (h[i]) atomicAdd(&hist[(size_t)r * 256 + i], h[i]);
}

/* one warp per row: the digit holding the k-th key, from the top; the histogram is cleared */
__global__ void k_topk_pick(unsigned *hist, TopkSel *sel, int rows) {
    CU_PDL_ENTRY();
    const int r = blockIdx.x;
    if (r >= rows || threadIdx.x) return;
    unsigned *hr = hist + (size_t)r * 256;
    TopkSel t = sel[r];
    unsigned cum = 0;
    int b = 255;
    for (; b > 0; b--) {
        if (cum + hr[b] >= t.remaining) break;
        cum += hr[b];
    }
    t.remaining -= cum;
    t.prefix = (t.prefix << 8) | (unsigned)b;
    sel[r] = t;
    for (int i = 0; i < 256; i++) hr[i] = 0;
}

__global__ void k_topk_init(TopkSel *sel, unsigned *hist, int rows, int k) {
    CU_PDL_ENTRY();
    for (int i = threadIdx.x; i < rows; i += blockDim.x) {
        sel[i].prefix = 0;
        sel[i].remaining = (unsigned)k;
    }
    for (int i = threadIdx.x; i < rows * 256; i += blockDim.x) hist[i] = 0;
}

__global__ void k_sample_rows(int32_t *out, const float *__restrict__ logits, int cols, float temperature, float top_p, uint64_t seed, uint64_t step, const int32_t *step_dev,
                              const TopkSel *__restrict__ sel) {
    CU_PDL_ENTRY();
    if (step_dev) step = (uint64_t)*step_dev;
    __shared__ float val[SAMPLE_CAP];
    __shared__ int idx[SAMPLE_CAP];
    __shared__ unsigned taken;
    const float *z = logits + (size_t)blockIdx.x * cols;
    /* 1. the k-th largest key, found by the passes before */
    const unsigned prefix = sel[blockIdx.x].prefix;
    /* 2. gather the survivors (values >= the k-th; ties included) */
    if (threadIdx.x == 0) taken = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        if (order_key(z[j]) >= prefix) {
            const unsigned slot = atomicAdd(&taken, 1u);
            if (slot < SAMPLE_CAP) { val[slot] = z[j]; idx[slot] = j; }
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
    /* 4. temperature, nucleus and the draw (at most SAMPLE_CAP candidates: one thread is
     * enough). The temperature divides the distance to the row's maximum, in double: that
     * cannot overflow however small the temperature (a +inf maximum leaves only its ties). */
    if (threadIdx.x == 0) {
        const double mx = val[0], temp = temperature;
        for (int i = 0; i < m; i++)
            val[i] = mx == INFINITY ? (val[i] == INFINITY ? 0.0f : -INFINITY)
                                    : (float)fmax(((double)val[i] - mx) / temp, -1e30);
        double total = 0.0;
        for (int i = 0; i < m; i++) total += exp((double)val[i]);
        int kept = m;
        if (top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < m; i++) {
                if (i > 0 && cum > top_p) { kept = i; break; }
                cum += exp((double)val[i]) / total;
            }
        }
        double kept_total = 0.0;
        for (int i = 0; i < kept; i++) kept_total += exp((double)val[i]);
        const uint64_t r = mix64(mix64(seed ^ 0x9e3779b97f4a7c15ULL) + step * 0xd1b54a32d192ed03ULL + blockIdx.x);
        const double u = (double)(r >> 11) * (1.0 / 9007199254740992.0) * kept_total;
        double cum = 0.0;
        int pick = idx[kept - 1];
        for (int i = 0; i < kept; i++) {
            cum += exp((double)val[i]);
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
    if (rows > 65535) return cu_fail(c, XO_EINVAL, "device sampling takes at most 65535 rows at once (got %d)", rows);
    const int k = top_k < cols ? top_k : cols;
    char *buf = (char *)cu_alloc_raw(c, (size_t)rows * (256 * sizeof(unsigned) + sizeof(TopkSel)));
    if (!buf) return cu_fail_more(c, XO_ENOMEM, "sampling");
    unsigned *hist = (unsigned *)buf;
    TopkSel *sel = (TopkSel *)(buf + (size_t)rows * 256 * sizeof(unsigned));
    cu_launch(c, k_topk_init, 1, 256, 0, sel, hist, rows, k);
    int per_row = (cols + 4095) / 4096;
    if (per_row > HIST_BLOCKS_PER_ROW) per_row = HIST_BLOCKS_PER_ROW;
    for (int shift = 24; shift >= 0; shift -= 8) {
        cu_launch(c, k_topk_hist, dim3((unsigned)per_row, (unsigned)rows), 256, 0, hist, sel, logits, cols, shift,
                  c->fault_dev);
        cu_launch(c, k_topk_pick, rows, 32, 0, hist, sel, rows);
    }
    cu_launch(c, k_sample_rows, rows, SAMPLE_THREADS, 0, out, logits, cols, temperature, top_p, seed, step,
                                                          step_dev, sel);
    cu_free(c, buf);
    return cu_check_launch(c, "sample_rows");
}
