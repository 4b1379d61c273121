/* Matrix products y[m, out] = x[m, in] @ W.T.
 *
 * - cuBLASLt where the build has it (setup.py found cublasLt.h) and the library was loaded
 *   (backends/cuda/cublaslt.cu), else the kernels below.
 * - a "skinny" kernel for a few rows (decode): one warp per output row, the weight row
 *   streamed once with 16-byte loads for up to 8 activation rows at a time.
 * - two products of one x in one launch for a few rows (matmul_pair), the first optionally
 *   rotated as it is stored.
 * - the products after an RMSNorm (rmsnorm_matmul, rmsnorm_matmul_pair, rmsnorm_ffn): over many
 *   rows with 16-bit weights the norm stores x 16-bit for the GEMM, so no conversion pass.
 * - grouped products for the MoE, driven by device-side group offsets (no host round trip):
 *   a WMMA tensor-core kernel (16-bit) and the skinny kernel per group.
 * - a plain tiled fp32 kernel for the products the others do not take. */
#include <mma.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/common.h"
#include "backends/cuda/mma.h"

using namespace nvcuda;

/* ------------------------------------------------------------------ skinny (few rows) */

/* One warp per output row; rows [off, off+cnt) of x (group g) against W_g. */
template <typename W, int MT, bool VEC>
__global__ __launch_bounds__(256) void k_skinny(float *__restrict__ y, const float *__restrict__ x, CuGroupPtrs wp, int out,
                                                int k, const int *__restrict__ offsets, int dense_m) {
    const int g = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + warp;
    const W *wr = (const W *)wp.p[g] + (size_t)row * k;
    if (!offsets && row < out) /* dense: this row's weights are needed whatever came before */
        for (int kk = lane * 8; kk < k; kk += 256) cu_prefetch_l2(wr + kk);
    CU_PDL_ENTRY();
    int off, cnt;
    if (offsets) {
        off = offsets[g];
        cnt = offsets[g + 1] - off;
    } else {
        off = 0;
        cnt = dense_m;
    }
    if (cnt <= 0) return;
    if (row >= out) return;
    for (int t0 = 0; t0 < cnt; t0 += MT) {
        float acc[MT];
#pragma unroll
        for (int t = 0; t < MT; t++) acc[t] = 0.0f;
        if (VEC) {
#pragma unroll 4
            for (int kk = lane * 8; kk < k; kk += 256) {
                float wv[8];
                load8(wr + kk, wv);
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    if (t0 + t < cnt) {
                        float xv[8];
                        load8(x + (size_t)(off + t0 + t) * k + kk, xv);
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[t] = fmaf(wv[e], xv[e], acc[t]);
                    }
                }
            }
        } else {
            for (int kk = lane; kk < k; kk += 32) {
                float wv = cu_ld(wr, kk);
#pragma unroll
                for (int t = 0; t < MT; t++)
                    if (t0 + t < cnt) acc[t] = fmaf(wv, x[(size_t)(off + t0 + t) * k + kk], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < MT; t++) {
            float v = acc[t];
            for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && t0 + t < cnt) y[(size_t)(off + t0 + t) * out + row] = v;
        }
    }
}

template <typename W, int MT>
static void launch_skinny_t(CuCtx *c, float *y, const float *x, const CuGroupPtrs *wp, int out, int k, const int *offsets,
                            int groups, int dense_m) {
    dim3 grid((unsigned)((out + 7) / 8), (unsigned)groups);
    bool vec = k % 8 == 0 && ((uintptr_t)x & 15) == 0;
    for (int g = 0; g < groups && vec; g++) vec = ((uintptr_t)wp->p[g] & 15) == 0;
    if (vec) cu_launch(c, k_skinny<W, MT, true>, grid, 256, 0, y, x, *wp, out, k, offsets, dense_m);
    else cu_launch(c, k_skinny<W, MT, false>, grid, 256, 0, y, x, *wp, out, k, offsets, dense_m);
}

template <int MT>
static void launch_skinny_mt(CuCtx *c, float *y, const float *x, const CuGroupPtrs *wp, xo_dtype t, int out, int k,
                             const int *offsets, int groups, int dense_m) {
    if (t == XO_F32) launch_skinny_t<float, MT>(c, y, x, wp, out, k, offsets, groups, dense_m);
    else if (t == XO_BF16) launch_skinny_t<__nv_bfloat16, MT>(c, y, x, wp, out, k, offsets, groups, dense_m);
    else launch_skinny_t<__half, MT>(c, y, x, wp, out, k, offsets, groups, dense_m);
}

static xo_status skinny(CuCtx *c, float *y, const float *x, const CuGroupPtrs *wp, xo_dtype t, int out, int k,
                        const int *offsets, int groups, int dense_m, int mt) {
    if (out <= 0) return XO_OK;
    if (mt <= 1) launch_skinny_mt<1>(c, y, x, wp, t, out, k, offsets, groups, dense_m);
    else if (mt <= 2) launch_skinny_mt<2>(c, y, x, wp, t, out, k, offsets, groups, dense_m);
    else if (mt <= 4) launch_skinny_mt<4>(c, y, x, wp, t, out, k, offsets, groups, dense_m);
    else launch_skinny_mt<8>(c, y, x, wp, t, out, k, offsets, groups, dense_m);
    return cu_check_launch(c, "skinny gemm");
}

xo_status cu_grouped_skinny(CuCtx *c, float *y, const float *x, const CuGroupPtrs *w, xo_dtype t, int out, int k,
                            const int *offsets, int groups) {
    return skinny(c, y, x, w, t, out, k, offsets, groups, 0, 4);
}

/* aa[t] = wa . x[t0 + t] and ab[t] = wb . x[t0 + t] (rows of k) for t < MT and t0 + t < m,
 * summed over the warp: every lane holds the sums. Lane l takes the pieces l * 8 + 256 i, each
 * accumulated in k order (k_skinny's order); UNROLL only shapes the code. */
template <typename W, int MT, int UNROLL>
__device__ __forceinline__ void warp_dot2(float (&aa)[MT], float (&ab)[MT], const W *__restrict__ wa,
                                          const W *__restrict__ wb, const float *__restrict__ x, int k, int t0, int m) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int t = 0; t < MT; t++) aa[t] = ab[t] = 0.0f;
#pragma unroll UNROLL
    for (int kk = lane * 8; kk < k; kk += 256) {
        float va[8], vb[8];
        load8(wa + kk, va);
        load8(wb + kk, vb);
#pragma unroll
        for (int t = 0; t < MT; t++) {
            if (t0 + t < m) {
                float xv[8];
                load8(x + (size_t)(t0 + t) * k + kk, xv);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    aa[t] = fmaf(va[e], xv[e], aa[t]);
                    ab[t] = fmaf(vb[e], xv[e], ab[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
        for (int o = 16; o; o >>= 1) {
            aa[t] += __shfl_xor_sync(0xffffffffu, aa[t], o);
            ab[t] += __shfl_xor_sync(0xffffffffu, ab[t], o);
        }
}

/* act[m, I] = swiglu(x @ W.T) for a few rows, W = [gate; up] with 2I rows: one warp per
 * activation column r takes gate row r and up row I + r, so gu never goes to memory
 * (k % 8 == 0, 16-byte aligned). */
template <typename W, int MT>
__global__ __launch_bounds__(256) void k_skinny_gu(float *__restrict__ act, const float *__restrict__ x,
                                                   const W *__restrict__ w, int inter, int k, int m) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * 8 + warp;
    const W *wg = w + (size_t)r * k, *wu = w + (size_t)(inter + r) * k;
    if (r < inter)
        for (int kk = lane * 8; kk < k; kk += 256) {
            cu_prefetch_l2(wg + kk);
            cu_prefetch_l2(wu + kk);
        }
    CU_PDL_ENTRY();
    if (r >= inter) return;
    float ag[MT], au[MT];
    warp_dot2<W, MT, 2>(ag, au, wg, wu, x, k, 0, m);
    if (lane == 0)
#pragma unroll
        for (int t = 0; t < MT; t++)
            if (t < m) act[(size_t)t * inter + r] = ag[t] / (1.0f + expf(-ag[t])) * au[t];
}

enum { GU_FUSED_MAX_M = 4 };

template <typename W>
static void launch_skinny_gu(CuCtx *c, float *act, const float *x, const void *w, int inter, int k, int m) {
    const unsigned grid = (unsigned)((inter + 7) / 8);
    if (m <= 1) cu_launch(c, k_skinny_gu<W, 1>, grid, 256, 0, act, x, (const W *)w, inter, k, m);
    else cu_launch(c, k_skinny_gu<W, GU_FUSED_MAX_M>, grid, 256, 0, act, x, (const W *)w, inter, k, m);
}

static xo_status act16_of(CuCtx *c, const float *x, size_t n, xo_dtype t);

xo_status cu_gate_up_swiglu(xo_backend *be, float *act, const float *x, float *gu, const xo_linear *w, int m) {
    CuCtx *c = cu_ctx(be);
    const int inter = w->out / 2, k = w->in;
    if (m <= 0 || inter <= 0) return XO_OK;
    const bool fused = m <= GU_FUSED_MAX_M && k > 0 && k % 8 == 0 && (((uintptr_t)x | (uintptr_t)w->data) & 15) == 0 &&
                       (w->dtype == XO_BF16 || w->dtype == XO_F16 || w->dtype == XO_F32);
    if (!fused && cu_is16(w->dtype) && cu_swiglu_hopper_fits(c, m, k, inter)) {
        /* the SwiGLU in the product's epilogue, float32 out: the values the ffn entry rounds */
        XO_TRY(act16_of(c, x, (size_t)m * k, w->dtype));
        return cu_swiglu_hopper(c, act, true, c->act16, m, w, k);
    }
    if (!fused) {
        XO_TRY(cu_matmul(be, gu, x, w, m));
        return cu_swiglu(be, act, gu, m, inter);
    }
    if (w->dtype == XO_BF16) launch_skinny_gu<__nv_bfloat16>(c, act, x, w->data, inter, k, m);
    else if (w->dtype == XO_F16) launch_skinny_gu<__half>(c, act, x, w->data, inter, k, m);
    else launch_skinny_gu<float>(c, act, x, w->data, inter, k, m);
    return cu_check_launch(c, "gate_up swiglu");
}

/* ------------------------------------------------------------------ WMMA grouped GEMM (16-bit) */

enum { G_BM = 64, G_BN = 128, G_BK = 32, G_LDS = G_BK + 8, G_LDC = G_BN + 4 };

constexpr int G_SMEM_STAGE = (G_BM + G_BN) * G_LDS * 2;             /* bytes, one stage of A and B */
constexpr int G_SMEM = 2 * G_SMEM_STAGE > G_BM * G_LDC * 4 ? 2 * G_SMEM_STAGE : G_BM * G_LDC * 4;

/* Y[row0 .. row0+rows) = X[same rows, k] @ W_g[out, k]^T for the tile (group, m-tile) that
 * blockIdx.y names. Needs k % 8 == 0 (16-byte copies). */
template <typename T>
__global__ __launch_bounds__(256) void k_grouped_wmma(float *__restrict__ y, const T *__restrict__ x, CuGroupPtrs wp,
                                                      int out, int k, const int *__restrict__ offsets,
                                                      const int *__restrict__ tile_start, int groups, int dense_m) {
    __shared__ __align__(128) unsigned char smem[G_SMEM];
    int g = 0, row0, rows;
    const int tile = blockIdx.y;
    if (offsets) {
        if (tile >= tile_start[groups]) return;
        while (tile >= tile_start[g + 1]) g++;
        row0 = offsets[g] + (tile - tile_start[g]) * G_BM;
        rows = min(G_BM, offsets[g + 1] - row0);
    } else {
        row0 = tile * G_BM;
        rows = min(G_BM, dense_m - row0);
    }
    if (rows <= 0) return;
    const T *W = (const T *)wp.p[g];
    const int n0 = blockIdx.x * G_BN;
    const int tid = threadIdx.x, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3; /* 2 x 4 warps, each 32 x 32 */

    auto As = [&](int s) { return (T *)(smem + s * G_SMEM_STAGE); };
    auto Bs = [&](int s) { return (T *)(smem + s * G_SMEM_STAGE + G_BM * G_LDS * 2); };

    auto load = [&](int s, int k0) {
        {   /* A: 64 rows x 32 = 256 chunks of 8 */
            int r = tid >> 2, c8 = (tid & 3) * 8;
            bool ok = r < rows && k0 + c8 < k;
            const T *src = ok ? x + (size_t)(row0 + r) * k + k0 + c8 : x;
            cp_async16(As(s) + r * G_LDS + c8, src, ok);
        }
#pragma unroll
        for (int i = 0; i < 2; i++) { /* B: 128 rows x 32 */
            int r = (tid >> 2) + 64 * i, c8 = (tid & 3) * 8;
            bool ok = n0 + r < out && k0 + c8 < k;
            const T *src = ok ? W + (size_t)(n0 + r) * k + k0 + c8 : W;
            cp_async16(Bs(s) + r * G_LDS + c8, src, ok);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    const int nk = (k + G_BK - 1) / G_BK;
    load(0, 0);
    cp_commit();
    for (int kt = 0; kt < nk; kt++) {
        if (kt + 1 < nk) {
            load((kt + 1) & 1, (kt + 1) * G_BK);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const T *a = As(kt & 1), *b = Bs(kt & 1);
#pragma unroll
        for (int kk = 0; kk < G_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], a + (wm * 32 + i * 16) * G_LDS + kk, G_LDS);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], b + (wn * 32 + j * 16) * G_LDS + kk, G_LDS);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    float *cs = (float *)smem;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * G_LDC + wn * 32 + j * 16, acc[i][j], G_LDC, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < G_BM * G_BN; e += 256) {
        int r = e / G_BN, cc = e % G_BN;
        if (r < rows && n0 + cc < out) y[(size_t)(row0 + r) * out + n0 + cc] = cs[r * G_LDC + cc];
    }
}

/* The larger tile: 128 x 128 x 32, three cp.async stages, each warp 64 x 32 (4 x 2 fragments). */
enum { H_BM = 128, H_BN = 128, H_BK = 32, H_LDS = H_BK + 8, H_ST = 3, H_LDE = 20 };
constexpr int H_STAGE = (H_BM + H_BN) * H_LDS * 2;
constexpr int H_SMEM = H_ST * H_STAGE + 8 * 16 * H_LDE * 4;

template <typename T>
__global__ __launch_bounds__(256) void k_grouped_wmma2(float *__restrict__ y, const T *__restrict__ x, CuGroupPtrs wp, int out,
                                                       int k, const int *__restrict__ offsets,
                                                       const int *__restrict__ tile_start, int groups) {
    extern __shared__ __align__(128) unsigned char hsm[];
    int g = 0;
    const int tile = blockIdx.y;
    if (tile >= tile_start[groups]) return;
    while (tile >= tile_start[g + 1]) g++;
    const int row0 = offsets[g] + (tile - tile_start[g]) * H_BM;
    const int rows = min(H_BM, offsets[g + 1] - row0);
    if (rows <= 0) return;
    const T *W = (const T *)wp.p[g];
    const int n0 = blockIdx.x * H_BN;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3; /* 2 x 4 warps, each 64 x 32 */

    auto As = [&](int s) { return (T *)(hsm + s * H_STAGE); };
    auto Bs = [&](int s) { return (T *)(hsm + s * H_STAGE + H_BM * H_LDS * 2); };
    auto load = [&](int s, int k0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = (tid >> 2) + 64 * i, c8 = (tid & 3) * 8;
            const bool oka = r < rows && k0 + c8 < k;
            cp_async16(As(s) + r * H_LDS + c8, oka ? x + (size_t)(row0 + r) * k + k0 + c8 : x, oka);
            const bool okb = n0 + r < out && k0 + c8 < k;
            cp_async16(Bs(s) + r * H_LDS + c8, okb ? W + (size_t)(n0 + r) * k + k0 + c8 : W, okb);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    const int nk = (k + H_BK - 1) / H_BK;
#pragma unroll
    for (int s = 0; s < H_ST - 1; s++) {
        if (s < nk) load(s, s * H_BK);
        cp_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_wait<H_ST - 2>();
        __syncthreads();
        const int nxt = kt + H_ST - 1;
        if (nxt < nk) load(nxt % H_ST, nxt * H_BK);
        cp_commit();
        const T *a = As(kt % H_ST), *b = Bs(kt % H_ST);
#pragma unroll
        for (int kk = 0; kk < H_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
            for (int i = 0; i < 4; i++) wmma::load_matrix_sync(fa[i], a + (wm * 64 + i * 16) * H_LDS + kk, H_LDS);
#pragma unroll
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], b + (wn * 32 + j * 16) * H_LDS + kk, H_LDS);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    cp_wait<0>();
    float *st = (float *)(hsm + H_ST * H_STAGE) + warp * 16 * H_LDE;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            wmma::store_matrix_sync(st, acc[i][j], H_LDE, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int r = e >> 4, cc = e & 15;
                const int row = wm * 64 + i * 16 + r, col = n0 + wn * 32 + j * 16 + cc;
                if (row < rows && col < out) y[(size_t)(row0 + row) * out + col] = st[r * H_LDE + cc];
            }
            __syncwarp();
        }
}

/* The 64-row kernel while groups average under 64 rows (decode batches: a 128-row tile would
 * be mostly padding), the 128-row one beyond. */
int cu_grouped_tile_rows(int rows, int groups) { return rows < (int)G_BM * groups ? (int)G_BM : (int)H_BM; }

xo_status cu_grouped_gemm16(CuCtx *c, float *y, const void *x16, const CuGroupPtrs *w, xo_dtype t, int out, int k,
                            const int *offsets, const int *tile_start, int groups, int max_tiles, int bm) {
    if (out <= 0 || max_tiles <= 0) return XO_OK;
    if (k % 8) return cu_fail(c, XO_EUNSUPPORTED, "grouped GEMM needs k %% 8 == 0 (k = %d)", k);
    if (bm == H_BM) {
        dim3 grid((unsigned)((out + H_BN - 1) / H_BN), (unsigned)max_tiles);
        cudaError_t e;
        if (t == XO_BF16) {
            e = cudaFuncSetAttribute(k_grouped_wmma2<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, H_SMEM);
            if (e == cudaSuccess)
                k_grouped_wmma2<__nv_bfloat16><<<grid, 256, H_SMEM, c->stream>>>(y, (const __nv_bfloat16 *)x16, *w, out, k,
                                                                                 offsets, tile_start, groups);
        } else {
            e = cudaFuncSetAttribute(k_grouped_wmma2<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, H_SMEM);
            if (e == cudaSuccess)
                k_grouped_wmma2<__half><<<grid, 256, H_SMEM, c->stream>>>(y, (const __half *)x16, *w, out, k, offsets,
                                                                          tile_start, groups);
        }
        if (e != cudaSuccess) return cu_check(c, e, "grouped gemm (shared memory)");
        return cu_check_launch(c, "grouped gemm");
    }
    dim3 grid((unsigned)((out + G_BN - 1) / G_BN), (unsigned)max_tiles);
    if (t == XO_BF16)
        k_grouped_wmma<__nv_bfloat16><<<grid, 256, 0, c->stream>>>(y, (const __nv_bfloat16 *)x16, *w, out, k, offsets,
                                                                    tile_start, groups, 0);
    else
        k_grouped_wmma<__half><<<grid, 256, 0, c->stream>>>(y, (const __half *)x16, *w, out, k, offsets, tile_start,
                                                             groups, 0);
    return cu_check_launch(c, "grouped gemm");
}

/* ------------------------------------------------------------------ fallback tiled GEMM (any types) */

template <typename X, typename W>
__global__ __launch_bounds__(256) void k_gemm_simt(float *__restrict__ y, const X *__restrict__ x, const W *__restrict__ w,
                                                   int m, int n, int k) {
    __shared__ float xs[16][64 + 1], ws[16][64 + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += 16) {
        for (int e = threadIdx.x; e < 64 * 16; e += 256) {
            int r = e / 16, kk = e % 16;
            xs[kk][r] = (m0 + r < m && k0 + kk < k) ? cu_ld(x, (size_t)(m0 + r) * k + k0 + kk) : 0.0f;
            ws[kk][r] = (n0 + r < n && k0 + kk < k) ? cu_ld(w, (size_t)(n0 + r) * k + k0 + kk) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = m0 + ty + 16 * i, cc = n0 + tx + 16 * j;
            if (r < m && cc < n) y[(size_t)r * n + cc] = acc[i][j];
        }
}

template <typename X>
static xo_status gemm_simt(CuCtx *c, float *y, const X *x, const void *w, xo_dtype t, int m, int n, int k) {
    dim3 grid((unsigned)((n + 63) / 64), (unsigned)((m + 63) / 64));
    if (t == XO_F32) k_gemm_simt<X, float><<<grid, 256, 0, c->stream>>>(y, x, (const float *)w, m, n, k);
    else if (t == XO_BF16) k_gemm_simt<X, __nv_bfloat16><<<grid, 256, 0, c->stream>>>(y, x, (const __nv_bfloat16 *)w, m, n, k);
    else k_gemm_simt<X, __half><<<grid, 256, 0, c->stream>>>(y, x, (const __half *)w, m, n, k);
    return cu_check_launch(c, "gemm (fallback)");
}

/* ------------------------------------------------------------------ entry points */

xo_status cu_matmul16(CuCtx *c, float *y, const void *x16, const xo_linear *w, int m) {
    xo_status rc = XO_OK;
    if (cu_lt_gemm(c, y, x16, w->data, w->dtype, m, w->out, w->in, &rc)) return rc;
    if (w->in % 8 == 0) {
        CuGroupPtrs wp;
        wp.p[0] = w->data;
        dim3 grid((unsigned)((w->out + G_BN - 1) / G_BN), (unsigned)((m + G_BM - 1) / G_BM));
        if (w->dtype == XO_BF16)
            k_grouped_wmma<__nv_bfloat16><<<grid, 256, 0, c->stream>>>(y, (const __nv_bfloat16 *)x16, wp, w->out, w->in,
                                                                        NULL, NULL, 1, m);
        else
            k_grouped_wmma<__half><<<grid, 256, 0, c->stream>>>(y, (const __half *)x16, wp, w->out, w->in, NULL, NULL, 1, m);
        return cu_check_launch(c, "gemm (wmma)");
    }
    if (w->dtype == XO_BF16) return gemm_simt(c, y, (const __nv_bfloat16 *)x16, w->data, w->dtype, m, w->out, w->in);
    return gemm_simt(c, y, (const __half *)x16, w->data, w->dtype, m, w->out, w->in);
}

int cu_matmul16_batched(CuCtx *c, float *y, const void *x16, long long x_stride, const xo_linear *w, int m, int batch,
                        xo_status *rc) {
    if (!c->lt || batch < 2 || m < 1 || w->out % 8) return 0;
    return cu_lt_gemm_batched(c, y, x16, x_stride, w->data, w->dtype, m, w->out, w->in, batch, rc);
}

/* c->act16 <- the n values of x in the 16-bit type t */
static xo_status act16_of(CuCtx *c, const float *x, size_t n, xo_dtype t) {
    XO_TRY(cu_act16_reserve(c, n * 2));
    return cu_convert_act(c, c->act16, x, n, t);
}

xo_status cu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m) {
    CuCtx *c = cu_ctx(be);
    if (m <= 0 || w->out <= 0) return XO_OK;
    if (w->dtype != XO_F32 && w->dtype != XO_BF16 && w->dtype != XO_F16)
        return cu_fail(c, XO_EUNSUPPORTED, "CUDA matmul: weight dtype %d unsupported", (int)w->dtype);
    if (w->in <= 0) return cu_check(c, cudaMemsetAsync(y, 0, (size_t)m * w->out * sizeof(float), c->stream), "matmul");
    if (m <= CU_SKINNY_MAX_M) {
        CuGroupPtrs wp;
        wp.p[0] = w->data;
        return skinny(c, y, x, &wp, w->dtype, w->out, w->in, NULL, 1, m, m);
    }
    if (w->dtype == XO_F32) {
        xo_status rc = XO_OK;
        if (cu_lt_gemm(c, y, x, w->data, XO_F32, m, w->out, w->in, &rc)) return rc;
        return gemm_simt(c, y, x, w->data, XO_F32, m, w->out, w->in);
    }
    XO_TRY(act16_of(c, x, (size_t)m * w->in, w->dtype));
    return cu_matmul16(c, y, c->act16, w, m);
}

/* The products over a 16-bit x where cu_matmul would convert a float32 one (many rows, 16-bit
 * weights): the rmsnorm_* entries then have the norm store x 16-bit, in c->act16, instead. */
static bool reads16(const xo_linear *w, int m) { return m > CU_SKINNY_MAX_M && cu_is16(w->dtype) && w->in > 0 && w->out > 0; }

/* c->act16 <- the normed rows of nm, as the 16-bit type t; nm->x written only if nm->keep */
static xo_status norm16(CuCtx *c, const xo_rmsnorm_in *nm, int m, xo_dtype t) {
    XO_TRY(cu_act16_reserve(c, (size_t)m * nm->d * 2));
    return cu_rmsnorm_to16(c, c->act16, t, nm, m);
}

/* nm->x <- the normed rows of nm, float32 */
static xo_status norm32(xo_backend *be, const xo_rmsnorm_in *nm, int m) {
    if (nm->add) return cu_add_rmsnorm(be, nm->h, nm->add, nm->x, nm->w, m, nm->d, nm->eps);
    return cu_rmsnorm(be, nm->x, nm->h, nm->d, nm->w, m, nm->d, nm->eps);
}

xo_status cu_rmsnorm_matmul(xo_backend *be, float *y, const xo_rmsnorm_in *nm, const xo_linear *w, int m) {
    CuCtx *c = cu_ctx(be);
    if (m <= 0) return XO_OK;
    if (!reads16(w, m) || w->in != nm->d) {
        XO_TRY(norm32(be, nm, m));
        return cu_matmul(be, y, nm->x, w, m);
    }
    XO_TRY(norm16(c, nm, m, w->dtype));
    return cu_matmul16(c, y, c->act16, w, m);
}

/* The SwiGLU FFN over x (float32), or over x16 (not NULL: x already in gate_up's 16-bit type, the
 * product reads16 takes). Over many rows with 16-bit weights the composition would write the activation
 * float32 and convert it for the down product: here k_swiglu stores it converted, in c->act16 (the
 * gate_up product has read its x from there by then, in stream order). On Hopper the gate/up
 * product ends in the SwiGLU itself (grouped_gemm_hopper.cu) and stores the 16-bit activation in
 * the act scratch: no float32 gate|up at all. */
static xo_status ffn_from(xo_backend *be, float *out, const float *x, const void *x16, const xo_ffn *f, int n, float *gu,
                          float *act) {
    CuCtx *c = cu_ctx(be);
    const xo_linear *gw = &f->gate_up, *dw = &f->down;
    const int inter = gw->out / 2;
    const bool act16 = n > CU_SKINNY_MAX_M && cu_is16(dw->dtype) && inter > 0 && dw->in == inter && dw->out > 0;
    if (!act16 && !x16) {
        XO_TRY(cu_gate_up_swiglu(be, act, x, gu, gw, n));
        return cu_matmul(be, out, act, dw, n);
    }
    if (act16 && gw->dtype == dw->dtype && cu_swiglu_hopper_fits(c, n, gw->in, inter)) {
        if (!x16) {
            XO_TRY(act16_of(c, x, (size_t)n * gw->in, gw->dtype));
            x16 = c->act16;
        }
        XO_TRY(cu_swiglu_hopper(c, act, false, x16, n, gw, gw->in));
        return cu_matmul16(c, out, act, dw, n);
    }
    /* as cu_gate_up_swiglu does it for many rows */
    XO_TRY(x16 ? cu_matmul16(c, gu, x16, gw, n) : cu_matmul(be, gu, x, gw, n));
    if (!act16) {
        XO_TRY(cu_swiglu(be, act, gu, n, inter));
        return cu_matmul(be, out, act, dw, n);
    }
    XO_TRY(cu_act16_reserve(c, (size_t)n * inter * 2));
    XO_TRY(cu_swiglu_to(c, c->act16, dw->dtype, gu, (size_t)n, inter));
    return cu_matmul16(c, out, c->act16, dw, n);
}

xo_status cu_ffn(xo_backend *be, float *out, const float *x, const xo_ffn *f, int n, float *gu, float *act) {
    return ffn_from(be, out, x, NULL, f, n, gu, act);
}

xo_status cu_rmsnorm_ffn(xo_backend *be, float *out, const xo_rmsnorm_in *nm, const xo_ffn *f, int n, float *gu,
                         float *act) {
    CuCtx *c = cu_ctx(be);
    if (n <= 0) return XO_OK;
    if (!reads16(&f->gate_up, n) || f->gate_up.in != nm->d) {
        XO_TRY(norm32(be, nm, n));
        return ffn_from(be, out, nm->x, NULL, f, n, gu, act);
    }
    XO_TRY(norm16(c, nm, n, f->gate_up.dtype));
    return ffn_from(be, out, nm->x, c->act16, f, n, gu, act);
}

/* ------------------------------------------------------------------ two products from one x */

/* y1 = x @ W1.T and y2 = x @ W2.T for a few rows in one launch (matmul_pair: q and kv_a). Each
 * warp takes a unit of two output rows, so a rotated y1 needs no second pass: with ROT the
 * units of y1 are the rotary pairs (h*hd + j, h*hd + j + hd/2), which the warp rotates as it
 * stores them; the other units are rows (2u, 2u + 1), of y1 first, then of y2. Each dot product
 * runs in k_skinny's order, so the values are those of two matmuls and a rope, to the bit.
 * k % 8 == 0, 16-byte aligned x and weights. */
struct CuPairRot {
    const int32_t *pos;
    const float *inv_freq;
    float mscale;
    int half; /* head_dim / 2 */
};

enum { PAIR_WARPS = 4 };

template <typename W, int MT, bool ROT>
__global__ __launch_bounds__(PAIR_WARPS * 32) void k_skinny_pair(float *__restrict__ y1, float *__restrict__ y2,
                                                                 const float *__restrict__ x, const W *__restrict__ w1,
                                                                 const W *__restrict__ w2, int out1, int out2, int k,
                                                                 int m, int units1, CuPairRot rot) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int u = blockIdx.x * PAIR_WARPS + warp;
    const bool first = u < units1, rotate = ROT && first;
    int ra, j = 0;
    if (rotate) {
        const int h = u / rot.half;
        j = u - h * rot.half;
        ra = 2 * h * rot.half + j;
    } else {
        ra = 2 * (first ? u : u - units1);
    }
    const int rb = rotate ? ra + rot.half : ra + 1;
    const int out = first ? out1 : out2;
    const bool live = ra < out, has_b = rb < out;
    const W *wa = (first ? w1 : w2) + (size_t)ra * k;
    const W *wb = has_b ? (first ? w1 : w2) + (size_t)rb * k : wa; /* a lone last row: its second dot is dropped */
    float *y = first ? y1 : y2;
    if (live)
        for (int kk = lane * 8; kk < k; kk += 256) {
            cu_prefetch_l2(wa + kk);
            if (has_b) cu_prefetch_l2(wb + kk);
        }
    CU_PDL_ENTRY();
    if (!live) return;
    for (int t0 = 0; t0 < m; t0 += MT) {
        float aa[MT], ab[MT];
        warp_dot2<W, MT, 4>(aa, ab, wa, wb, x, k, t0, m);
#pragma unroll
        for (int t = 0; t < MT; t++) {
            float a = aa[t], b = ab[t];
            if (lane == 0 && t0 + t < m) {
                if (rotate) {
                    float cs, sn;
                    cu_rope_angle(rot.pos[t0 + t], rot.inv_freq[j], rot.mscale, cs, sn);
                    cu_rope_pair(a, b, cs, sn);
                }
                float *yr = y + (size_t)(t0 + t) * out;
                yr[ra] = a;
                if (has_b) yr[rb] = b;
            }
        }
    }
}

template <typename W, int MT>
static void launch_pair_mt(CuCtx *c, unsigned grid, float *y1, float *y2, const float *x, const void *w1, const void *w2,
                           int out1, int out2, int k, int m, int units1, const CuPairRot *rot) {
    if (rot)
        cu_launch(c, k_skinny_pair<W, MT, true>, grid, PAIR_WARPS * 32, 0, y1, y2, x, (const W *)w1, (const W *)w2, out1,
                  out2, k, m, units1, *rot);
    else
        cu_launch(c, k_skinny_pair<W, MT, false>, grid, PAIR_WARPS * 32, 0, y1, y2, x, (const W *)w1, (const W *)w2, out1,
                  out2, k, m, units1, CuPairRot{});
}

template <typename W>
static void launch_pair(CuCtx *c, unsigned grid, float *y1, float *y2, const float *x, const void *w1, const void *w2,
                        int out1, int out2, int k, int m, int units1, const CuPairRot *rot) {
    if (m <= 1) launch_pair_mt<W, 1>(c, grid, y1, y2, x, w1, w2, out1, out2, k, m, units1, rot);
    else if (m <= 2) launch_pair_mt<W, 2>(c, grid, y1, y2, x, w1, w2, out1, out2, k, m, units1, rot);
    else if (m <= 4) launch_pair_mt<W, 4>(c, grid, y1, y2, x, w1, w2, out1, out2, k, m, units1, rot);
    else launch_pair_mt<W, 8>(c, grid, y1, y2, x, w1, w2, out1, out2, k, m, units1, rot);
}

/* both products over one 16-bit x (the GEMMs cu_matmul would run over x converted) */
static bool pair_reads16(const xo_linear *w1, const xo_linear *w2, int m) {
    return reads16(w1, m) && reads16(w2, m) && w1->dtype == w2->dtype && w1->in == w2->in;
}

/* y1 = x16 @ W1.T (then rotated by rot), y2 = x16 @ W2.T, x16 in c->act16 */
static xo_status pair16(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2, int m,
                        const xo_rotary *rot) {
    CuCtx *c = cu_ctx(be);
    XO_TRY(cu_matmul16(c, y1, c->act16, w1, m));
    XO_TRY(cu_matmul16(c, y2, c->act16, w2, m));
    if (!rot) return XO_OK;
    return cu_rope(be, y1, (size_t)w1->out, rot->pos, m, rot->heads, rot->head_dim, rot->inv_freq, rot->mscale);
}

xo_status cu_rmsnorm_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                                 const xo_rmsnorm_in *nm, int m, const xo_rotary *rot) {
    if (m <= 0) return XO_OK;
    if (!pair_reads16(w1, w2, m) || w1->in != nm->d) {
        XO_TRY(norm32(be, nm, m));
        return cu_matmul_pair(be, y1, w1, y2, w2, nm->x, m, rot);
    }
    XO_TRY(norm16(cu_ctx(be), nm, m, w1->dtype));
    return pair16(be, y1, w1, y2, w2, m, rot);
}

xo_status cu_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2, const float *x,
                         int m, const xo_rotary *rot) {
    CuCtx *c = cu_ctx(be);
    if (m <= 0) return XO_OK;
    const int k = w1->in;
    const bool same_storage = w2->in == k && w1->dtype == w2->dtype &&
                              (w1->dtype == XO_F32 || w1->dtype == XO_BF16 || w1->dtype == XO_F16);
    const bool rot_pairs = !rot || (rot->head_dim >= 2 && rot->head_dim % 2 == 0 && rot->heads * rot->head_dim == w1->out);
    const bool fused = m <= CU_SKINNY_MAX_M && same_storage && rot_pairs && k > 0 && k % 8 == 0 && w1->out > 0 &&
                       w2->out > 0 && (((uintptr_t)x | (uintptr_t)w1->data | (uintptr_t)w2->data) & 15) == 0;
    if (!fused) { /* many rows (each product its own GEMM), or shapes the kernel does not take */
        if (pair_reads16(w1, w2, m)) { /* x converted once for both GEMMs, where two cu_matmul would convert it twice */
            XO_TRY(act16_of(c, x, (size_t)m * k, w1->dtype));
            return pair16(be, y1, w1, y2, w2, m, rot);
        }
        XO_TRY(cu_matmul(be, y1, x, w1, m));
        XO_TRY(cu_matmul(be, y2, x, w2, m));
        if (!rot) return XO_OK;
        return cu_rope(be, y1, (size_t)w1->out, rot->pos, m, rot->heads, rot->head_dim, rot->inv_freq, rot->mscale);
    }
    const int units1 = rot ? w1->out / 2 : (w1->out + 1) / 2, units2 = (w2->out + 1) / 2;
    const unsigned grid = (unsigned)((units1 + units2 + PAIR_WARPS - 1) / PAIR_WARPS);
    CuPairRot pr = {};
    if (rot) pr = CuPairRot{ rot->pos, rot->inv_freq, rot->mscale, rot->head_dim / 2 };
    const CuPairRot *prp = rot ? &pr : NULL;
    if (w1->dtype == XO_BF16)
        launch_pair<__nv_bfloat16>(c, grid, y1, y2, x, w1->data, w2->data, w1->out, w2->out, k, m, units1, prp);
    else if (w1->dtype == XO_F16)
        launch_pair<__half>(c, grid, y1, y2, x, w1->data, w2->data, w1->out, w2->out, k, m, units1, prp);
    else
        launch_pair<float>(c, grid, y1, y2, x, w1->data, w2->data, w1->out, w2->out, k, m, units1, prp);
    return cu_check_launch(c, "matmul pair");
}
