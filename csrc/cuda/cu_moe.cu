/* MoE on the GPU: routing (softmax, top-k with ties to the lower index, renormalised by
 * sum + 1e-5), then the routed experts without a host round trip: slots are counted and
 * permuted by expert on the device, and the expert products read the device-side group
 * offsets (a skinny kernel for few tokens, a WMMA grouped GEMM for many). The combine
 * adds sum_k w_k * expert_k(x) to `out` in k order, as the CPU backend does. */
#include <stdlib.h>
#include <string.h>

#include "cu_common.h"

__global__ void k_moe_route(int32_t *idx, float *weight, const float *__restrict__ logits, int n, int E, int K) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float *z = logits + (size_t)i * E;
    float mx = z[0];
    for (int e = 1; e < E; e++) mx = z[e] > mx ? z[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) sum += expf(z[e] - mx);
    int32_t *ix = idx + (size_t)i * K;
    float *wt = weight + (size_t)i * K;
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
    for (int j = 0; j < K; j++) wt[j] /= picked + 1e-5f;
}

xo_status cu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    if (k > experts || k <= 0) return cu_fail(c, XO_EINVAL, "top-%d of %d experts", k, experts);
    k_moe_route<<<cu_blocks((size_t)n, 128), 128, 0, c->stream>>>(idx, weight, logits, n, experts, k);
    return cu_check_launch(c, "moe_route");
}

/* ---- permutation ---- */

__global__ void k_moe_count(const int32_t *__restrict__ idx, int slots, int E, int *counts, int *rank) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= slots) return;
    int e = idx[s];
    e = e < 0 ? 0 : e >= E ? E - 1 : e; /* the router only makes valid indices */
    rank[s] = atomicAdd(&counts[e], 1);
}

__global__ void k_moe_offsets(const int *counts, int E, int *offsets, int *tile_start, int bm) {
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
                             const int *__restrict__ offsets, int *slot_of, int E, int K, int H) {
    const int s = blockIdx.x;
    int e = idx[s];
    e = e < 0 ? 0 : e >= E ? E - 1 : e;
    const int g = offsets[e] + rank[s];
    if (threadIdx.x == 0) slot_of[s] = g;
    const float *src = x + (size_t)(s / K) * H;
    T *dst = xg + (size_t)g * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) dst[j] = cu_from_f32<T>(src[j]);
}

template <typename T>
__global__ void k_swiglu_to(T *y, const float *__restrict__ gu, size_t rows, int inter) {
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
    const int i = blockIdx.x;
    float *o = out + (size_t)i * H;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float v = o[j];
        for (int k = 0; k < K; k++) v += w[(size_t)i * K + k] * yg[(size_t)slot_of[(size_t)i * K + k] * H + j];
        o[j] = v;
    }
}

enum { SKINNY_MAX_SLOTS = 64 };

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
        rc = cu_fail(c, XO_ENOMEM, "out of GPU memory in the MoE layer (%d tokens)", n);
        goto out;
    }
    if ((rc = cu_check(c, cudaMemsetAsync(ib, 0, (size_t)E * sizeof(int), c->stream), "moe scratch")) != XO_OK) goto out;
    {
        int *counts = ib, *offsets = ib + E, *tile_start = offsets + E + 1, *rank = tile_start + E + 1, *slot_of = rank + slots;
        k_moe_count<<<cu_blocks((size_t)slots, 256), 256, 0, c->stream>>>(a->topk_idx, slots, E, counts, rank);
        const int bm = c->gemm_v1 ? CU_GEMM_BM : 128; /* row tile of the grouped GEMM */
        k_moe_offsets<<<1, 32, 0, c->stream>>>(counts, E, offsets, tile_start, bm);
        const int gth = H >= 256 ? 256 : 128;
        if (mode == WMMA) {
            if (t == XO_BF16)
                k_moe_gather<__nv_bfloat16><<<slots, gth, 0, c->stream>>>((__nv_bfloat16 *)xg, a->x, a->topk_idx, rank, offsets,
                                                                          slot_of, E, K, H);
            else
                k_moe_gather<__half><<<slots, gth, 0, c->stream>>>((__half *)xg, a->x, a->topk_idx, rank, offsets, slot_of, E, K, H);
        } else {
            k_moe_gather<float><<<slots, gth, 0, c->stream>>>((float *)xg, a->x, a->topk_idx, rank, offsets, slot_of, E, K, H);
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
                    k_swiglu_to<__nv_bfloat16><<<b < cap ? b : cap, 256, 0, c->stream>>>((__nv_bfloat16 *)act, gu, slots, inter);
                else
                    k_swiglu_to<__half><<<b < cap ? b : cap, 256, 0, c->stream>>>((__half *)act, gu, slots, inter);
                rc = cu_check_launch(c, "moe swiglu");
            }
            if (rc == XO_OK) rc = cu_grouped_gemm16(c, yg, act, &dnp, t, H, inter, offsets, tile_start, E, max_tiles, bm);
        } else {
            /* host-sized per-expert products: one small device-to-host read of the counts */
            int *hc = (int *)malloc((size_t)E * sizeof(int));
            if (!hc) { rc = cu_fail(c, XO_ENOMEM, "out of memory"); goto out; }
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
            k_moe_combine<<<n, H >= 256 ? 256 : 128, 0, c->stream>>>(a->out, yg, slot_of, a->topk_weight, K, H);
            rc = cu_check_launch(c, "moe combine");
        }
    }
out:
    cu_free(c, blk);
    return rc;
}
