/* What the two kernels of the latent-cache decode attention share (decode_attention.cu: the
 * mma.sync kernel, any 8.0+ GPU; latent_decode_hopper.cu: the wgmma kernel for 4 heads per
 * block on sm_90a): the sizes of the block's key tiles, the launch arguments, the shared-memory
 * tile layout, the rotation's sin/cos, the online softmax, the product of P with the C tile and
 * the partial results they write for the one merge kernel (k_latent_combine). */
#ifndef XO_CU_LATENT_DECODE_H
#define XO_CU_LATENT_DECODE_H

#include <math.h>
#include <stdint.h>

#include "backends/cuda/common.h"
#include "backends/cuda/mma.h"

constexpr int LD_KEYS = 128;       /* keys per block step */
constexpr int LD_MAX_HEADS = 4;    /* heads per block at most: 256 columns of Wk */
constexpr int LD_CHUNK = 64;       /* latent dims per pipeline stage */
constexpr int LD_MAX_RANK = 512;
constexpr int LD_THREADS = 256;    /* 8 warps */
constexpr int LD_PT_LD = LD_KEYS + 8; /* row stride of the transposed P tile (bank spread) */
constexpr int LD_MAX_SPLITS = 128;

/* Partial results per (row, head, key split s), read by k_latent_combine: part_ml = (max, sum)
 * of the split's online softmax (-inf, 0 for a split without visible keys), part_acc =
 * sum_j e^(score_j - max) c_j over the split's visible keys j ([rank], 0 for an empty split). */
struct LatP {
    int nh, rank, cap, past, nsplit;
    const int32_t *past_dev;
    const float *q;       /* [B, nh*64], rotated */
    const void *latent;   /* [B, cap, rank] */
    const void *w;        /* kv_b [2*nh*64, rank]: K rows then V rows */
    const int32_t *kpos;  /* [B, cap] */
    const uint8_t *mask;  /* [B, cap] */
    const float *inv_freq;
    float qscale;         /* 1/sqrt(hd) * mscale (the keys' rotary factor, folded into q) */
    float eps;
    float *part_ml;       /* [B, nh, nsplit, 2] */
    float *part_acc;      /* [B, nh, nsplit, rank] */
    float *out;           /* [B, nh*64] */
};

/* element offset of (row, col) in a tile of 64-element (128-byte) rows, 16-byte units XOR-swizzled
 * by the row so that 8 consecutive rows of one unit fall in 8 different bank groups. From a
 * 1024-byte aligned base this is also the K-major 128-byte-swizzle layout wgmma reads (wgmma.h). */
__device__ __forceinline__ int swz(int row, int unit) { return row * 64 + ((unit ^ (row & 7)) << 3); }

/* sin and cos of a float32 angle: reduced by multiples of pi/2 (three-part Cody-Waite with
 * fma, exact to ~1e-7 for any angle a position id can make), then the hardware functions on
 * [-pi/4, pi/4], where they are accurate to ~4e-7 */
__device__ __forceinline__ void sincos_reduced(float x, float *s, float *c) {
    const float k = rintf(x * 0.636619772f);
    float r = fmaf(k, -1.57079601e+00f, x);
    r = fmaf(k, -3.13916473e-07f, r);
    r = fmaf(k, -5.39030253e-15f, r);
    float sr = __sinf(r), cr = __cosf(r);
    const int qd = (int)k;
    if (qd & 1) {
        const float t = sr;
        sr = cr;
        cr = -t;
    }
    if (qd & 2) {
        sr = -sr;
        cr = -cr;
    }
    *s = sr;
    *c = cr;
}

template <typename T> __device__ __forceinline__ T to16(float v);
template <> __device__ __forceinline__ __nv_bfloat16 to16<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half to16<__half>(float v) { return __float2half_rn(v); }

/* The online softmax over one key tile, warp h < nvalid for head h: the tile's scores S
 * [heads][LD_KEYS] (invisible keys skipped), the running (m_run, l_run) of head `warp` updated,
 * corr[warp] the rescale of the accumulators, and P stored transposed as hi + lo, two values of T
 * (Pt, Ptl [8][LD_PT_LD]), so that the product with C weighs the keys as float32 weights would. */
template <typename T>
__device__ __forceinline__ void ld_softmax(const float *S, const uint8_t *vis, T *Pt, T *Ptl, float *corr, int nvalid,
                                           float &m_run, float &l_run) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp >= nvalid) return;
    float sv[4], bm = -INFINITY;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int key = lane + 32 * i;
        sv[i] = vis[key] ? S[warp * LD_KEYS + key] : -INFINITY;
        bm = fmaxf(bm, sv[i]);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, o));
    const float mn = fmaxf(m_run, bm);
    float cr = 1.0f, ps = 0.0f;
    if (mn != -INFINITY) cr = m_run == -INFINITY ? 0.0f : expf(m_run - mn);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float pe = sv[i] == -INFINITY ? 0.0f : expf(sv[i] - mn);
        const T hi = to16<T>(pe);
        const T lo = to16<T>(pe - (float)hi);
        Pt[warp * LD_PT_LD + lane + 32 * i] = hi;
        Ptl[warp * LD_PT_LD + lane + 32 * i] = lo;
        ps += (float)hi + (float)lo;
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
    l_run = l_run * cr + ps;
    m_run = mn;
    if (lane == 0) corr[warp] = cr;
}

/* acc_o[cd, head] = corr[head] acc_o + C_tile[:, cd]^T P[:, head] (mma.sync), warp w < nch over
 * latent dims 64 w .. 64 w + 63 of the C tile Cs ([rank/64][LD_KEYS][64], swizzled) */
template <typename T>
__device__ __forceinline__ void ld_accumulate(float (&acc_o)[4][4], const T *Cs, const T *Pt, const T *Ptl,
                                              const float *corr, int nch, int nkeys) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    if (warp >= nch) return;
    const float c0 = corr[gc], c1 = corr[gc + 1];
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        acc_o[mt][0] *= c0;
        acc_o[mt][1] *= c1;
        acc_o[mt][2] *= c0;
        acc_o[mt][3] *= c1;
    }
    const T *Cw = Cs + warp * LD_KEYS * LD_CHUNK;
#pragma unroll
    for (int ks = 0; ks < LD_KEYS / 16; ks++) {
        if (ks * 16 >= nkeys) break;
        const T *pp = Pt + gr * LD_PT_LD + ks * 16 + gc, *pl = pp + 8 * LD_PT_LD;
        const uint32_t b0 = *(const uint32_t *)pp, b1 = *(const uint32_t *)(pp + 8);
        const uint32_t l0 = *(const uint32_t *)pl, l1 = *(const uint32_t *)(pl + 8);
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            uint32_t af[4];
            ldsm_x4_t(af, Cw + swz(ks * 16 + (lane & 7) + ((lane >> 4) << 3), mt * 2 + ((lane >> 3) & 1)));
            mma<T>(acc_o[mt], af, b0, b1);
            mma<T>(acc_o[mt], af, l0, l1);
        }
    }
}

/* this split's (max, sum, acc) for heads h0 .. h0 + nvalid - 1 of row b; an empty split writes (-inf, 0, 0) */
__device__ __forceinline__ void ld_write_partials(const LatP &p, int b, int h0, int split, int nvalid, int nch,
                                                  float m_run, float l_run, const float (&acc_o)[4][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, gc = (lane & 3) * 2;
    const size_t rowh = (size_t)b * p.nh + h0;
    if (warp < nvalid && lane == 0) {
        float *ml = p.part_ml + ((rowh + warp) * p.nsplit + split) * 2;
        ml[0] = m_run;
        ml[1] = l_run;
    }
    if (warp < nch) {
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int hcol = gc + (e & 1);
                if (hcol < nvalid) {
                    const int cd = warp * 64 + mt * 16 + gr + 8 * (e >> 1);
                    p.part_acc[((rowh + hcol) * p.nsplit + split) * p.rank + cd] = acc_o[mt][e];
                }
            }
    }
}

#endif
