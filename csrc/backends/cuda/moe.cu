/* MoE on the GPU: routing (softmax, top-k with ties to the lower index, renormalised by
 * sum + 1e-5), then the routed experts without a host round trip: slots are counted and
 * permuted by expert on the device, and the expert products read the device-side group
 * offsets (a skinny kernel for few tokens, a WMMA grouped GEMM for many). The combine
 * adds sum_k w_k * expert_k(x) to `out` in k order, as the CPU backend does. An expert id
 * outside [0, E) is rejected as on the CPU: the kernels record it (cu_expert_id) and the call
 * fails with XO_EINVAL when the stream next synchronises. */
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/common.h"

/* softmax over z[E], top-k (ties: lower index), renormalised by sum + 1e-5 */
__device__ void route_row(int32_t *ix, float *wt, const float *z, int E, int K) {
    float mx = z[0];
    for (int e = 1; e < E; e++) mx = z[e] > mx ? z[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += expf(z[e] - mx);
    float picked = 0.0f;
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bp = 0.0f;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int q = 0; q < j; q++) taken |= ix[q] == e;
            if (taken) continue;
            float p = expf(z[e] - mx) / sum;
            if (best < 0 || p > bp) { best = e; bp = p; }  /* strict '>' keeps the lower index on ties */
        }
        ix[j] = best;
        wt[j] = bp;
        picked += bp;
    }
    for (int j = 0; j < K; j++) wt[j] /= picked + XO_TOPK_RENORM_EPS;
}

__global__ void k_moe_route(int32_t *idx, float *weight, const float *__restrict__ logits, int n, int E, int K) {
    CU_PDL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    route_row(idx + (size_t)i * K, weight + (size_t)i * K, logits + (size_t)i * E, E, K);
}

/* one block per token: the router's RMSNorm into shared memory, then its E logits (a warp
 * each, 16-byte weight loads when H % 8 == 0) and the routing */
template <typename W>
__global__ __launch_bounds__(256) void k_moe_router(int32_t *idx, float *weight, const float *__restrict__ x,
                                                    const float *__restrict__ nw, const W *__restrict__ r, int H, int E,
                                                    int K) {
    CU_PDL_ENTRY();
    extern __shared__ float xs[];
    __shared__ float red[8], z[CU_MAX_GROUPS];
    const float *xr = x + (size_t)blockIdx.x * H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < H; j += 256) {
        const float v = xr[j];
        xs[j] = v;
        ss += v * v;
    }
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float tot = 0.0f;
    for (int w8 = 0; w8 < 8; w8++) tot += red[w8];
    const float inv = 1.0f / sqrtf(tot / (float)H + XO_ROUTER_NORM_EPS);
    for (int j = threadIdx.x; j < H; j += 256) xs[j] = nw[j] * (xs[j] * inv);
    __syncthreads();
    for (int e = warp; e < E; e += 8) {
        const W *re = r + (size_t)e * H;
        float acc = 0.0f;
        if (H % 8 == 0) {
            for (int kk = lane * 8; kk < H; kk += 256) {
                float wv[8];
                load8(re + kk, wv);
#pragma unroll
                for (int q = 0; q < 8; q++) acc = fmaf(xs[kk + q], wv[q], acc);
            }
        } else {
            for (int j = lane; j < H; j += 32) acc = fmaf(xs[j], cu_ld(re, j), acc);
        }
        for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) z[e] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) route_row(idx + (size_t)blockIdx.x * K, weight + (size_t)blockIdx.x * K, z, E, K);
}

enum { ROUTER_MAX_H = 12288 }; /* the normed row in 48 KB of shared memory */

xo_status cu_moe_router(xo_backend *be, int32_t *idx, float *weight, const float *x, const float *norm_w,
                        const xo_linear *router, int n, int k) {
    CuCtx *c = cu_ctx(be);
    const int E = router->out, H = router->in;
    if (n <= 0) return XO_OK;
    if (k > E || k <= 0 || E > CU_MAX_GROUPS) return cu_fail(c, XO_EINVAL, "top-%d of %d experts", k, E);
    if (H > ROUTER_MAX_H || (((uintptr_t)router->data) & 15)) { /* the three steps, through scratch */
        float *tmp = (float *)cu_alloc_raw(c, (size_t)n * (H + E) * sizeof(float));
        if (!tmp) return cu_fail_more(c, XO_ENOMEM, "the MoE router");
        xo_status rc = cu_rmsnorm(be, tmp, x, H, norm_w, n, H, XO_ROUTER_NORM_EPS);
        if (rc == XO_OK) rc = cu_matmul(be, tmp + (size_t)n * H, tmp, router, n);
        if (rc == XO_OK) rc = cu_moe_route(be, idx, weight, tmp + (size_t)n * H, n, E, k);
        cu_free(c, tmp);
        return rc;
    }
    const size_t smem = (size_t)H * sizeof(float);
    if (router->dtype == XO_BF16)
        cu_launch(c, k_moe_router<__nv_bfloat16>, n, 256, smem, idx, weight, x, norm_w, (const __nv_bfloat16 *)router->data, H, E, k);
    else if (router->dtype == XO_F16)
        cu_launch(c, k_moe_router<__half>, n, 256, smem, idx, weight, x, norm_w, (const __half *)router->data, H, E, k);
    else if (router->dtype == XO_F32)
        cu_launch(c, k_moe_router<float>, n, 256, smem, idx, weight, x, norm_w, (const float *)router->data, H, E, k);
    else
        return cu_fail(c, XO_EUNSUPPORTED, "router weight dtype %d unsupported", (int)router->dtype);
    return cu_check_launch(c, "moe router");
}

xo_status cu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    if (k > experts || k <= 0) return cu_fail(c, XO_EINVAL, "top-%d of %d experts", k, experts);
    cu_launch(c, k_moe_route, cu_blocks((size_t)n, 128), 128, 0, idx, weight, logits, n, experts, k);
    return cu_check_launch(c, "moe_route");
}

/* ---- permutation ---- */

__global__ void k_moe_count(const int32_t *__restrict__ idx, int slots, int E, int *counts, int *rank, CuFault *fault) {
    CU_PDL_ENTRY();
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= slots) return;
    int e = idx[s];
    e = cu_expert_id(e, E, fault);
    rank[s] = atomicAdd(&counts[e], 1);
}

__global__ void k_moe_offsets(const int *counts, int E, int *offsets, int *tile_start, int bm) {
    CU_PDL_ENTRY();
    if (threadIdx.x || blockIdx.x) return;
    int o = 0, t = 0;
    for (int e = 0; e < E; e++) {
        offsets[e] = o;
        tile_start[e] = t;
        o += counts[e];
        t += (counts[e] + bm - 1) / bm;
    }
    offsets[E] = o;
    tile_start[E] = t;
}

/* one block per slot: grouped row g <- x[token]; slot_of[s] = g */
template <typename T>
__global__ void k_moe_gather(T *xg, const float *__restrict__ x, const int32_t *__restrict__ idx, const int *__restrict__ rank,
                             const int *__restrict__ offsets, int *slot_of, int E, int K, int H,
                             CuFault *fault) {
    CU_PDL_ENTRY();
    const int s = blockIdx.x;
    int e = idx[s];
    e = cu_expert_id(e, E, fault);
    const int g = offsets[e] + rank[s];
    if (threadIdx.x == 0) slot_of[s] = g;
    const float *src = x + (size_t)(s / K) * H;
    T *dst = xg + (size_t)g * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) dst[j] = cu_from_f32<T>(src[j]);
}

template <typename T>
__global__ void k_swiglu_to(T *y, const float *__restrict__ gu, size_t rows, int inter) {
    CU_PDL_ENTRY();
    const size_t total = rows * inter;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        size_t i = t / inter;
        int j = (int)(t - i * inter);
        const float *row = gu + i * 2 * (size_t)inter;
        float g = row[j];
        y[t] = cu_from_f32<T>(g / (1.0f + expf(-g)) * row[inter + j]);
    }
}

__global__ void k_moe_combine(float *out, const float *__restrict__ yg, const int *__restrict__ slot_of,
                              const float *__restrict__ w, int K, int H) {
    CU_PDL_ENTRY();
    const int i = blockIdx.x;
    float *o = out + (size_t)i * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float v = o[j];
        for (int k = 0; k < K; k++) v += w[(size_t)i * K + k] * yg[(size_t)slot_of[(size_t)i * K + k] * H + j];
        o[j] = v;
    }
}

/* up to here the weight-streaming kernel beats the tile GEMM (rows per expert are few) */
enum { SKINNY_MAX_SLOTS = 64 };

/* ---- a few tokens (decode): no permutation, the experts read straight from the routing ---- */
enum { INDEXED_MAX_SLOTS = 8 };

/* one warp per activation column r of slot s: act[s, r] = swiglu of expert idx[s]'s gate row r
 * and up row I + r against x[s / K] (H % 8 == 0) */
template <typename W>
__global__ __launch_bounds__(256) void k_moe_act_indexed(float *__restrict__ act, const float *__restrict__ x, CuGroupPtrs wp,
                                                         const int32_t *__restrict__ idx, int E, int K, int inter, int H,
                                                         CuFault *fault) {
    CU_PDL_ENTRY();
    const int s = blockIdx.y, r = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= inter) return;
    int e = idx[s];
    e = cu_expert_id(e, E, fault);
    const W *wg = (const W *)wp.p[e] + (size_t)r * H, *wu = (const W *)wp.p[e] + (size_t)(inter + r) * H;
    const float *xr = x + (size_t)(s / K) * H;
    float g = 0.0f, u = 0.0f;
#pragma unroll 2
    for (int kk = lane * 8; kk < H; kk += 256) {
        float gv[8], uv[8], xv[8];
        load8(wg + kk, gv);
        load8(wu + kk, uv);
        load8(xr + kk, xv);
#pragma unroll
        for (int q = 0; q < 8; q++) {
            g = fmaf(gv[q], xv[q], g);
            u = fmaf(uv[q], xv[q], u);
        }
    }
    for (int o = 16; o; o >>= 1) {
        g += __shfl_xor_sync(0xffffffffu, g, o);
        u += __shfl_xor_sync(0xffffffffu, u, o);
    }
    if (lane == 0) act[(size_t)s * inter + r] = g / (1.0f + expf(-g)) * u;
}

/* one warp per output row r, every token i: out[i, r] += sum_k w[i, k] * (W_down[e_ik][r] . act[i * K + k])
 * (inter % 8 == 0); the k terms added in order, as the combine does */
template <typename W>
__global__ __launch_bounds__(256) void k_moe_down_indexed(float *__restrict__ out, const float *__restrict__ act, CuGroupPtrs wp,
                                                          const int32_t *__restrict__ idx, const float *__restrict__ wt, int n,
                                                          int E, int K, int H, int inter, CuFault *fault) {
    CU_PDL_ENTRY();
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= H) return;
    for (int i = 0; i < n; i++) {
        float v = out[(size_t)i * H + row];
        for (int kx = 0; kx < K; kx++) {
            const int s = i * K + kx;
            int e = idx[s];
            e = cu_expert_id(e, E, fault);
            const W *wr = (const W *)wp.p[e] + (size_t)row * inter;
            const float *ar = act + (size_t)s * inter;
            float acc = 0.0f;
#pragma unroll 4
            for (int kk = lane * 8; kk < inter; kk += 256) {
                float wv[8], av[8];
                load8(wr + kk, wv);
                load8(ar + kk, av);
#pragma unroll
                for (int q = 0; q < 8; q++) acc = fmaf(wv[q], av[q], acc);
            }
            for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            v += wt[s] * acc;
        }
        if (lane == 0) out[(size_t)i * H + row] = v;
    }
}

template <typename W>
static xo_status moe_indexed(CuCtx *c, const xo_moe_args *a, const CuGroupPtrs &gup, const CuGroupPtrs &dnp, int inter) {
    const int n = a->tokens, K = a->top_k, E = a->num_experts, H = a->hidden, slots = n * K;
    float *act = (float *)cu_alloc_raw(c, (size_t)slots * inter * sizeof(float));
    if (!act) return cu_fail_more(c, XO_ENOMEM, "the MoE layer (%d tokens)", n);
    cu_launch(c, k_moe_act_indexed<W>, dim3((unsigned)((inter + 7) / 8), (unsigned)slots), 256, 0, act, a->x, gup, a->topk_idx,
                                                                                                    E, K, inter, H, c->fault_dev);
    cu_launch(c, k_moe_down_indexed<W>, (unsigned)((H + 7) / 8), 256, 0, a->out, act, dnp, a->topk_idx, a->topk_weight, n, E,
                                                                         K, H, inter, c->fault_dev);
    cu_free(c, act);
    return cu_check_launch(c, "moe (indexed experts)");
}

xo_status cu_moe_experts(xo_backend *be, const xo_moe_args *a) {
    CuCtx *c = cu_ctx(be);
    const int n = a->tokens, K = a->top_k, E = a->num_experts, H = a->hidden;
    if (n <= 0 || K <= 0) return XO_OK;
    const int slots = n * K;
    const int inter = a->experts[0].down.in;
    const xo_dtype t = a->experts[0].gate_up.dtype;
    int uniform = E <= CU_MAX_GROUPS;
    for (int e = 0; e < E && uniform; e++)
        uniform = a->experts[e].down.in == inter && a->experts[e].gate_up.dtype == t && a->experts[e].down.dtype == t &&
                  a->experts[e].gate_up.out == 2 * inter && a->experts[e].down.out == H;
    if (!uniform) return cu_fail(c, XO_EUNSUPPORTED, "CUDA MoE: experts must share one shape and dtype (and be <= %d)", CU_MAX_GROUPS);

    if (!c->moe_host && slots <= INDEXED_MAX_SLOTS && H % 8 == 0 && inter % 8 == 0 && ((uintptr_t)a->x & 15) == 0) {
        CuGroupPtrs gup, dnp;
        bool aligned = true;
        for (int e = 0; e < E; e++) {
            gup.p[e] = a->experts[e].gate_up.data;
            dnp.p[e] = a->experts[e].down.data;
            aligned &= (((uintptr_t)gup.p[e] | (uintptr_t)dnp.p[e]) & 15) == 0;
        }
        if (aligned) {
            if (t == XO_BF16) return moe_indexed<__nv_bfloat16>(c, a, gup, dnp, inter);
            if (t == XO_F16) return moe_indexed<__half>(c, a, gup, dnp, inter);
            return moe_indexed<float>(c, a, gup, dnp, inter);
        }
    }
    enum { HOST, SKINNY, WMMA } mode;
    if (c->moe_host) mode = HOST;
    else if (slots <= SKINNY_MAX_SLOTS) mode = SKINNY;
    else if (t != XO_F32 && H % 8 == 0 && inter % 8 == 0) mode = WMMA;
    else mode = HOST;
    const size_t es = mode == WMMA ? 2 : 4; /* grouped activations: 16-bit for the tensor cores */

    /* one scratch block: ints (counts[E] offsets[E+1] tile_start[E+1] rank[slots] slot_of[slots]),
     * grouped inputs, gate|up, activations, grouped outputs; only the counts need zeroing */
    const size_t ints = (size_t)3 * E + 2 + 2 * (size_t)slots;
    auto up = [](size_t b) { return (b + 255) & ~(size_t)255; };
    const size_t b_int = up(ints * sizeof(int)), b_xg = up((size_t)slots * H * es),
                 b_gu = up((size_t)slots * 2 * inter * sizeof(float)), b_act = up((size_t)slots * inter * es),
                 b_yg = up((size_t)slots * H * sizeof(float));
    char *blk = (char *)cu_alloc_raw(c, b_int + b_xg + b_gu + b_act + b_yg);
    xo_status rc = XO_OK;
    int *ib = (int *)blk;
    void *xg = blk + b_int;
    float *gu = (float *)(blk + b_int + b_xg);
    void *act = blk + b_int + b_xg + b_gu;
    float *yg = (float *)(blk + b_int + b_xg + b_gu + b_act);
    if (!blk) {
        rc = cu_fail_more(c, XO_ENOMEM, "the MoE layer (%d tokens)", n);
        goto out;
    }
    if ((rc = cu_check(c, cudaMemsetAsync(ib, 0, (size_t)E * sizeof(int), c->stream), "moe scratch")) != XO_OK) goto out;
    {
        int *counts = ib, *offsets = ib + E, *tile_start = offsets + E + 1, *rank = tile_start + E + 1, *slot_of = rank + slots;
        cu_launch(c, k_moe_count, cu_blocks((size_t)slots, 256), 256, 0, a->topk_idx, slots, E, counts, rank, c->fault_dev);
        const int bm = cu_grouped_tile_rows(slots, E);
        cu_launch(c, k_moe_offsets, 1, 32, 0, counts, E, offsets, tile_start, bm);
        const int gth = H >= 256 ? 256 : 128;
        if (mode == WMMA) {
            if (t == XO_BF16)
                cu_launch(c, k_moe_gather<__nv_bfloat16>, slots, gth, 0, (__nv_bfloat16 *)xg, a->x, a->topk_idx, rank, offsets,
                                                                          slot_of, E, K, H, c->fault_dev);
            else
                cu_launch(c, k_moe_gather<__half>, slots, gth, 0, (__half *)xg, a->x, a->topk_idx, rank, offsets, slot_of, E, K, H,
                          c->fault_dev);
        } else {
            cu_launch(c, k_moe_gather<float>, slots, gth, 0, (float *)xg, a->x, a->topk_idx, rank, offsets, slot_of, E, K, H,
                      c->fault_dev);
        }
        if ((rc = cu_check_launch(c, "moe permute")) != XO_OK) goto out;

        CuGroupPtrs gup, dnp;
        for (int e = 0; e < E; e++) {
            gup.p[e] = a->experts[e].gate_up.data;
            dnp.p[e] = a->experts[e].down.data;
        }
        if (mode == SKINNY) {
            rc = cu_grouped_skinny(c, gu, (const float *)xg, &gup, t, 2 * inter, H, offsets, E);
            if (rc == XO_OK) rc = cu_swiglu(be, (float *)act, gu, slots, inter);
            if (rc == XO_OK) rc = cu_grouped_skinny(c, yg, (const float *)act, &dnp, t, H, inter, offsets, E);
        } else if (mode == WMMA) {
            const int max_tiles = (slots + bm - 1) / bm + E;
            rc = cu_grouped_gemm16(c, gu, xg, &gup, t, 2 * inter, H, offsets, tile_start, E, max_tiles, bm);
            if (rc == XO_OK) {
                unsigned b = cu_blocks((size_t)slots * inter, 256), cap = (unsigned)c->num_sms * 16;
                if (t == XO_BF16)
                    cu_launch(c, k_swiglu_to<__nv_bfloat16>, b < cap ? b : cap, 256, 0, (__nv_bfloat16 *)act, gu, slots, inter);
                else
                    cu_launch(c, k_swiglu_to<__half>, b < cap ? b : cap, 256, 0, (__half *)act, gu, slots, inter);
                rc = cu_check_launch(c, "moe swiglu");
            }
            if (rc == XO_OK) rc = cu_grouped_gemm16(c, yg, act, &dnp, t, H, inter, offsets, tile_start, E, max_tiles, bm);
        } else {
            /* host-sized per-expert products: one small device-to-host read of the counts */
            int *hc = (int *)malloc((size_t)E * sizeof(int));
            if (!hc) { rc = cu_fail(c, XO_ENOMEM, "out of host memory for %d expert counts", E); goto out; }
            cudaError_t ce = cudaMemcpyAsync(hc, counts, (size_t)E * sizeof(int), cudaMemcpyDeviceToHost, c->stream);
            if (ce == cudaSuccess) ce = cudaStreamSynchronize(c->stream);
            if (ce != cudaSuccess) rc = cu_check(c, ce, "moe counts");
            int off = 0;
            for (int e = 0; e < E && rc == XO_OK; e++) {
                const int m = hc[e];
                if (!m) continue;
                const xo_ffn *f = &a->experts[e];
                rc = cu_matmul(be, gu + (size_t)off * 2 * inter, (const float *)xg + (size_t)off * H, &f->gate_up, m);
                if (rc == XO_OK) rc = cu_swiglu(be, (float *)act + (size_t)off * inter, gu + (size_t)off * 2 * inter, m, inter);
                if (rc == XO_OK) rc = cu_matmul(be, yg + (size_t)off * H, (const float *)act + (size_t)off * inter, &f->down, m);
                off += m;
            }
            free(hc);
        }
        if (rc == XO_OK) {
            cu_launch(c, k_moe_combine, n, H >= 256 ? 256 : 128, 0, a->out, yg, slot_of, a->topk_weight, K, H);
            rc = cu_check_launch(c, "moe combine");
        }
    }
out:
    cu_free(c, blk);
    return rc;
}
