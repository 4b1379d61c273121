/* Causal prefill attention on Hopper's warpgroup tensor cores (wgmma, sm_90a), head_dim 64:
 * one pass over a key block of a prefill, as k_attn_mma (attention.cu) takes it: Q float32,
 * K and V the float16 copies of the block's keys, the mask by key_mask and by sequence index,
 * GQA, and the running softmax state of the pass's earlier key blocks.
 *
 * A CTA is NWG warpgroups of 64 query rows of one head (BM = 64 NWG rows) and walks the keys
 * in tiles of BN = 128, double-buffered in shared memory through cp.async (the next tile's
 * loads in flight while the current one is computed; one barrier per tile). Per warpgroup
 * and tile:
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
 * The shared-memory operand layout (no swizzle, "interleaved" core matrices): a tile of 128
 * keys x 64 dims in float16 is 16 x 8 core matrices of 8 keys x 8 dims (8 rows of 16 bytes,
 * 128 contiguous bytes); core (key group kg, dim group dg) sits at byte (8 kg + dg) * 128, so
 * element (key, d) is at ((key / 8) * 8 + d / 8) * 128 + (key % 8) * 16 + (d % 8) * 2. The same
 * bytes serve both products:
 *   K as B of S (N = keys, K = dims, K-major): LBO (next core along K = dims) 128 bytes, SBO
 *   (next core along N = keys) 1024 bytes; k-step ks starts 2 ks cores (256 ks bytes) in.
 *   V as B of O (N = dims, K = keys, MN-major, transpose bit set): LBO (next core along K =
 *   keys) 1024 bytes, SBO (next core along N = dims) 128 bytes; k-step kk starts 2048 kk bytes in.
 * For no-swizzle layouts LBO is the K-direction core stride and SBO the M/N-direction one in
 * both majors (the PTX ISA's canonical layouts). Descriptor bits: 0-13 start address >> 4,
 * 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset 0, 62-63 swizzle 0 (none). */
#include <math.h>

#include "backends/cuda/common.h"

#ifndef XO_CUDA_SM90A /* setup.py: 1 when this file is built with its sm_90a image */
#define XO_CUDA_SM90A 0
#endif

namespace {

constexpr int HD = 64, BN = 128, NWG = 3, BM = 64 * NWG, THREADS = 128 * NWG;
constexpr int TILE_BYTES = BN * HD * 2;        /* one K or V tile, float16 */
constexpr int SMEM_BYTES = 2 * 2 * TILE_BYTES; /* two stages of K and V */

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
/* an accumulator register is redefined here, so no read of it moves above the wait before */
__device__ __forceinline__ void reg_fence(float &x) { asm volatile("" : "+f"(x)::"memory"); }

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
/* the tile written through the generic proxy becomes visible to wgmma (the async proxy) */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
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
    __shared__ uint8_t kval[2][BN]; /* per stage: key visible by the mask (and inside the block) */

    const int q0 = (gridDim.z - 1 - blockIdx.z) * BM, h = blockIdx.x, bb = blockIdx.y;
    const int g = h / p.group;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    const int kv_len = p.past + p.t, kv_end = min(kv_len, p.kstop);
    const size_t qrow = (size_t)p.nh * HD;
    const int r0 = q0 + wg * 64 + warp * 16; /* first query row (index into the new tokens) of this warp */
    const int ra = r0 + gr, rb = ra + 8;     /* my two rows */
    const bool ok_a = ra < p.t, ok_b = rb < p.t;
    const int qi_a = p.past + ra, qi_b = p.past + rb;
    const int warp_qmin = p.past + r0;
    /* the last query index of my warpgroup; -1 (no tile) when all its rows are past t */
    const int wg_qlast = q0 + wg * 64 < p.t ? p.past + min(q0 + wg * 64 + 63, p.t - 1) : -1;
    const int qlast = min(q0 + BM, p.t) - 1;
    const int kend = min(kv_end, p.past + qlast + 1);
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

    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
    const int ntiles = kend > p.kbeg ? (kend - p.kbeg + BN - 1) / BN : 0;
    const __half *kbase = p.K16 + (size_t)bb * p.kcap * p.kvs + (size_t)g * HD; /* key kbeg of my row */
    const __half *vbase = p.V16 + (size_t)bb * p.kcap * p.kvs + (size_t)g * HD;
    const uint8_t *mrow = p.mask + (size_t)bb * p.cap;

    /* the whole CTA loads tile it (keys k0 .. k0 + BN - 1) into its stage: 16-byte pieces,
     * neighbouring threads on neighbouring keys of one dim group (a core matrix's 128 bytes per 8
     * threads: no bank conflicts); keys at or past kv_end are zero-filled */
    auto load_tile = [&](int it) {
        const int k0 = p.kbeg + it * BN, stage = it & 1;
        const uint32_t ks = sbase + stage * 2 * TILE_BYTES, vs = ks + TILE_BYTES;
        for (int e = tid; e < BN * (HD / 8); e += THREADS) {
            const int r = (e & 7) | ((e >> 6) << 3), dg = (e >> 3) & 7, j = k0 + r;
            const bool in = j < kv_end;
            const size_t off = (size_t)(in ? j - p.kbeg : 0) * p.kvs + dg * 8;
            const uint32_t dst = (uint32_t)(((r >> 3) * 8 + dg) * 128 + (r & 7) * 16);
            cp_async16(ks + dst, kbase + off, in);
            cp_async16(vs + dst, vbase + off, in);
        }
        cp_async_commit();
    };
    /* the mask of tile it: read here, stored into its stage at the top of its iteration */
    auto tile_mask = [&](int it) -> int {
        const int j = p.kbeg + it * BN + tid;
        return tid < BN && j < kv_end && mrow[j];
    };

    int kv_next = 0;
    if (ntiles > 0) {
        load_tile(0);
        kv_next = tile_mask(0);
    }
    for (int it = 0; it < ntiles; it++) {
        const int k0 = p.kbeg + it * BN, stage = it & 1;
        if (tid < BN) kval[stage][tid] = (uint8_t)kv_next;
        const int hidden = tid < BN && !kv_next;
        cp_async_wait0();
        fence_proxy_async();
        /* tile it has landed for every thread, every warpgroup is done with tile it - 1 */
        const int any_hidden = __syncthreads_or(hidden);
        if (it + 1 < ntiles) {
            load_tile(it + 1);
            kv_next = tile_mask(it + 1);
        }
        if (k0 > wg_qlast) continue; /* no row of this warpgroup sees a key of the tile */

        const uint32_t ks = sbase + stage * 2 * TILE_BYTES, vs = ks + TILE_BYTES;
        float s[64];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            wgmma_m64n128k16<0>(s, qa[kk], smem_desc(ks + kk * 256, 128, 1024), kk > 0);
        wgmma_commit();
        wgmma_wait0();
#pragma unroll
        for (int i = 0; i < 64; i++) reg_fence(s[i]);

        /* scores in base-2 units; the masked ones -inf (a tile on the diagonal or with hidden keys) */
        float mx_a = -INFINITY, mx_b = -INFINITY;
        if (any_hidden || k0 + BN - 1 > warp_qmin) {
#pragma unroll
            for (int i = 0; i < 16; i++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int col = 8 * i + gc + (e & 1), j = k0 + col;
                    const bool ok = kval[stage][col] && j <= ((e & 2) ? qi_b : qi_a);
                    s[4 * i + e] = ok ? s[4 * i + e] * c2 : -INFINITY;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < 64; i++) s[i] *= c2;
        }
#pragma unroll
        for (int i = 0; i < 16; i++) {
            mx_a = fmaxf(mx_a, fmaxf(s[4 * i], s[4 * i + 1]));
            mx_b = fmaxf(mx_b, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        /* a row with nothing visible yet subtracts 0: its scores are all -inf, exp2 gives 0 */
        const float base_a = mn_a == -INFINITY ? 0.0f : mn_a, base_b = mn_b == -INFINITY ? 0.0f : mn_b;
        const float corr_a = ex2(m_a - base_a), corr_b = ex2(m_b - base_b); /* 0 when m was -inf */
        m_a = mn_a;
        m_b = mn_b;
        float rs_a = 0.0f, rs_b = 0.0f;
        uint32_t pa[8][4];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const float p0 = ex2(s[4 * i] - base_a), p1 = ex2(s[4 * i + 1] - base_a);
            const float p2 = ex2(s[4 * i + 2] - base_b), p3 = ex2(s[4 * i + 3] - base_b);
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
        wgmma_wait0();
#pragma unroll
        for (int i = 0; i < 32; i++) reg_fence(o[i]);
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
    float *out_a = p.out + ((size_t)bb * p.t + ra) * qrow + (size_t)h * HD + gc;
    float *out_b = out_a + 8 * qrow;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (ok_a) *(float2 *)(out_a + 8 * i) = make_float2(o[4 * i] * inv_a, o[4 * i + 1] * inv_a);
        if (ok_b) *(float2 *)(out_b + 8 * i) = make_float2(o[4 * i + 2] * inv_b, o[4 * i + 3] * inv_b);
    }
#else
    /* an image without wgmma: never launched (cu_attention_hopper_fits) */
    (void)p;
    __trap();
#endif
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

xo_status cu_attention_hopper(CuCtx *c, const CuHopperAttn &a) {
    dim3 grid((unsigned)a.nh, (unsigned)a.batch, (unsigned)((a.t + BM - 1) / BM));
    k_attn_hopper<<<grid, THREADS, SMEM_BYTES, c->stream>>>(a);
    return cu_check_launch(c, "attention (hopper)");
}
