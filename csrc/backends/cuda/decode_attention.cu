/* Decode attention over a 16-bit LATENT cache (one new token per row), without expanding K or
 * V into scratch (SPEC 4, the latent contract of backends/backend.h):
 *
 * k_latent_decode: a block takes one batch row, 4 heads (2 or 1 when the grid would be too
 * small to fill the GPU) and a range of its keys in blocks of 128. For each key block it expands K = C_block @ Wk_heads.T on the tensor cores (mma.sync
 * m16n8k16; the C tile stays in shared memory, Wk streamed in chunks of 64 latent dims by
 * cp.async double buffering), rotates K in registers (a thread holds dims d and d + hd/2 of
 * the same key: n-tiles nt and nt + 4), takes the scores with the row's queries, updates the
 * online softmax and accumulates the absorbed value sum_j p_j c_j ([rank] per head) with
 * another mma over the C tile already in shared memory (p as a sum of two 16-bit values). Each
 * block writes (max, sum, acc). The first Wk chunks are requested before the wait on the
 * earlier kernels (programmatic dependent launch). With 4 heads per block on a Hopper GPU of an
 * sm_90a build, latent_decode_hopper.cu's wgmma kernel takes its place (the same partials).
 *
 * k_latent_combine: merges the key splits of (row, head) and applies Wv once:
 * out = (sum_s e^(m_s - M) acc_s) / (L + eps) @ Wv_h.T, its Wv rows loaded before the wait.
 *
 * Semantics as the row-wise kernel of attention.cu: the query at sequence index past sees key
 * j iff j <= past and key_mask[j]; the output is acc / (sum + denom_eps), 0 when no key is
 * visible; past is read from past_device when given (a replayed step). Shapes: head_dim 64,
 * num_heads == num_kv_heads, rank a multiple of 64 up to 512, latent and weights of one
 * 16-bit type (cu_latent_decode_fits); taken under cuda_attention=auto where
 * cu_latent_decode_wins, under latent_decode always, under rows never. */
#include <math.h>

#include <type_traits>

#include "backends/cuda/common.h"
#include "backends/cuda/latent_decode.h"
#include "backends/cuda/mma.h"

namespace {

template <int HEADS> struct LatSmem {
    static constexpr size_t c_bytes = (size_t)(LD_MAX_RANK / LD_CHUNK) * LD_KEYS * LD_CHUNK * 2;
    static constexpr size_t w_bytes = (size_t)2 * HEADS * 64 * LD_CHUNK * 2;
    static constexpr size_t pt_bytes = (size_t)2 * 8 * LD_PT_LD * 2;
    static constexpr size_t s_bytes = (size_t)HEADS * LD_KEYS * 4;
    static constexpr size_t total = c_bytes + w_bytes + pt_bytes + s_bytes + 8 * 4 + LD_KEYS * 4 + LD_KEYS;
};

/* HEADS (4, 2 or 1) heads per block: the 8 warps of the expansion are (key group, head), each
 * over 128 / (8 / HEADS) keys = HEADS m-tiles of 16; fewer heads per block make more blocks,
 * each streaming less of Wk, for the grids too small to fill the GPU otherwise */
template <typename T, int HEADS>
__global__ __launch_bounds__(LD_THREADS, 1) void k_latent_decode(LatP p) {
    constexpr int COLS = HEADS * 64, MT = HEADS, KEYS_PER_WARP = MT * 16;
    using Smem = LatSmem<HEADS>;
    extern __shared__ __align__(16) unsigned char smem[];
    T *Cs = (T *)smem;                                        /* [rank/64][128 keys][64] */
    T *Ws = (T *)(smem + Smem::c_bytes);                      /* [2 stages][COLS][64] */
    /* P as hi + lo, two values of T ([8 heads][LD_PT_LD keys] each; rows HEADS..7 stay 0): the
     * product with C then weighs the keys as exactly as float32 weights would */
    T *Pt = (T *)(smem + Smem::c_bytes + Smem::w_bytes);
    T *Ptl = Pt + 8 * LD_PT_LD;
    float *S = (float *)(smem + Smem::c_bytes + Smem::w_bytes + Smem::pt_bytes); /* [HEADS][128] scores */
    float *corr = S + HEADS * LD_KEYS;                        /* [8] per-head rescale of the accumulators */
    int *posb = (int *)(corr + 8);                            /* [128] key positions of the block */
    uint8_t *vis = (uint8_t *)(posb + LD_KEYS);               /* [128] 1: key visible */

    const int hg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    const int kh = warp / HEADS, hl = warp % HEADS; /* this warp's key group and head in the expansion */
    const int rank = p.rank, nch = rank / LD_CHUNK;
    const int h0 = hg * HEADS, nvalid = min(HEADS, p.nh - h0);
    const bool head_ok = hl < nvalid;
    const T *wk = (const T *)p.w + (size_t)h0 * 64 * rank;

    for (int i = tid; i < 2 * 8 * LD_PT_LD; i += LD_THREADS) Pt[i] = to16<T>(0.0f);
    if (tid < 8) corr[tid] = 0.0f;

    /* W chunk kc -> stage s: COLS rows x 8 units, COLS / 32 per thread */
    auto load_w = [&](int kc, int s) {
        T *dst = Ws + s * COLS * LD_CHUNK;
#pragma unroll
        for (int i = 0; i < COLS / 32; i++) {
            const int e = tid + i * LD_THREADS, n = e >> 3, u = e & 7;
            const bool ok = (n >> 6) < nvalid;
            cp_async16(dst + swz(n, u), wk + (size_t)(ok ? n : 0) * rank + kc * LD_CHUNK + u * 8, ok);
        }
    };
    /* the first two W chunks need nothing from the earlier kernels: in flight while they finish
     * (a block without keys leaves them unused) */
    load_w(0, 0);
    if (nch > 1) load_w(1, 1);
    cp_commit();

    CU_PDL_ENTRY();
    const int past = p.past_dev ? *p.past_dev : p.past;
    const int kv_len = past + 1;
    const int nblk = (kv_len + LD_KEYS - 1) / LD_KEYS;
    const int bps = (nblk + p.nsplit - 1) / p.nsplit;
    const int blk0 = split * bps, blk1 = min(blk0 + bps, nblk);

    const T *lat = (const T *)p.latent + (size_t)b * p.cap * rank; /* slot k0 of the current key block */
    const uint8_t *mrow = p.mask + (size_t)b * p.cap;
    const int32_t *prow = p.kpos + (size_t)b * p.cap;
    /* C chunk kc of the key block whose slots start at `lat`: 128 rows x 8 units, 4 per thread;
     * invisible keys are zero-filled (their source address, unread, is the block's first slot) */
    bool row_ok[4];
    auto load_c = [&](int kc) {
        T *dst = Cs + kc * LD_KEYS * LD_CHUNK;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int e = tid + i * LD_THREADS, r = e >> 3, u = e & 7;
            cp_async16(dst + swz(r, u), lat + (size_t)(row_ok[i] ? r : 0) * rank + kc * LD_CHUNK + u * 8, row_ok[i]);
        }
    };

    float acc_o[4][4]; /* P.C: cd (warp*64 + mt*16 + row) x head (col) */
#pragma unroll
    for (int mt = 0; mt < 4; mt++) acc_o[mt][0] = acc_o[mt][1] = acc_o[mt][2] = acc_o[mt][3] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f; /* the softmax state of head `warp` (warps 0..HEADS-1) */
    for (int blk = blk0; blk < blk1; blk++) {
        const int k0 = blk * LD_KEYS, nkeys = min(LD_KEYS, kv_len - k0);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = (tid >> 3) + 32 * i, j = k0 + r;
            row_ok[i] = r < nkeys && mrow[j];
        }
        lat = (const T *)p.latent + ((size_t)b * p.cap + k0) * rank;
        load_c(0);
        cp_commit();
        if (nch > 1) load_c(1);
        cp_commit();
        if (tid < LD_KEYS) {
            const int j = k0 + tid;
            const bool ok = tid < nkeys && mrow[j];
            vis[tid] = ok;
            posb[tid] = ok ? prow[j] : 0;
        }

        float acc[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < 8; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
        const int mrow0 = kh * KEYS_PER_WARP;
        const bool warp_busy = head_ok && mrow0 < nkeys;

        for (int kc = 0; kc < nch; kc++) {
            cp_wait<1>();
            __syncthreads();
            if (warp_busy) {
                const T *A = Cs + kc * LD_KEYS * LD_CHUNK;
                const T *B = Ws + (kc & 1) * COLS * LD_CHUNK;
#pragma unroll
                for (int ks = 0; ks < 4; ks++) {
                    uint32_t af[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
                        if (mrow0 + mt * 16 < nkeys) ldsm_x4(af[mt], A + swz(mrow0 + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        uint32_t bf[4];
                        const int n = hl * 64 + np * 16 + ((lane >> 4) << 3) + (lane & 7);
                        ldsm_x4(bf, B + swz(n, ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            if (mrow0 + mt * 16 < nkeys) {
                                mma<T>(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                                mma<T>(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
                            }
                        }
                    }
                }
            }
            __syncthreads();
            if (kc + 2 < nch) {
                load_c(kc + 2);
                load_w(kc + 2, kc & 1);
            }
            cp_commit();
        }
        /* both W stages are free: start the next block's first chunks */
        if (blk + 1 < blk1) {
            load_w(0, 0);
            if (nch > 1) load_w(1, 1);
        }
        cp_commit();

        /* rotate K, scores with the queries (scale and mscale folded into q) */
        if (warp_busy) {
            const float *qh = p.q + (size_t)b * p.nh * 64 + (size_t)(h0 + hl) * 64;
            float qa[8][2], fr[4][2];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                qa[nt][0] = qh[nt * 8 + gc] * p.qscale;
                qa[nt][1] = qh[nt * 8 + gc + 1] * p.qscale;
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                fr[nt][0] = p.inv_freq[nt * 8 + gc];
                fr[nt][1] = p.inv_freq[nt * 8 + gc + 1];
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (mrow0 + mt * 16 >= nkeys) continue;
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++) {
                    const int r = mrow0 + mt * 16 + gr + 8 * e2;
                    const float pos = (float)posb[r];
                    float s = 0.0f;
#pragma unroll
                    for (int nt = 0; nt < 4; nt++) {
#pragma unroll
                        for (int e1 = 0; e1 < 2; e1++) {
                            float sn, cs;
                            sincos_reduced(pos * fr[nt][e1], &sn, &cs);
                            const float x1 = acc[mt][nt][2 * e2 + e1], x2 = acc[mt][nt + 4][2 * e2 + e1];
                            s = fmaf(qa[nt][e1], x1 * cs - x2 * sn, s);
                            s = fmaf(qa[nt + 4][e1], x2 * cs + x1 * sn, s);
                        }
                    }
                    s += __shfl_xor_sync(0xffffffffu, s, 1);
                    s += __shfl_xor_sync(0xffffffffu, s, 2);
                    if ((lane & 3) == 0) S[hl * LD_KEYS + r] = s;
                }
            }
        }
        __syncthreads();
        ld_softmax(S, vis, Pt, Ptl, corr, nvalid, m_run, l_run);
        __syncthreads();
        ld_accumulate(acc_o, Cs, Pt, Ptl, corr, nch, nkeys);
        __syncthreads();
    }
    cp_wait<0>();

    ld_write_partials(p, b, h0, split, nvalid, nch, m_run, l_run, acc_o);
}

constexpr int LC_ROWS = 8;                    /* batch rows per combine block */
constexpr int LC_THREADS = 512;
constexpr int LC_WARPS = LC_THREADS / 32;
constexpr int LC_DPW = 64 / LC_WARPS;         /* Wv rows (output dims) per warp */
constexpr int LC_PIECES = LD_MAX_RANK / 128;  /* 4-element pieces of a Wv row per lane */
static_assert(LC_DPW * LC_ROWS == 32, "a warp's dot products end as one per lane");

template <typename T> __device__ __forceinline__ void unpack4(const uint2 &u, float *v);
template <> __device__ __forceinline__ void unpack4<__nv_bfloat16>(const uint2 &u, float *v) {
    v[0] = __uint_as_float(u.x << 16);
    v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16);
    v[3] = __uint_as_float(u.y & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack4<__half>(const uint2 &u, float *v) {
    const uint32_t w[2] = { u.x, u.y };
#pragma unroll
    for (int i = 0; i < 2; i++) {
        __half2 h2;
        memcpy(&h2, &w[i], sizeof h2);
        const float2 f = __half22float2(h2);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

/* one step of a warp's reduce-scatter of 2N values: a lane with bit N set keeps entries N..2N-1
 * (summed with its partner's) in 0..N-1, the other lane entries 0..N-1 */
template <int N> __device__ __forceinline__ void butterfly_step(float *v, int lane) {
    const bool upper = lane & N;
#pragma unroll
    for (int i = 0; i < N; i++) {
        const float send = upper ? v[i] : v[i + N];
        const float keep = upper ? v[i + N] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, N);
    }
}

/* The merge reads ns partial rows per (row, head): a thread's loads over the splits must be in
 * flight together, not one dependent load per split (one block per head is all a batch of one
 * has), so the splits are spread over lanes of the block, four loads unrolled per lane; with
 * fewer splits than lanes, the spare lanes take further rows in the same pass. The product
 * with Wv reads each lane's latent dims as contiguous float4 (no bank conflicts) and reduces
 * the warp's 32 dot products (LC_DPW dims x LC_ROWS rows) in one butterfly, one per lane. */
template <typename T>
__global__ __launch_bounds__(LC_THREADS) void k_latent_combine(LatP p, int batch) {
    __shared__ __align__(16) float o[LC_ROWS][LD_MAX_RANK];
    __shared__ __align__(16) float part[LC_THREADS * 4]; /* [row slot][split lane][rank] sums */
    __shared__ float wts[LC_ROWS][LD_MAX_SPLITS];
    __shared__ float inv[LC_ROWS];
    const int h = blockIdx.x, b0 = blockIdx.y * LC_ROWS, nr = min(LC_ROWS, batch - b0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rank = p.rank, ns = p.nsplit;
    const T *wv = (const T *)p.w + ((size_t)p.nh * 64 + (size_t)h * 64) * rank;
    /* this warp's rows d = warp*LC_DPW .. of Wv_h, latent dims it*128 + lane*4 .. + 3, all loads
     * in flight at once and before the wait: no earlier kernel writes them, so they stream while
     * the decode kernel runs */
    uint2 wraw[LC_DPW][LC_PIECES];
#pragma unroll
    for (int dd = 0; dd < LC_DPW; dd++)
#pragma unroll
        for (int it = 0; it < LC_PIECES; it++) {
            const int c0 = it * 128 + lane * 4;
            wraw[dd][it] = c0 < rank ? __ldg((const uint2 *)(wv + (size_t)(warp * LC_DPW + dd) * rank + c0)) : make_uint2(0, 0);
        }
    CU_PDL_ENTRY();
    if (warp < nr) {
        const float *ml = p.part_ml + ((size_t)(b0 + warp) * p.nh + h) * ns * 2;
        float M = -INFINITY;
        for (int s = lane; s < ns; s += 32) M = fmaxf(M, ml[2 * s]);
#pragma unroll
        for (int off = 16; off; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
        float L = 0.0f;
        for (int s = lane; s < ns; s += 32) {
            const float ms = ml[2 * s];
            const float wgt = ms == -INFINITY ? 0.0f : expf(ms - M);
            wts[warp][s] = wgt;
            L += ml[2 * s + 1] * wgt;
        }
#pragma unroll
        for (int off = 16; off; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
        if (lane == 0) inv[warp] = L > 0.0f ? 1.0f / (L + p.eps) : 0.0f;
    }
    __syncthreads();
    /* thread: 4 latent dims (col4) of every split_lanes-th split of the row in its slot; rank is
     * a multiple of 64, so lanes (512 / cols4) is 4 to 32 */
    const int cols4 = rank / 4, lanes = LC_THREADS / cols4;
    const int split_lanes = min(lanes, ns), slots = lanes / split_lanes;
    const int col4 = tid % cols4, lane_id = tid / cols4, sl = lane_id % split_lanes, slot = lane_id / split_lanes;
    const bool summing = slot < slots; /* rank 192, 320, 384, 448, or lanes not a multiple of ns */
    for (int r0 = 0; r0 < nr; r0 += slots) {
        const int r = r0 + slot;
        const bool live = summing && r < nr;
        const float4 *pa = (const float4 *)(p.part_acc + ((size_t)(b0 + (live ? r : 0)) * p.nh + h) * ns * rank) + col4;
        const int s_end = live ? ns : 0;
        float4 a0 = make_float4(0.f, 0.f, 0.f, 0.f), a1 = a0, a2 = a0, a3 = a0;
        int s = sl;
        for (; s + 3 * split_lanes < s_end; s += 4 * split_lanes) {
            const float4 v0 = pa[(size_t)s * cols4], v1 = pa[(size_t)(s + split_lanes) * cols4];
            const float4 v2 = pa[(size_t)(s + 2 * split_lanes) * cols4], v3 = pa[(size_t)(s + 3 * split_lanes) * cols4];
            const float w0 = wts[r][s], w1 = wts[r][s + split_lanes], w2 = wts[r][s + 2 * split_lanes], w3 = wts[r][s + 3 * split_lanes];
            a0 = make_float4(fmaf(v0.x, w0, a0.x), fmaf(v0.y, w0, a0.y), fmaf(v0.z, w0, a0.z), fmaf(v0.w, w0, a0.w));
            a1 = make_float4(fmaf(v1.x, w1, a1.x), fmaf(v1.y, w1, a1.y), fmaf(v1.z, w1, a1.z), fmaf(v1.w, w1, a1.w));
            a2 = make_float4(fmaf(v2.x, w2, a2.x), fmaf(v2.y, w2, a2.y), fmaf(v2.z, w2, a2.z), fmaf(v2.w, w2, a2.w));
            a3 = make_float4(fmaf(v3.x, w3, a3.x), fmaf(v3.y, w3, a3.y), fmaf(v3.z, w3, a3.z), fmaf(v3.w, w3, a3.w));
        }
        for (; s < s_end; s += split_lanes) {
            const float4 v = pa[(size_t)s * cols4];
            const float w = wts[r][s];
            a0 = make_float4(fmaf(v.x, w, a0.x), fmaf(v.y, w, a0.y), fmaf(v.z, w, a0.z), fmaf(v.w, w, a0.w));
        }
        if (summing) {
            float *dst = part + (slot * split_lanes + sl) * rank + col4 * 4;
            dst[0] = (a0.x + a1.x) + (a2.x + a3.x);
            dst[1] = (a0.y + a1.y) + (a2.y + a3.y);
            dst[2] = (a0.z + a1.z) + (a2.z + a3.z);
            dst[3] = (a0.w + a1.w) + (a2.w + a3.w);
        }
        __syncthreads();
        for (int e = tid; e < slots * rank; e += LC_THREADS) {
            const int rs = e / rank, cd = e % rank, rr = r0 + rs;
            if (rr >= nr) continue;
            float t = 0.0f;
            for (int l = 0; l < split_lanes; l++) t += part[(rs * split_lanes + l) * rank + cd];
            o[rr][cd] = t * inv[rr];
        }
        __syncthreads();
    }
    /* v[dd * LC_ROWS + r]: this lane's share of out[r, h*64 + warp*LC_DPW + dd] */
    float v[32];
#pragma unroll
    for (int i = 0; i < 32; i++) v[i] = 0.0f;
#pragma unroll
    for (int it = 0; it < LC_PIECES; it++) {
        const int c0 = it * 128 + lane * 4;
        float wf[LC_DPW][4];
#pragma unroll
        for (int dd = 0; dd < LC_DPW; dd++) unpack4<T>(wraw[dd][it], wf[dd]);
        if (c0 < rank) {
#pragma unroll
            for (int r = 0; r < LC_ROWS; r++) {
                if (r < nr) {
                    const float4 ov = *(const float4 *)&o[r][c0];
#pragma unroll
                    for (int dd = 0; dd < LC_DPW; dd++) {
                        float a = v[dd * LC_ROWS + r];
                        a = fmaf(wf[dd][0], ov.x, a);
                        a = fmaf(wf[dd][1], ov.y, a);
                        a = fmaf(wf[dd][2], ov.z, a);
                        a = fmaf(wf[dd][3], ov.w, a);
                        v[dd * LC_ROWS + r] = a;
                    }
                }
            }
        }
    }
    /* after the five steps lane i holds the whole sum of entry i */
    butterfly_step<16>(v, lane);
    butterfly_step<8>(v, lane);
    butterfly_step<4>(v, lane);
    butterfly_step<2>(v, lane);
    butterfly_step<1>(v, lane);
    const int dd = lane / LC_ROWS, r = lane % LC_ROWS;
    if (r < nr) p.out[(size_t)(b0 + r) * p.nh * 64 + (size_t)h * 64 + warp * LC_DPW + dd] = v[0];
}

/* Heads per block: 4 (each C tile read by the fewest blocks) unless that grid, even split to
 * one key block per block, would leave most of the GPU idle; then 2 or 1, so that more SMs
 * stream Wk. Depends only on the batch, the heads and the key bound (a recorded step keeps it). */
int heads_per_block(const CuCtx *c, int batch, int nh, int key_blocks) {
    int heads = LD_MAX_HEADS;
    while (heads > 1 && 2L * batch * ((nh + heads - 1) / heads) * key_blocks <= c->num_sms) heads /= 2;
    return heads;
}

template <typename T, int HEADS>
xo_status launch(CuCtx *c, const LatP &p, int batch) {
    xo_status rc;
    /* 4 heads per block (the long contexts) on Hopper's warpgroup tensor cores where the build
     * and the GPU have them (latent_decode_hopper.cu): the same partial results for the merge */
    if (HEADS == 4 && cu_latent_decode_hopper_fits(c)) {
        rc = cu_latent_decode_hopper(c, p, batch, std::is_same<T, __nv_bfloat16>::value ? XO_BF16 : XO_F16);
    } else {
        const int groups = (p.nh + HEADS - 1) / HEADS;
        const size_t smem = LatSmem<HEADS>::total;
        cudaError_t e = cudaFuncSetAttribute(k_latent_decode<T, HEADS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return cu_check(c, e, "latent decode attention (shared memory)");
        cu_launch(c, k_latent_decode<T, HEADS>, dim3((unsigned)groups, (unsigned)p.nsplit, (unsigned)batch), LD_THREADS, smem, p);
        rc = cu_check_launch(c, "latent decode attention");
    }
    if (rc != XO_OK) return rc;
    cu_launch(c, k_latent_combine<T>, dim3((unsigned)p.nh, (unsigned)((batch + LC_ROWS - 1) / LC_ROWS)), LC_THREADS, 0, p,
              batch);
    return cu_check_launch(c, "latent decode attention (combine)");
}

template <typename T>
xo_status launch_heads(CuCtx *c, const LatP &p, int batch, int heads) {
    switch (heads) {
    case 1: return launch<T, 1>(c, p, batch);
    case 2: return launch<T, 2>(c, p, batch);
    default: return launch<T, 4>(c, p, batch);
    }
}

} // namespace

bool cu_latent_decode_fits(const xo_attention_args *a) {
    const xo_linear *w = a->kv_b;
    return a->format == XO_CACHE_LATENT && a->new_tokens == 1 && w &&
           (a->latent_dtype == XO_BF16 || a->latent_dtype == XO_F16) && w->dtype == a->latent_dtype &&
           a->head_dim == 64 && a->num_heads == a->num_kv_heads && a->rank % LD_CHUNK == 0 && a->rank >= LD_CHUNK &&
           a->rank <= LD_MAX_RANK && w->in == a->rank && w->out == 2 * a->num_kv_heads * a->head_dim;
}

/* Under cuda_attention=auto: the in-kernel expansion beats expanding K and V into scratch from
 * about LD_AUTO_MIN_KEYS keys on, and at any length from LD_AUTO_MIN_ROWS rows on (measured in
 * benchmarks/RESULTS.md: one row loses below, where each layer's wait for Wk chunk after chunk
 * is not yet paid back; a wide batch wins even at short contexts, because scratch expands every
 * key up to the recorded bound while the kernel reads the true length). The key count is past + 1,
 * and past is the bound a decode session records a step for (it records again each time the
 * bound grows), so a replayed graph holds the choice made for its own bound. */
constexpr int LD_AUTO_MIN_KEYS = 512;
constexpr int LD_AUTO_MIN_ROWS = 64;

bool cu_latent_decode_wins(const xo_attention_args *a) {
    return a->past + 1 >= LD_AUTO_MIN_KEYS || a->batch >= LD_AUTO_MIN_ROWS;
}

bool cu_latent_decode_chosen(const CuCtx *c, const xo_attention_args *a) {
    if (c->attn_decode == CU_DECODE_EXPAND || !cu_latent_decode_fits(a)) return false;
    return c->attn_decode == CU_DECODE_LATENT || cu_latent_decode_wins(a);
}

xo_status cu_latent_decode(CuCtx *c, const xo_attention_args *a) {
    const int B = a->batch, nh = a->num_heads, rank = a->rank;
    const int kv_bound = a->past + 1; /* past is the true length, or its bound when past_device is given */
    const int blocks = (kv_bound + LD_KEYS - 1) / LD_KEYS;
    const int heads = heads_per_block(c, B, nh, blocks);
    const int groups = (nh + heads - 1) / heads;
    /* about two blocks per SM in all (one is resident at a time): splits over the keys when
     * the rows and heads alone do not fill the GPU */
    const long base = (long)groups * B, want = 2L * c->num_sms;
    int nsplit = base >= want ? 1 : (int)((want + base - 1) / base);
    if (nsplit > blocks) nsplit = blocks;
    if (nsplit > LD_MAX_SPLITS) nsplit = LD_MAX_SPLITS;
    if (nsplit < 1) nsplit = 1;
    const size_t cells = (size_t)B * nh * nsplit;
    const size_t b_ml = (cells * 2 * sizeof(float) + 255) & ~(size_t)255;
    char *blk = (char *)cu_alloc_raw(c, b_ml + cells * rank * sizeof(float));
    if (!blk) return cu_fail_more(c, XO_ENOMEM, "latent decode attention scratch (%zu partials)", cells);
    LatP p;
    p.nh = nh;
    p.rank = rank;
    p.cap = a->capacity;
    p.past = a->past;
    p.nsplit = nsplit;
    p.past_dev = a->past_device;
    p.q = a->q;
    p.latent = a->latent;
    p.w = a->kv_b->data;
    p.kpos = a->key_pos;
    p.mask = a->key_mask;
    p.inv_freq = a->inv_freq;
    p.qscale = a->scale * a->mscale;
    p.eps = a->denom_eps;
    p.part_ml = (float *)blk;
    p.part_acc = (float *)(blk + b_ml);
    p.out = a->out;
    const xo_status rc = a->latent_dtype == XO_BF16 ? launch_heads<__nv_bfloat16>(c, p, B, heads)
                                                  : launch_heads<__half>(c, p, B, heads);
    cu_free(c, blk);
    return rc;
}
