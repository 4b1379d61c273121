/* Causal prefill attention on Hopper's warpgroup tensor cores (wgmma, sm_90a), head_dim 64, over
 * the float16 tiles of a key block (cu_attention_hopper_pack, cu_attention_hopper_mask): Q
 * float32, the mask by the packed tile mask and by sequence index, GQA, and the running softmax
 * state of the pass's earlier key blocks.
 *
 * The tiles. A block's keys are laid out per (batch row, kv head) as tiles of BN = 128 keys,
 * K tile then V tile (16 KB each, float16), each already in the shared-memory operand layout
 * below, so that one bulk copy (cp.async.bulk, completed on an mbarrier) moves a tile pair into
 * shared memory; the tile mask holds per tile 128 bytes (key visible: in the block and not masked
 * out) and an int (some key of the tile is hidden). Keys are rotated (RoPE) while they are
 * packed where they arrive unrotated (expanded from the latent).
 *
 * The kernel. A CTA is NWG consumer warpgroups of 64 query rows of one head (BM = 64 NWG rows)
 * and one producer warp. The producer streams the CTA's tiles through a ring of STAGES slots:
 * it waits until every consumer warp has released a slot (the "empty" mbarrier), then issues the
 * slot's copies, whose bytes complete its "full" mbarrier. The consumer warpgroups wait on
 * "full" only, so each runs at its own pace and one's softmax overlaps another's products.
 * Per warpgroup and tile:
 *   S[64 x 128] = Q K^T: 4 wgmma m64n128k16, Q (float16) from registers, K by descriptor;
 *   the online softmax on the accumulator fragment (thread: rows lane/4 and lane/4 + 8 of its
 *   warp's 16, columns 8 i + 2 (lane % 4) + {0, 1});
 *   O[64 x 64] += P V: 8 wgmma m64n64k16, P converted to float16 in registers (the
 *   accumulators of n8 groups 2kk and 2kk+1 are the A fragment of k-step kk, the layout
 *   mma.sync m16n8k16 uses too), V by descriptor with B transposed (MN-major).
 * Scores, statistics and O in float32; the softmax runs in base 2 (scores times
 * scale * log2 e), so the state's max is in those units (only this kernel reads it).
 *
 * State across key blocks (state != NULL): per (query row, head) [max, sum, acc[64]], read
 * unless `first`, then written back, or on the `last` block acc / (sum + eps) (0 when no key
 * was visible) goes to the output. A tile that sees none of a block's keys keeps its state.
 *
 * The operand layout (no swizzle, "interleaved" core matrices): a tile of 128 keys x 64 dims in
 * float16 is 16 x 8 core matrices of 8 keys x 8 dims (8 rows of 16 bytes, 128 contiguous bytes);
 * core (key group kg, dim group dg) sits at byte (8 kg + dg) * 128, so element (key, d) is at
 * ((key / 8) * 8 + d / 8) * 128 + (key % 8) * 16 + (d % 8) * 2. The same bytes serve both products:
 *   K as B of S (N = keys, K = dims, K-major): LBO (next core along K = dims) 128 bytes, SBO
 *   (next core along N = keys) 1024 bytes; k-step ks starts 2 ks cores (256 ks bytes) in.
 *   V as B of O (N = dims, K = keys, MN-major, transpose bit set): LBO (next core along K =
 *   keys) 1024 bytes, SBO (next core along N = dims) 128 bytes; k-step kk starts 2048 kk bytes in.
 * (Descriptors: wgmma.h.) */
#include <math.h>

#include "backends/cuda/common.h"
#include "backends/cuda/wgmma.h"

#ifndef XO_CUDA_SM90A /* setup.py: 1 when this file is built with its sm_90a image */
#define XO_CUDA_SM90A 0
#endif

namespace {

constexpr int HD = 64, BN = 128, NWG = 2, BM = 64 * NWG, CONSUMERS = 128 * NWG, THREADS = CONSUMERS + 32;
constexpr int STAGES = 4;
constexpr int TILE_BYTES = BN * HD * 2;              /* one K or V tile, float16 */
constexpr int PAIR_BYTES = 2 * TILE_BYTES;           /* K tile then V tile */
constexpr int MASK_SLOT = 256;                       /* a stage's tile mask in shared memory */
constexpr int SMEM_BYTES = STAGES * (PAIR_BYTES + MASK_SLOT);
static_assert(CU_HOPPER_MASK_BYTES % 16 == 0 && CU_HOPPER_MASK_BYTES <= MASK_SLOT, "bulk copies move 16-byte multiples");
static_assert(CU_HOPPER_TILE_KEYS == BN, "the packed tiles are the kernel's");

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* D[64 x 128] (+)= A[64 x 16] (registers) * B[16 x 128] (descriptor); TB: B is MN-major (transposed) */
template <int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float *d, const uint32_t *a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 "{"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TB));
}

/* D[64 x 64] (+)= A[64 x 16] (registers) * B[16 x 64] (descriptor); TB: B is MN-major (transposed) */
template <int TB>
__device__ __forceinline__ void wgmma_m64n64k16(float *d, const uint32_t *a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TB));
}



#endif

/* grid (heads, batch, query tiles), the longest tiles (last queries: most keys) first */
__global__ __launch_bounds__(THREADS, 1) void k_attn_hopper(CuHopperAttn p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) uint64_t full_bar[STAGES], empty_bar[STAGES];

    const int q0 = (gridDim.z - 1 - blockIdx.z) * BM, h = blockIdx.x, bb = blockIdx.y;
    const int g = h / p.group;
    const int tid = threadIdx.x;
    const int qlast = min(q0 + BM, p.t) - 1;
    const int kend = min(p.kbeg + p.ntiles * BN, p.past + qlast + 1);
    const int ntiles = kend > p.kbeg ? (kend - p.kbeg + BN - 1) / BN : 0;
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem), mbase = sbase + STAGES * PAIR_BYTES;
    const uint32_t fullb = (uint32_t)__cvta_generic_to_shared(full_bar);
    const uint32_t emptyb = (uint32_t)__cvta_generic_to_shared(empty_bar);
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(fullb + 8 * s, 1);
            mbar_init(emptyb + 8 * s, 4 * NWG); /* lane 0 of each consumer warp */
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (tid >= CONSUMERS) { /* the producer warp: one lane issues every copy */
        if (tid == CONSUMERS) {
            const unsigned char *pairs = (const unsigned char *)p.tiles + (size_t)(bb * p.nkv + g) * p.ntiles * PAIR_BYTES;
            const uint8_t *masks = p.tile_mask + (size_t)bb * p.ntiles * CU_HOPPER_MASK_BYTES;
            for (int it = 0; it < ntiles; it++) {
                const int s = it % STAGES;
                if (it >= STAGES) mbar_wait(emptyb + 8 * s, ((it / STAGES) - 1) & 1);
                mbar_arrive_expect_tx(fullb + 8 * s, PAIR_BYTES + CU_HOPPER_MASK_BYTES);
                bulk_copy(sbase + s * PAIR_BYTES, pairs + (size_t)it * PAIR_BYTES, PAIR_BYTES, fullb + 8 * s);
                bulk_copy(mbase + s * MASK_SLOT, masks + (size_t)it * CU_HOPPER_MASK_BYTES, CU_HOPPER_MASK_BYTES,
                          fullb + 8 * s);
            }
        }
        return;
    }

    const int wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    const size_t qrow = (size_t)p.nh * HD;
    const int r0 = q0 + wg * 64 + warp * 16; /* first query row (index into the new tokens) of this warp */
    const int ra = r0 + gr, rb = ra + 8;     /* my two rows */
    const bool ok_a = ra < p.t, ok_b = rb < p.t;
    const int qi_a = p.past + ra, qi_b = p.past + rb;
    const int warp_qmin = p.past + r0;
    /* the last query index of my warpgroup; -1 (no tile) when all its rows are past t */
    const int wg_qlast = q0 + wg * 64 < p.t ? p.past + min(q0 + wg * 64 + 63, p.t - 1) : -1;
    const float c2 = p.scale * LOG2E;

    /* Q as the A fragments of the 4 k-steps of S (float16, the mma.sync m16n8k16 layout) */
    uint32_t qa[4][4];
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = (e & 1) ? rb : ra, col = ks * 16 + gc + ((e & 2) ? 8 : 0);
            float2 x = make_float2(0.0f, 0.0f);
            if (row < p.t) x = *(const float2 *)(p.q + ((size_t)bb * p.t + row) * qrow + (size_t)h * HD + col);
            qa[ks][e] = pack_h2(x.x, x.y);
        }
    }

    /* the running state of my rows: O in the accumulator layout of m64n64, max and (partial) sum */
    float o[32];
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const size_t ps = (size_t)HD + 2;
    float *st_a = p.state ? p.state + (((size_t)bb * p.t + ra) * p.nh + h) * ps : NULL;
    float *st_b = p.state ? p.state + (((size_t)bb * p.t + rb) * p.nh + h) * ps : NULL;
    if (p.first || !p.state) {
#pragma unroll
        for (int i = 0; i < 32; i++) o[i] = 0.0f;
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float2 xa = ok_a ? *(const float2 *)(st_a + 2 + 8 * i + gc) : make_float2(0.0f, 0.0f);
            const float2 xb = ok_b ? *(const float2 *)(st_b + 2 + 8 * i + gc) : make_float2(0.0f, 0.0f);
            o[4 * i] = xa.x;
            o[4 * i + 1] = xa.y;
            o[4 * i + 2] = xb.x;
            o[4 * i + 3] = xb.y;
        }
        if (ok_a) m_a = st_a[0];
        if (ok_b) m_b = st_b[0];
        if ((lane & 3) == 0) { /* the sum is split over the quad: the stored one goes to one lane */
            if (ok_a) l_a = st_a[1];
            if (ok_b) l_b = st_b[1];
        }
    }

    for (int it = 0; it < ntiles; it++) {
        const int s = it % STAGES, k0 = p.kbeg + it * BN;
        mbar_wait(fullb + 8 * s, (it / STAGES) & 1);
        if (k0 <= wg_qlast) { /* some row of this warpgroup sees a key of the tile */
            const uint32_t ks = sbase + s * PAIR_BYTES, vs = ks + TILE_BYTES;
            const uint8_t *kval = smem + STAGES * PAIR_BYTES + s * MASK_SLOT;
            float sc[64];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wgmma_m64n128k16<0>(sc, qa[kk], smem_desc(ks + kk * 256, 128, 1024), kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 64; i++) reg_fence(sc[i]);

            /* the masked scores -inf (a tile on the diagonal or with hidden keys); the max on the
             * raw scores (scale * log2 e > 0 keeps their order) */
            if (*(const int *)(kval + BN) || k0 + BN - 1 > warp_qmin) {
#pragma unroll
                for (int i = 0; i < 16; i++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = 8 * i + gc + (e & 1), j = k0 + col;
                        const bool ok = kval[col] && j <= ((e & 2) ? qi_b : qi_a);
                        if (!ok) sc[4 * i + e] = -INFINITY;
                    }
                }
            }
            float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                mx_a = fmaxf(mx_a, fmaxf(sc[4 * i], sc[4 * i + 1]));
                mx_b = fmaxf(mx_b, fmaxf(sc[4 * i + 2], sc[4 * i + 3]));
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            const float mn_a = fmaxf(m_a, mx_a * c2), mn_b = fmaxf(m_b, mx_b * c2);
            /* a row with nothing visible yet subtracts 0: its scores are all -inf, exp2 gives 0 */
            const float base_a = mn_a == -INFINITY ? 0.0f : mn_a, base_b = mn_b == -INFINITY ? 0.0f : mn_b;
            const float corr_a = ex2(m_a - base_a), corr_b = ex2(m_b - base_b); /* 0 when m was -inf */
            m_a = mn_a;
            m_b = mn_b;
            float rs_a = 0.0f, rs_b = 0.0f;
            uint32_t pa[8][4];
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const float p0 = ex2(fmaf(sc[4 * i], c2, -base_a)), p1 = ex2(fmaf(sc[4 * i + 1], c2, -base_a));
                const float p2 = ex2(fmaf(sc[4 * i + 2], c2, -base_b)), p3 = ex2(fmaf(sc[4 * i + 3], c2, -base_b));
                rs_a += p0 + p1;
                rs_b += p2 + p3;
                pa[i >> 1][(i & 1) * 2] = pack_h2(p0, p1);
                pa[i >> 1][(i & 1) * 2 + 1] = pack_h2(p2, p3);
            }
            l_a = l_a * corr_a + rs_a;
            l_b = l_b * corr_b + rs_b;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                o[4 * i] *= corr_a;
                o[4 * i + 1] *= corr_a;
                o[4 * i + 2] *= corr_b;
                o[4 * i + 3] *= corr_b;
            }
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 8; kk++) wgmma_m64n64k16<1>(o, pa[kk], smem_desc(vs + kk * 2048, 1024, 128), 1);
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 32; i++) reg_fence(o[i]);
        }
        __syncwarp(); /* every lane's reads of the slot are done */
        if (lane == 0) mbar_arrive(emptyb + 8 * s);
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    if (p.state && !p.last) {
        if ((lane & 3) == 0) {
            if (ok_a) {
                st_a[0] = m_a;
                st_a[1] = l_a;
            }
            if (ok_b) {
                st_b[0] = m_b;
                st_b[1] = l_b;
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (ok_a) *(float2 *)(st_a + 2 + 8 * i + gc) = make_float2(o[4 * i], o[4 * i + 1]);
            if (ok_b) *(float2 *)(st_b + 2 + 8 * i + gc) = make_float2(o[4 * i + 2], o[4 * i + 3]);
        }
        return;
    }
    const float inv_a = l_a > 0.0f ? 1.0f / (l_a + p.eps) : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / (l_b + p.eps) : 0.0f;
    const size_t at_a = ((size_t)bb * p.t + ra) * qrow + (size_t)h * HD + gc, at_b = at_a + 8 * qrow;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (ok_a) cu_st_pair(p.out, p.out16, p.out16_t, at_a + 8 * i, o[4 * i] * inv_a, o[4 * i + 1] * inv_a);
        if (ok_b) cu_st_pair(p.out, p.out16, p.out16_t, at_b + 8 * i, o[4 * i + 2] * inv_b, o[4 * i + 3] * inv_b);
    }
#else
    /* an image without wgmma: never launched (cu_attention_hopper_fits) */
    (void)p;
    __trap();
#endif
}

/* 8 elements from 16-byte aligned src, as float */
__device__ __forceinline__ void load8(const float *src, float *x) {
    const float4 a = *(const float4 *)src, b = *(const float4 *)(src + 4);
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
template <typename T16>
__device__ __forceinline__ void load8(const T16 *src, float *x) {
    const uint4 u = *(const uint4 *)src;
    const T16 *e = (const T16 *)&u;
#pragma unroll
    for (int i = 0; i < 8; i++) x[i] = cu_ld(e, i);
}
__device__ __forceinline__ uint4 pack8(const float *x) {
    uint4 u;
    u.x = pack_h2(x[0], x[1]);
    u.y = pack_h2(x[2], x[3]);
    u.z = pack_h2(x[4], x[5]);
    u.w = pack_h2(x[6], x[7]);
    return u;
}

/* One thread per (batch row, kv head, key, dim group dg < 4): dims 8 dg .. 8 dg + 7 and their
 * rotation partners 32 + 8 dg .. of K and of V, as 4 pieces of 16 bytes. Neighbouring threads
 * take neighbouring keys of one core matrix (its 128 bytes written together). Keys past len
 * (the last tile's padding) are zero. */
template <typename KT>
__global__ void k_hopper_pack(CuHopperPack a, const KT *__restrict__ K, const KT *__restrict__ V) {
    const int ptiles = (a.len + BN - 1) / BN; /* tiles of this piece of the block */
    const size_t total = (size_t)a.batch * a.nkv * ptiles * BN * 4;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const int lo = (int)(t & 7), dg = (int)((t >> 3) & 3);
        const size_t rest = t >> 5;
        const int kgrp = (int)(rest % ((size_t)ptiles * 16));
        const size_t bg = rest / ((size_t)ptiles * 16);
        const int g = (int)(bg % a.nkv), b = (int)(bg / a.nkv);
        const int jj = kgrp * 8 + lo; /* key index within the piece */
        float k1[8], k2[8], v1[8], v2[8];
        if (jj < a.len) {
            const size_t row = ((size_t)b * a.src_rows + jj) * a.src_stride + (size_t)g * HD + dg * 8;
            load8(K + row, k1);
            load8(K + row + HD / 2, k2);
            load8(V + row, v1);
            load8(V + row + HD / 2, v2);
            if (a.pos) { /* pairs d and d + HD/2 (rope.c) */
                const int32_t pos = a.pos[(size_t)b * a.pos_rows + jj];
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    float cs, sn;
                    cu_rope_angle(pos, a.inv_freq[dg * 8 + i], a.mscale, cs, sn);
                    cu_rope_pair(k1[i], k2[i], cs, sn);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) k1[i] = k2[i] = v1[i] = v2[i] = 0.0f;
        }
        const int tile = a.tile0 + jj / BN, r = jj % BN;
        __half *pair = a.tiles + ((size_t)(b * a.nkv + g) * a.ntiles + tile) * (PAIR_BYTES / 2);
        const size_t at1 = (size_t)((r >> 3) * 8 + dg) * 64 + (r & 7) * 8, at2 = at1 + 4 * 64;
        *(uint4 *)(pair + at1) = pack8(k1);
        *(uint4 *)(pair + at2) = pack8(k2);
        *(uint4 *)(pair + TILE_BYTES / 2 + at1) = pack8(v1);
        *(uint4 *)(pair + TILE_BYTES / 2 + at2) = pack8(v2);
    }
}

/* grid (tiles, batch), BN threads: a key's byte (visible: in the block and not masked out) and the
 * tile's "some key hidden" int */
__global__ __launch_bounds__(BN) void k_hopper_mask(uint8_t *out, const uint8_t *__restrict__ mask, int cap, int kbeg,
                                                    int kend, int ntiles) {
    const int tile = blockIdx.x, b = blockIdx.y, j = kbeg + tile * BN + threadIdx.x;
    const int vis = j < kend && mask[(size_t)b * cap + j];
    uint8_t *m = out + ((size_t)b * ntiles + tile) * CU_HOPPER_MASK_BYTES;
    m[threadIdx.x] = (uint8_t)vis;
    const int hidden = __syncthreads_or(!vis);
    if (threadIdx.x < (CU_HOPPER_MASK_BYTES - BN) / 4) ((int *)(m + BN))[threadIdx.x] = threadIdx.x == 0 ? hidden : 0;
}

} // namespace

bool cu_attention_hopper_fits(CuCtx *c, int head_dim) {
    if (head_dim != HD || c->attn_mma) return false;
    if (!c->hopper_attn) { /* once per backend: compute capability 9.0 and this file's sm_90a image */
        int major = 0, minor = 0;
        cudaFuncAttributes fa;
        bool ok = XO_CUDA_SM90A && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device) == cudaSuccess &&
                  major == 9 && minor == 0 && cudaFuncGetAttributes(&fa, k_attn_hopper) == cudaSuccess &&
                  fa.binaryVersion == 90;
        if (!ok) (void)cudaGetLastError(); /* a failed query leaves no error for the next launch check */
        if (ok && cudaFuncSetAttribute(k_attn_hopper, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) != cudaSuccess) {
            (void)cudaGetLastError();
            ok = false;
        }
        c->hopper_attn = ok ? 1 : 2;
    }
    return c->hopper_attn == 1;
}

xo_status cu_attention_hopper_pack(CuCtx *c, const CuHopperPack &a, const void *K, const void *V, xo_dtype kt) {
    if (((uintptr_t)K | (uintptr_t)V) % 16 || a.src_stride % 8)
        return cu_fail(c, XO_EINVAL, "attention (hopper pack): keys not 16-byte aligned");
    const size_t total = (size_t)a.batch * a.nkv * ((a.len + BN - 1) / BN) * BN * 4;
    unsigned nb = cu_blocks(total, 256), cap = (unsigned)c->num_sms * 16;
    const unsigned grid = nb < cap ? nb : cap;
    if (kt == XO_BF16) k_hopper_pack<__nv_bfloat16><<<grid, 256, 0, c->stream>>>(a, (const __nv_bfloat16 *)K, (const __nv_bfloat16 *)V);
    else if (kt == XO_F16) k_hopper_pack<__half><<<grid, 256, 0, c->stream>>>(a, (const __half *)K, (const __half *)V);
    else k_hopper_pack<float><<<grid, 256, 0, c->stream>>>(a, (const float *)K, (const float *)V);
    return cu_check_launch(c, "attention (hopper pack)");
}

xo_status cu_attention_hopper_mask(CuCtx *c, uint8_t *tile_mask, const uint8_t *mask, int batch, int cap, int kbeg,
                                   int kend, int ntiles) {
    k_hopper_mask<<<dim3((unsigned)ntiles, (unsigned)batch), BN, 0, c->stream>>>(tile_mask, mask, cap, kbeg, kend, ntiles);
    return cu_check_launch(c, "attention (hopper mask)");
}

xo_status cu_attention_hopper(CuCtx *c, const CuHopperAttn &a) {
    dim3 grid((unsigned)a.nh, (unsigned)a.batch, (unsigned)((a.t + BM - 1) / BM));
    k_attn_hopper<<<grid, THREADS, SMEM_BYTES, c->stream>>>(a);
    return cu_check_launch(c, "attention (hopper)");
}
