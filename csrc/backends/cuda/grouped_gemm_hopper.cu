/* The MoE's grouped expert products on Hopper's warpgroup tensor cores (wgmma, sm_90a): rows
 * already permuted by expert (moe.cu), each group's rows times its own weight, the groups found
 * from the device-side offsets, so nothing is read back to the host. Two kernels of one
 * mainloop:
 *   plain:  Y[rows of g, out] (float32) = X[rows of g, k] @ W_g[out, k]^T (the down product);
 *   swiglu: act[rows of g, inter] = silu(X @ Gate_g^T) * (X @ Up_g^T), rounded to the 16-bit
 *           dtype, W_g = [Gate_g; Up_g] [2 inter, k] (gate rows first): the gate/up product with
 *           the SwiGLU in its epilogue, so no [rows, 2 inter] float32 intermediate exists.
 *
 * A CTA computes a tile of 128 rows (of one group; tile_start counts each group's tiles) by 128
 * weight rows, the swiglu kernel's 128 being gate rows c0 .. c0+63 then the matching up rows, so
 * that a thread holds a column's gate and up values in the same accumulator positions. Two
 * warpgroups of 64 rows each issue wgmma m64n128k16 with both operands in shared memory (SS).
 * Every thread loads with cp.async (16 bytes, zero-filled past the rows, the weight rows or k)
 * into a ring of STAGES slots of 64-column k-tiles, loads running STAGES - 2 tiles ahead: slot
 * (kt - 2) is refilled at step kt, after each warpgroup's wait for all but its latest wgmma group
 * (at step kt - 1) and the barrier have retired the products that read it.
 *
 * The tile layout (no swizzle, interleaved core matrices; wgmma.h): a 128-row x 64-column tile
 * of 16-bit values is 16 x 8 core matrices of 8 rows x 8 columns (128 contiguous bytes); core
 * (row group rg, column group cg) sits at byte (8 rg + cg) * 128, element (r, c) at
 * ((r / 8) * 8 + c / 8) * 128 + (r % 8) * 16 + (c % 8) * 2. As K-major operands: LBO (next core
 * along K) 128 bytes, SBO (next 8 rows) 1024 bytes; k-step ks starts 256 ks bytes in, warpgroup
 * wg's 64 rows of A 8192 wg bytes in. Chunk q (16 bytes) of a tile, with rows (q % 8) + 8 (q / 64)
 * and column group (q / 8) % 8, lands at byte 16 q: a warp's stores fill contiguous bytes.
 *
 * The accumulator fragment of m64n128 (float32): thread lane of warp w holds rows 16 w + lane / 4
 * (d[4 i], d[4 i + 1]) and that + 8 (d[4 i + 2], d[4 i + 3]), columns 8 i + 2 (lane % 4) + {0, 1}. */
#include <type_traits>

#include "backends/cuda/common.h"
#include "backends/cuda/mma.h"
#include "backends/cuda/wgmma.h"

#ifndef XO_CUDA_SM90A /* setup.py: 1 when this file is built with its sm_90a image */
#define XO_CUDA_SM90A 0
#endif

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 5, THREADS = 256;
constexpr int TILE_BYTES = BM * BK * 2;      /* an A or a B tile (BM == BN: one layout) */
constexpr int STAGE_BYTES = 2 * TILE_BYTES;  /* A then B */
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
constexpr int CHUNKS = TILE_BYTES / 16 / THREADS; /* 16-byte pieces of a tile per thread */
static_assert(CHUNKS * THREADS * 16 == TILE_BYTES, "every thread loads whole pieces");
static_assert(BM == BN && BM == CU_GROUPED_HOPPER_ROWS, "the tiles are the ones moe.cu counts");

struct GroupedArgs {
    const void *x;        /* [rows, k], 16-bit, rows grouped by expert */
    CuGroupPtrs w;        /* per group [out, k] (swiglu: [2 out, k], gate rows first) */
    float *y;             /* plain: [rows, out] */
    void *act;            /* swiglu: [rows, out] in the 16-bit dtype */
    int out, k;
    const int *offsets, *tile_start; /* device [groups + 1] */
    int groups;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define XO_WGMMA_SS_M64N128K16(TYPE)                                                                                      \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                       \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                         \
                 "{"                                                                                                      \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                        \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                        \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                         \
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                     \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),       \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),           \
                   "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),           \
                   "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
                   "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),           \
                   "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),           \
                   "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),           \
                   "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                         \
                 : "l"(desc_a), "l"(desc_b), "r"(1))

/* D[64 x 128] += A[64 x 16] * B[16 x 128], both K-major in shared memory */
template <typename T> __device__ __forceinline__ void wgmma_ss(float *d, uint64_t desc_a, uint64_t desc_b) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        XO_WGMMA_SS_M64N128K16("bf16");
    else
        XO_WGMMA_SS_M64N128K16("f16");
}
#undef XO_WGMMA_SS_M64N128K16

struct alignas(4) Pair16 {
    unsigned short a, b;
};

template <typename T> __device__ __forceinline__ uint32_t pack16(float lo, float hi) {
    const T l = cu_from_f32<T>(lo), h = cu_from_f32<T>(hi);
    Pair16 p;
    p.a = *(const unsigned short *)&l;
    p.b = *(const unsigned short *)&h;
    return *(const uint32_t *)&p;
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; } /* as k_swiglu */

#endif

/* grid (column tiles, row tiles): blockIdx.y is a tile of tile_start's count; tiles past the last
 * group's end (max_tiles is an upper bound) return at once */
template <typename T, bool SWIGLU>
__global__ __launch_bounds__(THREADS, 1) void k_grouped_wgmma(GroupedArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem[];
    const int tile = blockIdx.y;
    if (tile >= p.tile_start[p.groups]) return;
    int g = 0;
    while (tile >= p.tile_start[g + 1]) g++;
    const int row0 = p.offsets[g] + (tile - p.tile_start[g]) * BM;
    const int rows = min(BM, p.offsets[g + 1] - row0);
    if (rows <= 0) return;
    const int k = p.k, out = p.out;
    const T *X = (const T *)p.x + (size_t)row0 * k, *W = (const T *)p.w.p[g];
    const int n0 = blockIdx.x * (SWIGLU ? BN / 2 : BN); /* first output column of the tile */
    const int tid = threadIdx.x;

    /* this thread's chunks: their source rows (NULL: zero-filled) and column offsets */
    const T *arow[CHUNKS], *brow[CHUNKS];
    int kcol[CHUNKS];
#pragma unroll
    for (int i = 0; i < CHUNKS; i++) {
        const int q = tid + THREADS * i, r = (q & 7) + 8 * (q >> 6);
        kcol[i] = ((q >> 3) & 7) * 8;
        arow[i] = r < rows ? X + (size_t)r * k : nullptr;
        const int col = n0 + (SWIGLU ? (r & (BN / 2 - 1)) : r);
        const int wr = SWIGLU && r >= BN / 2 ? out + col : col;
        brow[i] = col < out ? W + (size_t)wr * k : nullptr;
    }
    const uint32_t sbase = smem_addr(smem);
    auto load = [&](int slot, int kt) {
        unsigned char *a = smem + slot * STAGE_BYTES, *b = a + TILE_BYTES;
        const int k0 = kt * BK;
#pragma unroll
        for (int i = 0; i < CHUNKS; i++) {
            const int c = k0 + kcol[i], q = tid + THREADS * i;
            const bool ina = arow[i] && c < k, inb = brow[i] && c < k;
            cp_async16(a + 16 * q, ina ? arow[i] + c : X, ina);
            cp_async16(b + 16 * q, inb ? brow[i] + c : W, inb);
        }
    };

    const int wg = tid >> 7;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;
    const int nk = (k + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 2; s++) {
        if (s < nk) load(s, s);
        cp_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_wait<STAGES - 3>(); /* my pieces of tile kt have landed */
        fence_proxy_async();
        __syncthreads();       /* everyone's have, and every wgmma group before kt - 1 is retired */
        if (kt + STAGES - 2 < nk) load((kt + STAGES - 2) % STAGES, kt + STAGES - 2);
        cp_commit();
        const uint32_t a = sbase + (kt % STAGES) * STAGE_BYTES, b = a + TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++)
            wgmma_ss<T>(acc, smem_desc(a + wg * 8192 + ks * 256, 128, 1024), smem_desc(b + ks * 256, 128, 1024));
        wgmma_commit();
        wgmma_wait<1>();
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; i++) reg_fence(acc[i]);

    const int lane = tid & 31, warp = (tid >> 5) & 3;
    const int ra = wg * 64 + warp * 16 + (lane >> 2), rb = ra + 8, gc = (lane & 3) * 2;
    if (SWIGLU) {
        uint32_t *act = (uint32_t *)((T *)p.act + (size_t)row0 * out);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int col = n0 + 8 * i + gc;
            if (col >= out) continue;
            if (ra < rows)
                act[((size_t)ra * out + col) / 2] =
                    pack16<T>(silu_times(acc[4 * i], acc[32 + 4 * i]), silu_times(acc[4 * i + 1], acc[33 + 4 * i]));
            if (rb < rows)
                act[((size_t)rb * out + col) / 2] =
                    pack16<T>(silu_times(acc[4 * i + 2], acc[34 + 4 * i]), silu_times(acc[4 * i + 3], acc[35 + 4 * i]));
        }
    } else {
        float *y = p.y + (size_t)row0 * out;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const int col = n0 + 8 * i + gc;
            if (col >= out) continue;
            if (ra < rows) *(float2 *)(y + (size_t)ra * out + col) = make_float2(acc[4 * i], acc[4 * i + 1]);
            if (rb < rows) *(float2 *)(y + (size_t)rb * out + col) = make_float2(acc[4 * i + 2], acc[4 * i + 3]);
        }
    }
#else
    /* an image without wgmma: never launched (cu_grouped_hopper_fits) */
    (void)p;
    __trap();
#endif
}

template <typename K> bool allow_smem(K kernel) {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.binaryVersion != 90 ||
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) != cudaSuccess) {
        (void)cudaGetLastError(); /* a failed query leaves no error for the next launch check */
        return false;
    }
    return true;
}

template <typename T, bool SWIGLU>
xo_status launch(CuCtx *c, const GroupedArgs &a, int max_tiles, const char *what) {
    const int cols = SWIGLU ? BN / 2 : BN;
    dim3 grid((unsigned)((a.out + cols - 1) / cols), (unsigned)max_tiles);
    k_grouped_wgmma<T, SWIGLU><<<grid, THREADS, SMEM_BYTES, c->stream>>>(a);
    return cu_check_launch(c, what);
}

GroupedArgs grouped_args(const void *x16, const CuGroupPtrs *w, int out, int k, const int *offsets,
                         const int *tile_start, int groups) {
    GroupedArgs a;
    a.x = x16;
    a.w = *w;
    a.y = nullptr;
    a.act = nullptr;
    a.out = out;
    a.k = k;
    a.offsets = offsets;
    a.tile_start = tile_start;
    a.groups = groups;
    return a;
}

} // namespace

bool cu_grouped_hopper_fits(CuCtx *c, int bm, int out, int k) {
    if (bm != CU_GROUPED_HOPPER_ROWS || out % 8 || k % 8) return false;
    if (!c->hopper_gemm) { /* once per backend: compute capability 9.0 and this file's sm_90a image */
        int major = 0, minor = 0;
        bool ok = XO_CUDA_SM90A && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device) == cudaSuccess &&
                  major == 9 && minor == 0;
        if (!ok) (void)cudaGetLastError();
        ok = ok && allow_smem(k_grouped_wgmma<__nv_bfloat16, false>) && allow_smem(k_grouped_wgmma<__nv_bfloat16, true>) &&
             allow_smem(k_grouped_wgmma<__half, false>) && allow_smem(k_grouped_wgmma<__half, true>);
        c->hopper_gemm = ok ? 1 : 2;
    }
    return c->hopper_gemm == 1;
}

xo_status cu_grouped_gemm_hopper(CuCtx *c, float *y, const void *x16, const CuGroupPtrs *w, xo_dtype t, int out, int k,
                                 const int *offsets, const int *tile_start, int groups, int max_tiles) {
    if (out <= 0 || max_tiles <= 0) return XO_OK;
    GroupedArgs a = grouped_args(x16, w, out, k, offsets, tile_start, groups);
    a.y = y;
    return t == XO_BF16 ? launch<__nv_bfloat16, false>(c, a, max_tiles, "grouped gemm (hopper)")
                        : launch<__half, false>(c, a, max_tiles, "grouped gemm (hopper)");
}

xo_status cu_grouped_swiglu_hopper(CuCtx *c, void *act, const void *x16, const CuGroupPtrs *w, xo_dtype t, int inter,
                                   int k, const int *offsets, const int *tile_start, int groups, int max_tiles) {
    if (inter <= 0 || max_tiles <= 0) return XO_OK;
    GroupedArgs a = grouped_args(x16, w, inter, k, offsets, tile_start, groups);
    a.act = act;
    return t == XO_BF16 ? launch<__nv_bfloat16, true>(c, a, max_tiles, "grouped gate/up + swiglu (hopper)")
                        : launch<__half, true>(c, a, max_tiles, "grouped gate/up + swiglu (hopper)");
}
