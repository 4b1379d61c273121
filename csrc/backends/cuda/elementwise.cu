/* Elementwise and row-wise kernels: dtype conversion, RMSNorm (its output float32, or 16-bit
 * for the GEMM after it, or both), rotary embedding, embedding lookup, residual add, SwiGLU,
 * cache writes (plain, or fused with the RMSNorm or the rotation before them). Semantics as in
 * csrc/backends/cpu/elementwise.c and backends/defaults.c. */
#include <type_traits>

#include "backends/cuda/common.h"

template <typename S, typename D>
__global__ void k_convert(D *__restrict__ dst, const S *__restrict__ src, size_t n) {
    CU_PDL_ENTRY();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        cu_st(dst, i, cu_ld(src, i));
}

template <typename S>
static void launch_convert_from(CuCtx *c, void *dst, xo_dtype dt, const S *src, size_t n) {
    unsigned b = cu_blocks(n, 256);
    if (b > 65535u * 8) b = 65535u * 8;
    if (dt == XO_F32) cu_launch(c, k_convert<S, float>, b, 256, 0, (float *)dst, src, n);
    else if (dt == XO_BF16) cu_launch(c, k_convert<S, __nv_bfloat16>, b, 256, 0, (__nv_bfloat16 *)dst, src, n);
    else cu_launch(c, k_convert<S, __half>, b, 256, 0, (__half *)dst, src, n);
}

xo_status cu_convert(CuCtx *c, void *dst, xo_dtype dt, const void *src, xo_dtype st, size_t n) {
    if (!n) return XO_OK;
    if (st == XO_F32) launch_convert_from(c, dst, dt, (const float *)src, n);
    else if (st == XO_BF16) launch_convert_from(c, dst, dt, (const __nv_bfloat16 *)src, n);
    else launch_convert_from(c, dst, dt, (const __half *)src, n);
    return cu_check_launch(c, "convert");
}

xo_status cu_convert_act(CuCtx *c, void *dst, const float *src, size_t n, xo_dtype t) {
    return cu_convert(c, dst, t, src, XO_F32, n);
}

/* ---- RMSNorm: one block per row ---- */

/* the sum of ss over the block's THREADS threads, returned to every thread */
template <int THREADS>
__device__ __forceinline__ float block_sum(float ss) {
    __shared__ float red[THREADS / 32];
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float r = threadIdx.x < THREADS / 32 ? red[threadIdx.x] : 0.0f;
        for (int o = 16; o; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
        if (threadIdx.x == 0) red[0] = r;
    }
    __syncthreads();
    return red[0];
}

/* with add (then x_stride == d): x += add first, written back, and normed (the residual add fused).
 * Rows of up to 8 * THREADS values stay in registers: one pass over memory, w loaded early.
 * T16 (BF16 / F16; float: none): each normed value also stored in y16 as cu_st rounds it, the input
 * of the 16-bit GEMM after the norm (the values a conversion of y would give); y may then be NULL. */
template <int THREADS, typename T16>
__global__ void k_rmsnorm(float *y, T16 *y16, float *x, int x_stride, const float *__restrict__ w, int d, float eps,
                          const float *__restrict__ add) {
    CU_PDL_ENTRY();
    enum { PER = 8 };
    constexpr bool with16 = !std::is_same<T16, float>::value;
    float *xr = x + (size_t)blockIdx.x * x_stride;
    float *yr = !with16 || y ? y + (size_t)blockIdx.x * d : NULL;
    T16 *y16r = with16 ? y16 + (size_t)blockIdx.x * d : NULL;
    auto put = [&](int j, float o) {
        if (!with16 || yr) yr[j] = o;
        if (with16) cu_st(y16r, j, o);
    };
    const float *ar = add ? add + (size_t)blockIdx.x * d : NULL;
    const bool in_regs = d <= PER * THREADS;
    float v[PER], wv[PER];
    float ss = 0.0f;
    if (in_regs) {
#pragma unroll
        for (int p = 0; p < PER; p++) {
            const int j = threadIdx.x + p * THREADS;
            if (j < d) {
                wv[p] = w[j];
                v[p] = ar ? xr[j] + ar[j] : xr[j];
                ss += v[p] * v[p];
            }
        }
        if (ar) {
#pragma unroll
            for (int p = 0; p < PER; p++)
                if (threadIdx.x + p * THREADS < d) xr[threadIdx.x + p * THREADS] = v[p];
        }
    } else if (ar) {
        for (int j = threadIdx.x; j < d; j += THREADS) {
            const float a = xr[j] + ar[j];
            xr[j] = a;
            ss += a * a;
        }
    } else {
        for (int j = threadIdx.x; j < d; j += THREADS) ss += xr[j] * xr[j];
    }
    const float inv = 1.0f / sqrtf(block_sum<THREADS>(ss) / (float)d + eps);
    if (in_regs) {
#pragma unroll
        for (int p = 0; p < PER; p++)
            if (threadIdx.x + p * THREADS < d) put(threadIdx.x + p * THREADS, wv[p] * (v[p] * inv));
    } else {
        /* in place (y == x) is safe: each element is read before it is written by the same thread */
        for (int j = threadIdx.x; j < d; j += THREADS) put(j, w[j] * (xr[j] * inv));
    }
}

/* the block size by row length, as every RMSNorm launch picks it (the sums, so the values, depend on it) */
template <typename T16>
static void launch_rmsnorm(CuCtx *c, float *y, T16 *y16, float *x, int x_stride, const float *w, int n, int d, float eps,
                           const float *add) {
    if (d <= 256) cu_launch(c, k_rmsnorm<128, T16>, n, 128, 0, y, y16, x, x_stride, w, d, eps, add);
    else cu_launch(c, k_rmsnorm<256, T16>, n, 256, 0, y, y16, x, x_stride, w, d, eps, add);
}

xo_status cu_rmsnorm(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    launch_rmsnorm(c, y, (float *)NULL, (float *)x, x_stride, w, n, d, eps, (const float *)NULL);
    return cu_check_launch(c, "rmsnorm");
}

xo_status cu_add_rmsnorm(xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d, float eps) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    launch_rmsnorm(c, y, (float *)NULL, h, d, w, n, d, eps, x);
    return cu_check_launch(c, "add_rmsnorm");
}

xo_status cu_rmsnorm_to16(CuCtx *c, void *y16, xo_dtype t, const xo_rmsnorm_in *nm, int n) {
    if (n <= 0) return XO_OK;
    float *y = nm->keep ? nm->x : NULL;
    if (t == XO_BF16) launch_rmsnorm(c, y, (__nv_bfloat16 *)y16, nm->h, nm->d, nm->w, n, nm->d, nm->eps, nm->add);
    else launch_rmsnorm(c, y, (__half *)y16, nm->h, nm->d, nm->w, n, nm->d, nm->eps, nm->add);
    return cu_check_launch(c, "rmsnorm (16-bit out)");
}

/* ---- RMSNorm straight into a cache (the latent's): one block per row, the block sizes and sums of
 * cu_rmsnorm, so the stored values are those of rmsnorm then cache_write ---- */

template <int THREADS, typename D>
__global__ void k_rmsnorm_cache_write(D *cache, int capacity, int start, const int32_t *start_dev,
                                      const float *__restrict__ x, const float *__restrict__ w, int n, int d, float eps) {
    CU_PDL_ENTRY();
    if (start_dev) start = *start_dev;
    const float *xr = x + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += THREADS) ss += xr[j] * xr[j];
    const float inv = 1.0f / sqrtf(block_sum<THREADS>(ss) / (float)d + eps);
    const size_t r = blockIdx.x / n, i = blockIdx.x % n;
    D *slot = cache + (r * capacity + start + i) * (size_t)d;
    for (int j = threadIdx.x; j < d; j += THREADS) cu_st(slot, j, w[j] * (xr[j] * inv));
}

template <int THREADS>
static void launch_rmsnorm_cache_write(CuCtx *c, void *cache, xo_dtype t, int capacity, int start, const int32_t *start_dev,
                                       const float *x, const float *w, int rows, int n, int d, float eps) {
    if (t == XO_BF16)
        cu_launch(c, k_rmsnorm_cache_write<THREADS, __nv_bfloat16>, rows, THREADS, 0, (__nv_bfloat16 *)cache, capacity,
                  start, start_dev, x, w, n, d, eps);
    else if (t == XO_F16)
        cu_launch(c, k_rmsnorm_cache_write<THREADS, __half>, rows, THREADS, 0, (__half *)cache, capacity, start, start_dev,
                  x, w, n, d, eps);
    else
        cu_launch(c, k_rmsnorm_cache_write<THREADS, float>, rows, THREADS, 0, (float *)cache, capacity, start, start_dev,
                  x, w, n, d, eps);
}

/* the normed rows go to the cache only: nothing reads `normed` after this step */
xo_status cu_rmsnorm_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int start,
                                 const int32_t *start_dev, float *normed, const float *x, const float *w, int batch,
                                 int n, int d, float eps) {
    CuCtx *c = cu_ctx(be);
    (void)normed;
    if (cache_t != XO_F32 && cache_t != XO_BF16 && cache_t != XO_F16)
        return cu_fail(c, XO_EUNSUPPORTED, "CUDA rmsnorm_cache_write: cache dtype %d unsupported", (int)cache_t);
    if (batch <= 0 || n <= 0 || d <= 0) return XO_OK;
    const int rows = batch * n;
    if (d <= 256) launch_rmsnorm_cache_write<128>(c, cache, cache_t, capacity, start, start_dev, x, w, rows, n, d, eps);
    else launch_rmsnorm_cache_write<256>(c, cache, cache_t, capacity, start, start_dev, x, w, rows, n, d, eps);
    return cu_check_launch(c, "rmsnorm_cache_write");
}

/* ---- rotary embedding (SPEC section 5): pairs j and j + hd/2, theta = (float)pos * inv_freq ---- */

/* one thread per (row, head group, pair j): cos/sin once per thread, applied to the heads
 * hg, hg + hgroups, ... (hgroups = heads for few rows, 1 for many) */
__global__ void k_rope(float *x, size_t row_stride, const int32_t *__restrict__ pos, int n, int heads, int hd,
                       const float *__restrict__ inv_freq, float mscale, int rpb, int pcap, int hgroups) {
    CU_PDL_ENTRY();
    const int half = hd / 2;
    const size_t total = (size_t)n * hgroups * half;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(t % half);
        const size_t rest = t / half;
        const int hg = (int)(rest % hgroups);
        const size_t i = rest / hgroups;
        float cs, sn;
        cu_rope_angle(pos[(i / rpb) * (size_t)pcap + i % rpb], inv_freq[j], mscale, cs, sn);
        float *v = x + i * row_stride + (size_t)hg * hd + j;
        for (int h = hg; h < heads; h += hgroups, v += (size_t)hgroups * hd) {
            float a = v[0], b = v[half];
            cu_rope_pair(a, b, cs, sn);
            v[0] = a;
            v[half] = b;
        }
    }
}

xo_status cu_rope_rows(CuCtx *c, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                       const float *inv_freq, float mscale, int rpb, int pcap) {
    if (n <= 0 || heads <= 0 || hd < 2) return XO_OK;
    const int hgroups = (size_t)n * (hd / 2) < 16384 ? heads : 1;
    const size_t total = (size_t)n * hgroups * (hd / 2);
    unsigned b = cu_blocks(total, 256);
    if (b > 65535u * 16) b = 65535u * 16;
    cu_launch(c, k_rope, b, 256, 0, x, row_stride, pos, n, heads, hd, inv_freq, mscale, rpb, pcap, hgroups);
    return cu_check_launch(c, "rope");
}

xo_status cu_rope(xo_backend *be, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                  const float *inv_freq, float mscale) {
    return cu_rope_rows(cu_ctx(be), x, row_stride, pos, n, heads, hd, inv_freq, mscale, n, 0);
}

/* ---- the new keys of a KV cache: K of each [K | V] row rotated and both stored, in one kernel; one
 * thread per (row, head, pair j) ---- */

template <typename D>
__global__ void k_rope_kv_cache_write(D *kc, D *vc, int capacity, int start, const int32_t *start_dev,
                                      const float *__restrict__ kv, int n, int heads, int hd,
                                      const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, float mscale,
                                      size_t total) {
    CU_PDL_ENTRY();
    if (start_dev) start = *start_dev;
    const int half = hd / 2;
    const size_t W = (size_t)heads * hd;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(t % half);
        const size_t rest = t / half;
        const int h = (int)(rest % heads);
        const size_t ri = rest / heads; /* r * n + i */
        const size_t r = ri / n, i = ri % n;
        const float *src = kv + ri * 2 * W + (size_t)h * hd + j;
        float a = src[0], b = src[half], cs, sn;
        cu_rope_angle(pos[ri], inv_freq[j], mscale, cs, sn);
        cu_rope_pair(a, b, cs, sn);
        const size_t dst = (r * capacity + start + i) * W + (size_t)h * hd + j;
        cu_st(kc, dst, a);
        cu_st(kc, dst + half, b);
        cu_st(vc, dst, src[W]);
        cu_st(vc, dst + half, src[W + half]);
    }
}

xo_status cu_rope_kv_cache_write(xo_backend *be, void *k_cache, void *v_cache, xo_dtype cache_t, int capacity,
                                 int start, const int32_t *start_dev, float *kv, int batch, int n, const xo_rotary *rot) {
    CuCtx *c = cu_ctx(be);
    if (cache_t != XO_F32 && cache_t != XO_BF16 && cache_t != XO_F16)
        return cu_fail(c, XO_EUNSUPPORTED, "CUDA rope_kv_cache_write: cache dtype %d unsupported", (int)cache_t);
    if (rot->head_dim < 2 || rot->head_dim % 2)
        return cu_fail(c, XO_EINVAL, "rope_kv_cache_write: head_dim %d is not even", rot->head_dim);
    const size_t total = (size_t)batch * n * rot->heads * (rot->head_dim / 2);
    if (batch <= 0 || n <= 0 || !total) return XO_OK;
    unsigned b = cu_blocks(total, 256), cap = (unsigned)c->num_sms * 16;
    if (b > cap) b = cap;
    const int heads = rot->heads, hd = rot->head_dim;
    if (cache_t == XO_BF16)
        cu_launch(c, k_rope_kv_cache_write<__nv_bfloat16>, b, 256, 0, (__nv_bfloat16 *)k_cache, (__nv_bfloat16 *)v_cache,
                  capacity, start, start_dev, (const float *)kv, n, heads, hd, rot->pos, rot->inv_freq, rot->mscale, total);
    else if (cache_t == XO_F16)
        cu_launch(c, k_rope_kv_cache_write<__half>, b, 256, 0, (__half *)k_cache, (__half *)v_cache, capacity, start,
                  start_dev, (const float *)kv, n, heads, hd, rot->pos, rot->inv_freq, rot->mscale, total);
    else
        cu_launch(c, k_rope_kv_cache_write<float>, b, 256, 0, (float *)k_cache, (float *)v_cache, capacity, start,
                  start_dev, (const float *)kv, n, heads, hd, rot->pos, rot->inv_freq, rot->mscale, total);
    return cu_check_launch(c, "rope_kv_cache_write");
}

/* ---- token ids from the caller's device memory, checked against the vocabulary ---- */

__global__ void k_load_ids(int32_t *dst, const void *src, int wide, size_t n, int vocab, unsigned long long *bad) {
    CU_PDL_ENTRY();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const long long v = wide ? ((const long long *)src)[i] : (long long)((const int32_t *)src)[i];
        const bool ok = v >= 0 && v < vocab;
        if (!ok) atomicMin(&bad[0], (unsigned long long)i);
        dst[i] = ok ? (int32_t)v : 0;
    }
}

__global__ void k_bad_id_value(unsigned long long *bad, const void *src, int wide) {
    CU_PDL_ENTRY();
    if (threadIdx.x || bad[0] == ~0ull) return;
    bad[1] = wide ? (unsigned long long)((const long long *)src)[bad[0]]
                  : (unsigned long long)(long long)((const int32_t *)src)[bad[0]];
}

xo_status cu_load_ids(xo_backend *be, int32_t *dst, const void *src, int wide, size_t n, int vocab, uint64_t *bad) {
    CuCtx *c = cu_ctx(be);
    CU_TRY(c, cudaMemsetAsync(bad, 0xff, 2 * sizeof(uint64_t), c->stream), "input ids");
    if (!n) return XO_OK;
    unsigned b = cu_blocks(n, 256);
    if (b > 4096) b = 4096;
    cu_launch(c, k_load_ids, b, 256, 0, dst, src, wide, n, vocab, (unsigned long long *)bad);
    cu_launch(c, k_bad_id_value, 1, 32, 0, (unsigned long long *)bad, src, wide);
    return cu_check_launch(c, "input ids");
}

/* ---- embedding lookup ---- */

template <typename T>
__global__ void k_embed(float *h, const T *__restrict__ table, const int32_t *__restrict__ ids, int H) {
    CU_PDL_ENTRY();
    const size_t src = (size_t)ids[blockIdx.x] * H;
    float *dst = h + (size_t)blockIdx.x * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) dst[j] = cu_ld(table, src + j);
}

xo_status cu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    const int H = table->in;
    if (table->dtype == XO_F32) cu_launch(c, k_embed<float>, n, 256, 0, h, (const float *)table->data, ids, H);
    else if (table->dtype == XO_BF16) cu_launch(c, k_embed<__nv_bfloat16>, n, 256, 0, h, (const __nv_bfloat16 *)table->data, ids, H);
    else if (table->dtype == XO_F16) cu_launch(c, k_embed<__half>, n, 256, 0, h, (const __half *)table->data, ids, H);
    else return cu_fail(c, XO_EUNSUPPORTED, "embedding table dtype %d unsupported", (int)table->dtype);
    return cu_check_launch(c, "embed");
}

/* ---- y += x ---- */

__global__ void k_add4(float4 *y, const float4 *__restrict__ x, size_t n4) {
    CU_PDL_ENTRY();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        float4 a = y[i], b = x[i];
        a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
        y[i] = a;
    }
}

__global__ void k_add(float *y, const float *__restrict__ x, size_t n) {
    CU_PDL_ENTRY();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) y[i] += x[i];
}

xo_status cu_add(xo_backend *be, float *y, const float *x, size_t n) {
    CuCtx *c = cu_ctx(be);
    if (!n) return XO_OK;
    unsigned cap = (unsigned)c->num_sms * 16;
    if (n % 4 == 0 && ((uintptr_t)y & 15) == 0 && ((uintptr_t)x & 15) == 0) {
        unsigned b = cu_blocks(n / 4, 256);
        cu_launch(c, k_add4, b < cap ? b : cap, 256, 0, (float4 *)y, (const float4 *)x, n / 4);
    } else {
        unsigned b = cu_blocks(n, 256);
        cu_launch(c, k_add, b < cap ? b : cap, 256, 0, y, x, n);
    }
    return cu_check_launch(c, "add");
}

/* ---- SwiGLU: y[n, I] = silu(gu[:, :I]) * gu[:, I:], stored as float32 or as the 16-bit input
 * of the GEMM that reads it (the same float32 value rounded as cu_convert rounds it) ---- */

template <typename T>
__global__ void k_swiglu(T *y, const float *__restrict__ gu, size_t rows, int inter) {
    CU_PDL_ENTRY();
    const size_t total = rows * inter;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        size_t i = t / inter;
        int j = (int)(t - i * inter);
        const float *row = gu + i * 2 * (size_t)inter;
        float g = row[j];
        cu_st(y, t, g / (1.0f + expf(-g)) * row[inter + j]);
    }
}

xo_status cu_swiglu_to(CuCtx *c, void *y, xo_dtype t, const float *gu, size_t rows, int inter) {
    const size_t total = rows * inter;
    if (!total) return XO_OK;
    unsigned b = cu_blocks(total, 256), cap = (unsigned)c->num_sms * 16;
    if (b > cap) b = cap;
    if (t == XO_BF16) cu_launch(c, k_swiglu<__nv_bfloat16>, b, 256, 0, (__nv_bfloat16 *)y, gu, rows, inter);
    else if (t == XO_F16) cu_launch(c, k_swiglu<__half>, b, 256, 0, (__half *)y, gu, rows, inter);
    else cu_launch(c, k_swiglu<float>, b, 256, 0, (float *)y, gu, rows, inter);
    return cu_check_launch(c, "swiglu");
}

xo_status cu_swiglu(xo_backend *be, float *y, const float *gu, int n, int inter) {
    return cu_swiglu_to(cu_ctx(be), y, XO_F32, gu, n > 0 ? (size_t)n : 0, inter);
}

/* ---- cache slots [r, start .. start+n) <- src rows r*n .. r*n+n-1 (src_stride apart), every row r ---- */

template <typename D>
__global__ void k_cache_write(D *cache, int capacity, int width, int start, const int32_t *start_dev,
                              const float *__restrict__ src, int batch, int n, int src_stride) {
    CU_PDL_ENTRY();
    if (start_dev) start = *start_dev;
    const size_t total = (size_t)batch * n * width;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(t % width);
        const size_t ri = t / width; /* r * n + i */
        const size_t r = ri / n, i = ri % n;
        cu_st(cache, ((r * capacity + start + i) * width) + j, src[ri * src_stride + j]);
    }
}

template <typename S>
__global__ void k_gather_rows(float *dst, const S *__restrict__ src, int capacity, int len, int width, size_t total) {
    CU_PDL_ENTRY();
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(t % width);
        const size_t ri = t / width; /* r * len + i */
        const size_t r = ri / len, i = ri % len;
        dst[t] = cu_ld(src, (r * capacity + i) * width + j);
    }
}

xo_status cu_gather_rows(CuCtx *c, float *dst, const void *src, xo_dtype t, int batch, int capacity, int len, int width) {
    const size_t total = (size_t)batch * len * width;
    if (!total) return XO_OK;
    unsigned b = cu_blocks(total, 256), cap = (unsigned)c->num_sms * 16;
    if (b > cap) b = cap;
    if (t == XO_BF16) cu_launch(c, k_gather_rows<__nv_bfloat16>, b, 256, 0, dst, (const __nv_bfloat16 *)src, capacity, len, width, total);
    else if (t == XO_F16) cu_launch(c, k_gather_rows<__half>, b, 256, 0, dst, (const __half *)src, capacity, len, width, total);
    else cu_launch(c, k_gather_rows<float>, b, 256, 0, dst, (const float *)src, capacity, len, width, total);
    return cu_check_launch(c, "cache gather");
}

xo_status cu_cache_write(xo_backend *be, void *cache_v, xo_dtype cache_t, int capacity, int width, int start,
                         const int32_t *start_dev, const float *src, int batch, int n, int src_stride) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0 || width <= 0 || batch <= 0) return XO_OK;
    if (cache_t != XO_F32 || start_dev) { /* a 16-bit cache (converted while writing) or a slot read on the device */
        const size_t total = (size_t)batch * n * width;
        unsigned b = cu_blocks(total, 256), cap = (unsigned)c->num_sms * 16;
        if (b > cap) b = cap;
        if (cache_t == XO_BF16)
            cu_launch(c, k_cache_write<__nv_bfloat16>, b, 256, 0, (__nv_bfloat16 *)cache_v, capacity, width, start, start_dev, src, batch,
                                                    n, src_stride);
        else if (cache_t == XO_F16)
            cu_launch(c, k_cache_write<__half>, b, 256, 0, (__half *)cache_v, capacity, width, start, start_dev, src, batch, n,
                                                    src_stride);
        else
            cu_launch(c, k_cache_write<float>, b, 256, 0, (float *)cache_v, capacity, width, start, start_dev, src, batch, n,
                                                    src_stride);
        return cu_check_launch(c, "cache_write");
    }
    float *cache = (float *)cache_v;
    const size_t row_bytes = (size_t)width * sizeof(float);
    if (n == 1) { /* decode: one strided copy for the whole batch */
        CU_TRY(c, cudaMemcpy2DAsync(cache + (size_t)start * width, (size_t)capacity * row_bytes, src,
                                    (size_t)src_stride * sizeof(float), row_bytes, (size_t)batch,
                                    cudaMemcpyDeviceToDevice, c->stream),
               "cache_write");
        return XO_OK;
    }
    for (int r = 0; r < batch; r++)
        CU_TRY(c, cudaMemcpy2DAsync(cache + ((size_t)r * capacity + start) * width, row_bytes,
                                    src + (size_t)r * n * src_stride, (size_t)src_stride * sizeof(float), row_bytes,
                                    (size_t)n, cudaMemcpyDeviceToDevice, c->stream),
               "cache_write");
    return XO_OK;
}

/* ---- out[r] = argmax of row r (lower index on ties): one block per row ---- */

__device__ __forceinline__ void better(float &v, int &i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
}

/* block-wide (value, index) reduction; the result is valid in thread 0 */
__device__ __forceinline__ void block_best(float &v, int &idx) {
    for (int off = 16; off > 0; off >>= 1)
        better(v, idx, __shfl_down_sync(0xffffffffu, v, off), __shfl_down_sync(0xffffffffu, idx, off));
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sv[warp] = v; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x / 32;
        v = lane < nw ? sv[lane] : -INFINITY;
        idx = lane < nw ? si[lane] : 0x7fffffff;
        for (int off = 16; off > 0; off >>= 1)
            better(v, idx, __shfl_down_sync(0xffffffffu, v, off), __shfl_down_sync(0xffffffffu, idx, off));
    }
}

/* pass 1: block (s, r) takes columns [s * span, (s + 1) * span) of row r (row0 + r of the call).
 * A NaN is a fault, as on the CPU: each thread remembers its first one and reports it (one
 * atomic, only then), so a clean row costs a compare a column. */
__global__ void k_argmax_part(float *pv, int *pi, const float *__restrict__ logits, int cols, int span, int row0,
                              CuFault *fault) {
    CU_PDL_ENTRY();
    const float *z = logits + (size_t)blockIdx.y * cols;
    const int end = min(cols, (int)(blockIdx.x + 1) * span);
    float v = -INFINITY;
    int idx = 0x7fffffff, nan_at = -1;
    for (int j = blockIdx.x * span + threadIdx.x; j < end; j += blockDim.x) {
        const float x = z[j];
        if (x != x && nan_at < 0) nan_at = j;
        better(v, idx, x, j);
    }
    if (nan_at >= 0) cu_report_fault(fault, CU_FAULT_NAN_LOGIT, row0 + (int)blockIdx.y, nan_at);
    block_best(v, idx);
    if (threadIdx.x == 0) {
        pv[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = v;
        pi[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = idx;
    }
}

/* pass 2: one block per row over its parts */
__global__ void k_argmax_final(int32_t *out, const float *__restrict__ pv, const int *__restrict__ pi, int parts) {
    CU_PDL_ENTRY();
    float v = -INFINITY;
    int idx = 0x7fffffff;
    for (int s = threadIdx.x; s < parts; s += blockDim.x)
        better(v, idx, pv[(size_t)blockIdx.x * parts + s], pi[(size_t)blockIdx.x * parts + s]);
    block_best(v, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx; /* all-NaN row (reported above): 0 */
}

xo_status cu_argmax_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols) {
    CuCtx *c = cu_ctx(be);
    if (rows <= 0 || cols <= 0) return XO_OK;
    /* enough parts to spread a few rows over the GPU, 4096 columns at least each */
    int parts = (cols + 4095) / 4096;
    const int cap = (8 * c->num_sms + rows - 1) / rows;
    if (parts > cap) parts = cap > 0 ? cap : 1;
    if (parts > 1024) parts = 1024;
    const int span = (cols + parts - 1) / parts;
    char *buf = (char *)cu_alloc_raw(c, (size_t)rows * parts * 8);
    if (!buf) return cu_fail_more(c, XO_ENOMEM, "argmax");
    float *pv = (float *)buf;
    int *pi = (int *)(buf + (size_t)rows * parts * 4);
    for (int r0 = 0; r0 < rows; r0 += 65535) { /* grid.y is at most 65535 */
        const int nr = rows - r0 < 65535 ? rows - r0 : 65535;
        cu_launch(c, k_argmax_part, dim3((unsigned)parts, (unsigned)nr), 256, 0, pv + (size_t)r0 * parts, pi + (size_t)r0 * parts,
                                                                              logits + (size_t)r0 * cols, cols, span, r0, c->fault_dev);
    }
    cu_launch(c, k_argmax_final, rows, 128, 0, out, pv, pi, parts);
    cu_free(c, buf);
    return cu_check_launch(c, "argmax_rows");
}
