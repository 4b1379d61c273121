/* The MoE's grouped expert products on Hopper (sm_90a): rows already permuted by expert
 * (moe.cu), each group's rows times its own weight, the groups found from the device-side
 * offsets, so nothing is read back to the host. Two kernels of one mainloop:
 *   plain:  Y[rows of g, out] (float32) = X[rows of g, k] @ W_g[out, k]^T (the down product);
 *   swiglu: act[rows of g, inter] = silu(X @ Gate_g^T) * (X @ Up_g^T), rounded to the 16-bit
 *           dtype, W_g = [Gate_g; Up_g] [2 inter, k] (gate rows first): the gate/up product with
 *           the SwiGLU in its epilogue, so no [rows, 2 inter] float32 intermediate exists.
 *
 * Without offsets (the dense FFN's gate/up product) the rows are one group of dense_rows, and the
 * activation may be stored float32 (act_f32: the gate_up_swiglu entry, whose result the down
 * product then rounds to the same 16-bit values as the 16-bit store would).
 *
 * A CTA computes 128 rows (of one group; tile_start counts each group's 128-row tiles) by 128
 * weight rows, the swiglu kernel's being gate rows c0 .. c0+63 then the matching up rows, so that
 * a thread holds a column's gate and up values at accumulator positions i and i + 32.
 *
 * Warp-specialized: one producer warp moves 64-column k-tiles of X and W into a ring of STAGES
 * slots with TMA (tensor maps with the 128-byte swizzle, the layout wgmma reads; the parts of a
 * box past the tensor's rows or k are zero), completing on the slot's "full" mbarrier; two
 * consumer warpgroups of 64 rows each wait on "full", issue 4 wgmma m64n128k16 with both
 * operands in shared memory, keep one group in flight, and release the slot of the previous
 * k-tile on its "empty" mbarrier once their wait has retired the products that read it. Rows of
 * a tile past its group's end hold the next group's rows (or zeros) and are not stored.
 *
 * The accumulator fragment of m64n128 (float32): thread lane of warp w holds rows 16 w + lane / 4
 * (d[4 i], d[4 i + 1]) and that + 8 (d[4 i + 2], d[4 i + 3]), columns 8 i + 2 (lane % 4) + {0, 1}. */
#include <cuda.h>
#include <cudaTypedefs.h>
#include <type_traits>

#include "backends/cuda/common.h"
#include "backends/cuda/mma.h"
#include "backends/cuda/wgmma.h"

#ifndef XO_CUDA_SM90A /* setup.py: 1 when this file is built with its sm_90a image */
#define XO_CUDA_SM90A 0
#endif

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3;
constexpr int CONSUMERS = 256, THREADS = CONSUMERS + 32;
constexpr int TILE_BYTES = BM * BK * 2;     /* an A or a B tile (BM == BN) */
constexpr int STAGE_BYTES = 2 * TILE_BYTES; /* A then B */
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024; /* + the slack that aligns the ring to 1024 */
constexpr int MAX_GROUPS = 16;              /* weight maps that fit the kernel's parameters */
static_assert(BM == BN && BM == CU_GROUPED_HOPPER_ROWS, "the tiles are the ones moe.cu counts");

struct GroupedMaps { /* CUtensorMap brings its own alignment */
    CUtensorMap x;                /* [rows, k] 16-bit, rows grouped by expert; box 64 x 128 */
    CUtensorMap w[MAX_GROUPS];    /* per group [out rows, k]; box 64 x 128 (swiglu: 64 x 64) */
};

struct GroupedArgs {
    float *y;   /* plain: [rows, out] */
    void *act;  /* swiglu: [rows, out] in the 16-bit dtype, or float32 with act_f32 */
    int out, k;
    const int *offsets, *tile_start; /* device [groups + 1]; NULL: one group of dense_rows */
    int groups, dense_rows, act_f32;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define XO_WGMMA_SS_M64N128K16(TYPE)                                                                                      \
    asm volatile("{\n"                                                                                                    \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                         \
                 "{"                                                                                                      \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                  \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                        \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                        \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                         \
                 "}, %64, %65, 1, 1, 1, 0, 0;\n}\n"                                                                       \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),       \
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),           \
                   "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),           \
                   "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),           \
                   "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),           \
                   "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),           \
                   "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),           \
                   "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                         \
                 : "l"(desc_a), "l"(desc_b))

/* D[64 x 128] += A[64 x 16] * B[16 x 128], both K-major in shared memory */
template <typename T> __device__ __forceinline__ void wgmma_ss(float *d, uint64_t desc_a, uint64_t desc_b) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        XO_WGMMA_SS_M64N128K16("bf16");
    else
        XO_WGMMA_SS_M64N128K16("f16");
}
#undef XO_WGMMA_SS_M64N128K16

template <typename T> __device__ __forceinline__ uint32_t pack16(float lo, float hi) {
    const T l = cu_from_f32<T>(lo), h = cu_from_f32<T>(hi);
    uint16_t a, b;
    memcpy(&a, &l, 2);
    memcpy(&b, &h, 2);
    return (uint32_t)a | ((uint32_t)b << 16);
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; } /* as k_swiglu */

#endif

/* grid (column tiles, row tiles): blockIdx.y is a tile of tile_start's count; tiles past the last
 * group's end (max_tiles is an upper bound) return at once */
template <typename T, bool SWIGLU>
__global__ __launch_bounds__(THREADS, 2) void k_grouped_tma(const __grid_constant__ GroupedMaps maps, const GroupedArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t full_bar[STAGES], empty_bar[STAGES];
    const int tile = blockIdx.y;
    int g = 0, row0 = tile * BM, rows = min(BM, p.dense_rows - row0);
    if (p.offsets) {
        if (tile >= p.tile_start[p.groups]) return;
        while (tile >= p.tile_start[g + 1]) g++;
        row0 = p.offsets[g] + (tile - p.tile_start[g]) * BM;
        rows = min(BM, p.offsets[g + 1] - row0);
    }
    const int out = p.out, nk = (p.k + BK - 1) / BK;
    const int n0 = blockIdx.x * (SWIGLU ? BN / 2 : BN); /* first output column of the tile */
    const int tid = threadIdx.x;
    const uint32_t sbase = (smem_addr(smem_raw) + 1023u) & ~1023u; /* the swizzle's atoms are 1024-aligned */
    const uint32_t fullb = smem_addr(full_bar), emptyb = smem_addr(empty_bar);
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(fullb + 8 * s, 1);
            mbar_init(emptyb + 8 * s, CONSUMERS / 32); /* lane 0 of each consumer warp */
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (tid >= CONSUMERS) { /* the producer warp: one lane issues every copy */
        if (tid == CONSUMERS) {
            const void *xm = &maps.x, *wm = &maps.w[g];
            for (int kt = 0; kt < nk; kt++) {
                const int s = kt % STAGES;
                if (kt >= STAGES) mbar_wait(emptyb + 8 * s, ((kt / STAGES) - 1) & 1);
                const uint32_t a = sbase + s * STAGE_BYTES, b = a + TILE_BYTES, bar = fullb + 8 * s;
                mbar_arrive_expect_tx(bar, STAGE_BYTES);
                tma_load_2d(a, xm, kt * BK, row0, bar);
                if (SWIGLU) {
                    tma_load_2d(b, wm, kt * BK, n0, bar);                        /* gate rows */
                    tma_load_2d(b + TILE_BYTES / 2, wm, kt * BK, out + n0, bar); /* their up rows */
                } else {
                    tma_load_2d(b, wm, kt * BK, n0, bar);
                }
            }
        }
        return;
    }

    const int wg = tid >> 7, lane = tid & 31, warp = (tid >> 5) & 3;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt % STAGES;
        mbar_wait(fullb + 8 * s, (kt / STAGES) & 1);
        const uint32_t a = sbase + s * STAGE_BYTES + wg * (TILE_BYTES / 2), b = sbase + s * STAGE_BYTES + TILE_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) wgmma_ss<T>(acc, smem_desc_sw128(a + 32 * ks), smem_desc_sw128(b + 32 * ks));
        wgmma_commit();
        wgmma_wait<1>(); /* the products of k-tile kt - 1 are done: its slot is free */
        if (kt > 0) {
            __syncwarp();
            if (lane == 0) mbar_arrive(emptyb + 8 * ((kt - 1) % STAGES));
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < 64; i++) reg_fence(acc[i]);

    const int ra = wg * 64 + warp * 16 + (lane >> 2), rb = ra + 8, gc = (lane & 3) * 2;
    if (SWIGLU && p.act_f32) {
        float *act = (float *)p.act + (size_t)row0 * out;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int col = n0 + 8 * i + gc;
            if (col >= out) continue;
            if (ra < rows)
                *(float2 *)(act + (size_t)ra * out + col) =
                    make_float2(silu_times(acc[4 * i], acc[32 + 4 * i]), silu_times(acc[4 * i + 1], acc[33 + 4 * i]));
            if (rb < rows)
                *(float2 *)(act + (size_t)rb * out + col) =
                    make_float2(silu_times(acc[4 * i + 2], acc[34 + 4 * i]), silu_times(acc[4 * i + 3], acc[35 + 4 * i]));
        }
    } else if (SWIGLU) {
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
    (void)maps;
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

/* cuTensorMapEncodeTiled from the driver the runtime loaded (no link against libcuda) */
void *find_encoder() {
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
#else
    cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
        (void)cudaGetLastError();
        return nullptr;
    }
    return fn;
}

/* a [rows, k] row-major 16-bit matrix as boxes of 64 columns x box_rows rows, 128-byte swizzled */
xo_status encode(CuCtx *c, CUtensorMap *map, const void *base, xo_dtype t, int k, int rows, int box_rows) {
    const PFN_cuTensorMapEncodeTiled_v12000 fn = (PFN_cuTensorMapEncodeTiled_v12000)c->tensor_map_encoder;
    cuuint64_t dims[2] = { (cuuint64_t)k, (cuuint64_t)rows };
    cuuint64_t strides[1] = { (cuuint64_t)k * 2 };
    cuuint32_t box[2] = { (cuuint32_t)BK, (cuuint32_t)box_rows };
    cuuint32_t steps[2] = { 1, 1 };
    const CUresult r = fn(map, t == XO_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                          (void *)base, dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        return cu_fail(c, XO_EINVAL, "grouped gemm (hopper): tensor map of a [%d, %d] matrix refused (CUresult %d)", rows, k,
                       (int)r);
    return XO_OK;
}

template <typename T, bool SWIGLU>
xo_status launch(CuCtx *c, const GroupedMaps &maps, const GroupedArgs &a, int max_tiles, const char *what) {
    const int cols = SWIGLU ? BN / 2 : BN;
    dim3 grid((unsigned)((a.out + cols - 1) / cols), (unsigned)max_tiles);
    k_grouped_tma<T, SWIGLU><<<grid, THREADS, SMEM_BYTES, c->stream>>>(maps, a);
    return cu_check_launch(c, what);
}

/* the maps of x [rows, k] and of each group's weight [w_rows, k] */
xo_status encode_all(CuCtx *c, GroupedMaps *maps, const void *x16, int rows, const CuGroupPtrs *w, int groups, xo_dtype t,
                     int k, int w_rows, int w_box) {
    xo_status rc = encode(c, &maps->x, x16, t, k, rows, BM);
    for (int g = 0; g < groups && rc == XO_OK; g++) rc = encode(c, &maps->w[g], w->p[g], t, k, w_rows, w_box);
    return rc;
}

GroupedArgs grouped_args(int out, int k, const int *offsets, const int *tile_start, int groups) {
    GroupedArgs a;
    a.y = nullptr;
    a.act = nullptr;
    a.out = out;
    a.k = k;
    a.offsets = offsets;
    a.tile_start = tile_start;
    a.groups = groups;
    a.dense_rows = 0;
    a.act_f32 = 0;
    return a;
}

} // namespace

/* once per backend: compute capability 9.0, this file's sm_90a image, the encoder */
static bool hopper_usable(CuCtx *c) {
    if (!c->hopper_gemm) {
        int major = 0, minor = 0;
        bool ok = XO_CUDA_SM90A && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device) == cudaSuccess &&
                  major == 9 && minor == 0;
        if (!ok) (void)cudaGetLastError();
        if (ok) c->tensor_map_encoder = find_encoder();
        ok = ok && c->tensor_map_encoder && allow_smem(k_grouped_tma<__nv_bfloat16, false>) &&
             allow_smem(k_grouped_tma<__nv_bfloat16, true>) && allow_smem(k_grouped_tma<__half, false>) &&
             allow_smem(k_grouped_tma<__half, true>);
        c->hopper_gemm = ok ? 1 : 2;
    }
    return c->hopper_gemm == 1;
}

bool cu_grouped_hopper_fits(CuCtx *c, int bm, int groups, int rows, int hidden, int inter) {
    /* every box starts inside its matrix and the matrices are at least a box (k >= 64, rows and
     * weight rows >= 128); 16-byte row strides; columns in pairs */
    if (bm != CU_GROUPED_HOPPER_ROWS || groups > MAX_GROUPS || rows < BM || hidden % 8 || inter % 8 || hidden < BN ||
        inter < BK)
        return false;
    return hopper_usable(c);
}

bool cu_swiglu_hopper_fits(CuCtx *c, int rows, int k, int inter) {
    if (rows < BM || k % 8 || inter % 8 || k < BK || 2 * inter < BN / 2) return false;
    return hopper_usable(c);
}

xo_status cu_swiglu_hopper(CuCtx *c, void *act, bool act_f32, const void *x16, int rows, const xo_linear *gate_up, int k) {
    const int inter = gate_up->out / 2;
    CuGroupPtrs w;
    w.p[0] = gate_up->data;
    GroupedMaps maps;
    xo_status rc = encode_all(c, &maps, x16, rows, &w, 1, gate_up->dtype, k, 2 * inter, BN / 2);
    if (rc != XO_OK) return rc;
    GroupedArgs a = grouped_args(inter, k, nullptr, nullptr, 1);
    a.act = act;
    a.act_f32 = act_f32;
    a.dense_rows = rows;
    const int tiles = (rows + BM - 1) / BM;
    return gate_up->dtype == XO_BF16 ? launch<__nv_bfloat16, true>(c, maps, a, tiles, "gate/up + swiglu (hopper)")
                                     : launch<__half, true>(c, maps, a, tiles, "gate/up + swiglu (hopper)");
}

xo_status cu_grouped_gemm_hopper(CuCtx *c, float *y, const void *x16, int rows, const CuGroupPtrs *w, xo_dtype t, int out,
                                 int k, const int *offsets, const int *tile_start, int groups, int max_tiles) {
    if (out <= 0 || max_tiles <= 0 || rows <= 0) return XO_OK;
    GroupedMaps maps;
    xo_status rc = encode_all(c, &maps, x16, rows, w, groups, t, k, out, BN);
    if (rc != XO_OK) return rc;
    GroupedArgs a = grouped_args(out, k, offsets, tile_start, groups);
    a.y = y;
    return t == XO_BF16 ? launch<__nv_bfloat16, false>(c, maps, a, max_tiles, "grouped gemm (hopper)")
                        : launch<__half, false>(c, maps, a, max_tiles, "grouped gemm (hopper)");
}

xo_status cu_grouped_swiglu_hopper(CuCtx *c, void *act, const void *x16, int rows, const CuGroupPtrs *w, xo_dtype t,
                                   int inter, int k, const int *offsets, const int *tile_start, int groups, int max_tiles) {
    if (inter <= 0 || max_tiles <= 0 || rows <= 0) return XO_OK;
    GroupedMaps maps;
    xo_status rc = encode_all(c, &maps, x16, rows, w, groups, t, k, 2 * inter, BN / 2);
    if (rc != XO_OK) return rc;
    GroupedArgs a = grouped_args(inter, k, offsets, tile_start, groups);
    a.act = act;
    return t == XO_BF16 ? launch<__nv_bfloat16, true>(c, maps, a, max_tiles, "grouped gate/up + swiglu (hopper)")
                        : launch<__half, true>(c, maps, a, max_tiles, "grouped gate/up + swiglu (hopper)");
}
