/* MoE on the GPU: routing (softmax, top-k with ties to the lower index, renormalised by
 * sum + 1e-5), then the routed experts without a host round trip, by the number of slots
 * (tokens x top_k):
 * - up to 8 (a few decode rows): each slot's expert rows read straight from the routing
 *   (moe_indexed; top-k picks distinct experts, so one token reads no expert twice);
 * - up to 512 with 16-bit experts, H and I multiples of 64 (decode batches): one block per
 *   (row tile, expert) lists its expert's slots itself and streams that weight tile once for
 *   all of them, gate/up and SwiGLU then down on the tensor cores, then the combine
 *   (moe_decode_batch: three launches);
 * - otherwise slots are counted and permuted by expert on the device and the expert products
 *   read the device-side group offsets (a skinny kernel for up to 64 slots, a grouped GEMM
 *   beyond: TMA and wgmma on Hopper with the SwiGLU in the gate/up product's epilogue
 *   (grouped_gemm_hopper.cu), else WMMA); cuda_moe=host sizes per-expert GEMMs from counts read
 *   back instead.
 * The combine adds sum_k w_k * expert_k(x) to `out` in k order, as the CPU backend does. An
 * expert id outside [0, E) is rejected as on the CPU: the kernels record it (cu_expert_id) and
 * the call fails with XO_EINVAL when the stream next synchronises. */
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/common.h"
#include "backends/cuda/mma.h"

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

/* ---- decode batches (16-bit experts, H % 64 == 0, I % 64 == 0): each expert's weights read once ----
 *
 * k_moe_dec<T, GU> (one block per (row tile, expert[, k split])): the block lists the slots routed
 * to its expert (ascending), then computes a [128 weight rows x up to 64 slots] tile per pass on
 * the tensor cores (mma.sync m16n8k16: A = the weight rows, B = the slots' input rows, both
 * K-contiguous in shared memory), the weight tile streamed through three cp.async stages. More
 * than 64 slots on one expert take further passes over the same weight tile (read again, mostly
 * from L2). GU: the rows are gate rows r0..r0+63 and up rows I+r0..I+r0+63, the inputs the
 * tokens' float32 rows of x converted to T as they are staged (through registers, one stage
 * ahead), and the epilogue writes act[slot, r] = silu(g) * u rounded to T (as the grouped-GEMM
 * path rounds its activations). Down: 128 rows of W_down over one range of k (the product is
 * split over k so that the grid fills the GPU), inputs act's 16-bit rows copied by cp.async,
 * the float32 partial products written to part[split, slot, :]. k_moe_dec_combine then adds
 * sum_k w[i, k] * (sum over splits in order) to out in k order: no atomics, so the result is
 * the same from run to run. */
enum {
    DEC_MAX_SLOTS = 512,      /* the slot list lives in shared memory */
    DEC_ROWS = 128,           /* weight rows per block */
    DEC_TOK = 64,             /* slots per pass */
    DEC_BK = 32,              /* k per pipeline stage */
    DEC_LDS = DEC_BK + 8,     /* smem row stride (elements): ldmatrix rows fall in distinct banks */
    DEC_STAGES = 3,
    DEC_THREADS = 256,        /* 8 warps: 4 row groups of 32 rows x 2 halves of the 64 slots */
    DEC_MIN_SPLIT_K = 256,    /* the down product's k per split at least this */
    DEC_PREFETCH = 8,         /* stages of weight lines requested into L2 ahead of the cp.async ring */
};

struct DecSmem {
    uint16_t w[DEC_STAGES][DEC_ROWS][DEC_LDS];
    uint16_t x[DEC_STAGES][DEC_TOK][DEC_LDS];
    int slot[DEC_MAX_SLOTS];
    int warp_count[DEC_THREADS / 32];
};
static_assert(sizeof(DecSmem) <= 48 * 1024, "k_moe_dec's static shared memory");

struct DecArgs {
    CuGroupPtrs w;           /* per expert: gate_up [2I, H] (GU) or down [H, I] */
    const int32_t *idx;      /* topk_idx [slots] */
    const float *x;          /* GU: [tokens, H] */
    const void *act;         /* down: [slots, I] of T */
    void *dst;               /* GU: act [slots, I] of T; down: part [splits, slots, H] float */
    int slots, K, E;
    int rows;                /* GU: I; down: H */
    int k;                   /* GU: H; down: I (the weight's row length) */
    int kspan;               /* down: k per split (a multiple of DEC_BK) */
    CuFault *fault;
};

/* sm.slot[0 .. m) = the slots routed to expert e in ascending order; returns m (bad ids count
 * as expert 0 and are recorded, as the other kernels do) */
__device__ int dec_slot_list(DecSmem &sm, const int32_t *__restrict__ idx, int slots, int e, int E, CuFault *fault) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int total = 0;
    for (int base = 0; base < slots; base += DEC_THREADS) {
        const int s = base + threadIdx.x;
        const bool mine = s < slots && cu_expert_id(idx[s], E, fault) == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) sm.warp_count[warp] = __popc(ballot);
        __syncthreads();
        int at = total;
        for (int w = 0; w < warp; w++) at += sm.warp_count[w];
        if (mine) sm.slot[at + __popc(ballot & ((1u << lane) - 1))] = s;
        for (int w = 0; w < DEC_THREADS / 32; w++) total += sm.warp_count[w];
        __syncthreads();
    }
    return total;
}

__device__ __forceinline__ uint2 pack4(float4 v, __nv_bfloat16 *) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    return make_uint2(*(const uint32_t *)&lo, *(const uint32_t *)&hi);
}
__device__ __forceinline__ uint2 pack4(float4 v, __half *) {
    __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
    return make_uint2(*(const uint32_t *)&lo, *(const uint32_t *)&hi);
}

template <typename T, bool GU>
__global__ __launch_bounds__(DEC_THREADS) void k_moe_dec(DecArgs p) {
    __shared__ __align__(16) DecSmem sm;
    const int e = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const T *W = (const T *)p.w.p[e];
    const int r0 = blockIdx.x * (GU ? DEC_ROWS / 2 : DEC_ROWS);
    const int k_begin = GU ? 0 : blockIdx.z * p.kspan;
    const int nk = (GU ? p.k : min(p.kspan, p.k - k_begin)) / DEC_BK;
    /* the weight row of tile row lr, -1 past the matrix (down, H % 128 != 0) */
    auto weight_row = [&](int lr) -> int {
        if (GU) return lr < DEC_ROWS / 2 ? r0 + lr : p.rows + r0 + lr - DEC_ROWS / 2;
        return r0 + lr < p.rows ? r0 + lr : -1;
    };
    /* The three-stage ring alone keeps too few bytes in flight to stream the weights at the
     * memory's rate, so each thread of the first DEC_ROWS also requests its row's lines into L2
     * DEC_PREFETCH stages ahead (one 128-byte line per two stages); the first ones depend on no
     * earlier kernel and go out before the wait. */
    const T *pf_row = NULL;
    if (tid < DEC_ROWS && weight_row(tid) >= 0) pf_row = W + (size_t)weight_row(tid) * p.k + k_begin;
    auto prefetch_stage = [&](int kt) {
        if (pf_row && kt < nk && (kt * DEC_BK * (int)sizeof(T)) % 128 == 0) cu_prefetch_l2(pf_row + (size_t)kt * DEC_BK);
    };
    for (int kt = 0; kt < DEC_PREFETCH; kt++) prefetch_stage(kt);
    CU_PDL_ENTRY();
    const int m = dec_slot_list(sm, p.idx, p.slots, e, p.E, p.fault);
    if (m == 0) return;

    const int rg = warp & 3, half = warp >> 2;
    /* the warp's two 16-row tiles: GU gate rows and the matching up rows; down 32 rows */
    const int mrow0 = GU ? 16 * rg : 32 * rg, mrow1 = GU ? DEC_ROWS / 2 + 16 * rg : 32 * rg + 16;
    const T *act = (const T *)p.act;

    for (int c0 = 0; c0 < m; c0 += DEC_TOK) {
        const int mc = min(DEC_TOK, m - c0);
        /* the warp's 8-slot tiles that hold a slot of this pass (0..4) */
        const int ntiles = max(0, min(4, (mc - 32 * half + 7) / 8));
        float acc[2][4][4];
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

        auto load_w = [&](int st, int kt) {
            const int k0 = k_begin + kt * DEC_BK;
#pragma unroll
            for (int i = 0; i < 2; i++) { /* 128 rows x 4 chunks of 8 */
                const int q = tid + DEC_THREADS * i, lr = q >> 2, c8 = (q & 3) * 8, row = weight_row(lr);
                cp_async16(&sm.w[st][lr][c8], row >= 0 ? W + (size_t)row * p.k + k0 + c8 : W, row >= 0);
            }
            if (!GU) { /* 64 act rows x 4 chunks of 8 */
                const int j = tid >> 2, c8 = (tid & 3) * 8;
                const bool ok = j < mc;
                cp_async16(&sm.x[st][j][c8], ok ? act + (size_t)sm.slot[c0 + j] * p.k + k0 + c8 : act, ok);
            }
        };
        float4 xr[2]; /* GU: the next stage's x, held while this stage is multiplied */
        auto fetch_x = [&](int kt) {
#pragma unroll
            for (int i = 0; i < 2; i++) { /* 64 rows x 8 float4 */
                const int q = tid + DEC_THREADS * i, j = q >> 3, c4 = (q & 7) * 4;
                xr[i] = j < mc ? *(const float4 *)(p.x + (size_t)(sm.slot[c0 + j] / p.K) * p.k + kt * DEC_BK + c4)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        };
        auto store_x = [&](int st) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int q = tid + DEC_THREADS * i, j = q >> 3, c4 = (q & 7) * 4;
                *(uint2 *)&sm.x[st][j][c4] = pack4(xr[i], (T *)nullptr);
            }
        };
        auto multiply = [&](int st) {
            if (ntiles == 0) return;
#pragma unroll
            for (int kk = 0; kk < DEC_BK; kk += 16) {
                uint32_t a0[4], a1[4], b[4][2];
                ldsm_x4(a0, &sm.w[st][mrow0 + (lane & 15)][kk + (lane >> 4) * 8]);
                ldsm_x4(a1, &sm.w[st][mrow1 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
                for (int jp = 0; jp < 2; jp++) { /* two 8-slot tiles per ldmatrix */
                    if (2 * jp >= ntiles) break;
                    uint32_t r[4];
                    ldsm_x4(r, &sm.x[st][32 * half + 16 * jp + (lane & 7) + ((lane >> 4) << 3)][kk + ((lane >> 3) & 1) * 8]);
                    b[2 * jp][0] = r[0];
                    b[2 * jp][1] = r[1];
                    b[2 * jp + 1][0] = r[2];
                    b[2 * jp + 1][1] = r[3];
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (j >= ntiles) break;
                    mma<T>(acc[0][j], a0, b[j][0], b[j][1]);
                    mma<T>(acc[1][j], a1, b[j][0], b[j][1]);
                }
            }
        };

#pragma unroll
        for (int s = 0; s < DEC_STAGES - 1; s++) {
            if (s < nk) {
                load_w(s, s);
                if (GU) {
                    fetch_x(s);
                    store_x(s);
                }
            }
            cp_commit();
        }
        for (int kt = 0; kt < nk; kt++) {
            if (c0 == 0) prefetch_stage(kt + DEC_PREFETCH);
            cp_wait<DEC_STAGES - 2>();
            __syncthreads(); /* stage kt is in; every warp is done with stage kt - 1, the one refilled now */
            const int next = kt + DEC_STAGES - 1;
            if (next < nk) {
                load_w(next % DEC_STAGES, next);
                if (GU) fetch_x(next);
            }
            cp_commit();
            multiply(kt % DEC_STAGES);
            if (GU && next < nk) store_x(next % DEC_STAGES);
        }
        cp_wait<0>();

        /* c[q]: row lane / 4 (+ 8 for q >= 2) of the 16-row tile, slot 2 * (lane % 4) + (q & 1) of the 8 */
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (j >= ntiles) break;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int n = 32 * half + 8 * j + 2 * (lane & 3) + (q & 1), lr = (lane >> 2) + 8 * (q >> 1);
                if (n >= mc) continue;
                const int s = sm.slot[c0 + n];
                if (GU) {
                    const float g = acc[0][j][q], u = acc[1][j][q];
                    ((T *)p.dst)[(size_t)s * p.rows + r0 + 16 * rg + lr] = cu_from_f32<T>(g / (1.0f + expf(-g)) * u);
                } else {
                    float *part = (float *)p.dst + ((size_t)blockIdx.z * p.slots + s) * p.rows;
                    const int row0 = r0 + 32 * rg + lr, row1 = row0 + 16;
                    if (row0 < p.rows) part[row0] = acc[0][j][q];
                    if (row1 < p.rows) part[row1] = acc[1][j][q];
                }
            }
        }
        __syncthreads(); /* the next pass refills the stages */
    }
}

/* out[i, :] += sum_k w[i, k] * (sum over the splits of part[split, i*K + k, :]), k in order (H % 4 == 0) */
__global__ void k_moe_dec_combine(float *__restrict__ out, const float *__restrict__ part, const float *__restrict__ w,
                                  int K, int H, int slots, int splits) {
    CU_PDL_ENTRY();
    const int i = blockIdx.x;
    float4 *o = (float4 *)(out + (size_t)i * H);
    for (int j = threadIdx.x; j < H / 4; j += blockDim.x) {
        float4 v = o[j];
        for (int k = 0; k < K; k++) {
            const int s = i * K + k;
            float4 y = ((const float4 *)(part + (size_t)s * H))[j];
            for (int sp = 1; sp < splits; sp++) {
                const float4 t = ((const float4 *)(part + ((size_t)sp * slots + s) * H))[j];
                y.x += t.x;
                y.y += t.y;
                y.z += t.z;
                y.w += t.w;
            }
            const float ws = w[s];
            v.x += ws * y.x;
            v.y += ws * y.y;
            v.z += ws * y.z;
            v.w += ws * y.w;
        }
        o[j] = v;
    }
}

static bool moe_decode_batch_fits(const xo_moe_args *a, xo_dtype t, int slots, int inter) {
    return (t == XO_BF16 || t == XO_F16) && slots <= DEC_MAX_SLOTS && a->hidden % 64 == 0 && inter % 64 == 0 &&
           ((uintptr_t)a->out & 15) == 0;
}

template <typename T>
static xo_status moe_decode_batch(CuCtx *c, const xo_moe_args *a, const CuGroupPtrs &gup, const CuGroupPtrs &dnp,
                                  int inter) {
    const int n = a->tokens, K = a->top_k, E = a->num_experts, H = a->hidden, slots = n * K;
    const int row_tiles = (H + DEC_ROWS - 1) / DEC_ROWS;
    /* split the down product's k until its grid is about twice the GPU (as the gate/up grid is
     * at the default sizes), no split shorter than DEC_MIN_SPLIT_K */
    int splits = (2 * c->num_sms + row_tiles * E - 1) / (row_tiles * E);
    const int most = inter / DEC_MIN_SPLIT_K > 1 ? inter / DEC_MIN_SPLIT_K : 1;
    splits = splits < 1 ? 1 : splits > most ? most : splits;
    const int kspan = (inter / DEC_BK + splits - 1) / splits * DEC_BK;
    splits = (inter + kspan - 1) / kspan;

    const size_t b_act = ((size_t)slots * inter * sizeof(T) + 255) & ~(size_t)255;
    char *blk = (char *)cu_alloc_raw(c, b_act + (size_t)splits * slots * H * sizeof(float));
    if (!blk) return cu_fail_more(c, XO_ENOMEM, "the MoE layer (%d tokens)", n);
    float *part = (float *)(blk + b_act);

    DecArgs p;
    p.idx = a->topk_idx;
    p.x = a->x;
    p.slots = slots;
    p.K = K;
    p.E = E;
    p.fault = c->fault_dev;
    p.w = gup;
    p.act = NULL;
    p.dst = blk;
    p.rows = inter;
    p.k = H;
    p.kspan = H;
    cu_launch(c, k_moe_dec<T, true>, dim3((unsigned)(inter / (DEC_ROWS / 2)), (unsigned)E), DEC_THREADS, 0, p);
    p.w = dnp;
    p.x = NULL;
    p.act = blk;
    p.dst = part;
    p.rows = H;
    p.k = inter;
    p.kspan = kspan;
    cu_launch(c, k_moe_dec<T, false>, dim3((unsigned)row_tiles, (unsigned)E, (unsigned)splits), DEC_THREADS, 0, p);
    cu_launch(c, k_moe_dec_combine, n, H >= 1024 ? 256 : 64, 0, a->out, (const float *)part, a->topk_weight, K, H, slots,
              splits);
    cu_free(c, blk);
    return cu_check_launch(c, "moe (decode batch)");
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

    if (!c->moe_host && ((uintptr_t)a->x & 15) == 0) {
        CuGroupPtrs gup, dnp;
        bool aligned = true;
        for (int e = 0; e < E; e++) {
            gup.p[e] = a->experts[e].gate_up.data;
            dnp.p[e] = a->experts[e].down.data;
            aligned &= (((uintptr_t)gup.p[e] | (uintptr_t)dnp.p[e]) & 15) == 0;
        }
        if (aligned && slots <= INDEXED_MAX_SLOTS && H % 8 == 0 && inter % 8 == 0) {
            c->moe_counts[XO_MOE_PATH_INDEXED]++;
            if (t == XO_BF16) return moe_indexed<__nv_bfloat16>(c, a, gup, dnp, inter);
            if (t == XO_F16) return moe_indexed<__half>(c, a, gup, dnp, inter);
            return moe_indexed<float>(c, a, gup, dnp, inter);
        }
        if (aligned && moe_decode_batch_fits(a, t, slots, inter)) {
            c->moe_counts[XO_MOE_PATH_DECODE_BATCH]++;
            if (t == XO_BF16) return moe_decode_batch<__nv_bfloat16>(c, a, gup, dnp, inter);
            return moe_decode_batch<__half>(c, a, gup, dnp, inter);
        }
    }
    enum { HOST, SKINNY, WMMA } mode;
    if (c->moe_host) mode = HOST;
    else if (slots <= SKINNY_MAX_SLOTS) mode = SKINNY;
    else if (t != XO_F32 && H % 8 == 0 && inter % 8 == 0) mode = WMMA;
    else mode = HOST;
    const int bm = cu_grouped_tile_rows(slots, E);
    /* on Hopper the gate/up product ends in the SwiGLU: no float32 gate|up in between */
    const bool hopper = mode == WMMA && cu_grouped_hopper_fits(c, bm, E, slots, H, inter);
    c->moe_counts[mode == HOST     ? XO_MOE_PATH_HOST
                  : mode == SKINNY ? XO_MOE_PATH_SKINNY
                  : hopper         ? XO_MOE_PATH_GROUPED_WGMMA
                                   : XO_MOE_PATH_GROUPED]++;
    const size_t es = mode == WMMA ? 2 : 4; /* grouped activations: 16-bit for the tensor cores */

    /* one scratch block: ints (counts[E] offsets[E+1] tile_start[E+1] rank[slots] slot_of[slots]),
     * grouped inputs, gate|up, activations, grouped outputs; only the counts need zeroing */
    const size_t ints = (size_t)3 * E + 2 + 2 * (size_t)slots;
    auto up = [](size_t b) { return (b + 255) & ~(size_t)255; };
    const size_t b_int = up(ints * sizeof(int)), b_xg = up((size_t)slots * H * es),
                 b_gu = hopper ? 0 : up((size_t)slots * 2 * inter * sizeof(float)), b_act = up((size_t)slots * inter * es),
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
        } else if (hopper) {
            const int max_tiles = (slots + bm - 1) / bm + E;
            rc = cu_grouped_swiglu_hopper(c, act, xg, slots, &gup, t, inter, H, offsets, tile_start, E, max_tiles);
            if (rc == XO_OK) rc = cu_grouped_gemm_hopper(c, yg, act, slots, &dnp, t, H, inter, offsets, tile_start, E, max_tiles);
        } else if (mode == WMMA) {
            const int max_tiles = (slots + bm - 1) / bm + E;
            rc = cu_grouped_gemm16(c, gu, xg, &gup, t, 2 * inter, H, offsets, tile_start, E, max_tiles, bm);
            if (rc == XO_OK) rc = cu_swiglu_to(c, act, t, gu, (size_t)slots, inter);
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
