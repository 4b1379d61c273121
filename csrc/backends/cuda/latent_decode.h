/* What the two kernels of the latent-cache decode attention share (decode_attention.cu: the
 * mma.sync kernel, any 8.0+ GPU; latent_decode_hopper.cu: the wgmma kernel for 4 heads per
 * block on sm_90a): the sizes of the block's key tiles, the launch arguments, the shared-memory
 * tile layout and the rotation's sin/cos, so that both write the same partial results for the
 * one merge kernel (k_latent_combine). */
#ifndef XO_CU_LATENT_DECODE_H
#define XO_CU_LATENT_DECODE_H

#include <math.h>
#include <stdint.h>

#include "backends/cuda/common.h"

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

#endif
