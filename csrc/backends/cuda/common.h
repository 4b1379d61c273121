/* Shared pieces of the CUDA backend (the plugin xoron/_xoron_cuda.so). Activations are
 * float32 as the kernel table says; weights live in the linear's dtype (F32, BF16, F16).
 * Everything runs on the backend's one stream; memory comes from the device's
 * stream-ordered pool (cudaMallocAsync), so the graph's per-call scratch is cheap. */
#ifndef XO_CU_COMMON_H
#define XO_CU_COMMON_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include <utility>

extern "C" {
#include "backends/backend.h"
}

struct XoLt;  /* cuBLASLt state, backends/cuda/cublaslt.cu */

/* A bad value a kernel met in its inputs (an expert id out of range, a NaN logit). Kept in
 * mapped host memory: a kernel writes it only on a fault, and the host reads it after the
 * stream synchronises without a copy; the first fault since the last read wins. */
enum { CU_FAULT_NONE = 0, CU_FAULT_EXPERT_ID = 1, CU_FAULT_NAN_LOGIT = 2 };
struct CuFault {
    int kind;
    int a, b; /* EXPERT_ID: the id, the number of experts; NAN_LOGIT: the row, the token */
};

/* which kernel a decode step over a 16-bit latent cache takes */
enum { CU_DECODE_AUTO = 0, CU_DECODE_LATENT = 1, CU_DECODE_EXPAND = 2 };

struct CuCtx {
    int device;
    int num_sms;
    cudaStream_t stream;
    cudaMemPool_t pool;
    XoLt *lt;             /* NULL: cuBLASLt unavailable, the built-in GEMM kernels are used */
    void *act16;          /* scratch: activations converted to 16-bit for the GEMMs */
    size_t act16_bytes;
    void *attn16;         /* scratch: attention's output stored 16-bit for the output projection (its own
                           * buffer: the latent expansion inside the attention uses, and may grow, act16) */
    size_t attn16_bytes;
    int moe_host;         /* option cuda_moe=host: per-expert GEMMs sized from host-read counts */
    int attn_rows;        /* option cuda_attention=rows: never the tensor-core attention kernel */
    int attn_decode;      /* decode over a 16-bit latent cache: CU_DECODE_* (option cuda_attention) */
    long long decode_counts[2]; /* decode-attention calls over the latent cache: [0] expanded into scratch,
                                 * [1] decode_attention.cu (a recorded step counts when recorded) */
    long long moe_counts[XO_MOE_PATHS]; /* cu_moe_experts calls by the path taken (XO_MOE_PATH_*) */
    int attn_mma;         /* option cuda_attention=mma: prefill on the mma.sync kernel even where wgmma fits */
    int hopper_attn;      /* attention_hopper.cu usable here: 0 not asked yet, 1 yes, 2 no */
    int hopper_gemm;      /* grouped_gemm_hopper.cu usable here: 0 not asked yet, 1 yes, 2 no */
    int hopper_latent;    /* latent_decode_hopper.cu usable here: 0 not asked yet, 1 yes, 2 no */
    void *tensor_map_encoder; /* the driver's cuTensorMapEncodeTiled, once hopper_gemm is 1 */
    int attn_keys;        /* option cuda_attention_keys: keys per wgmma prefill launch (0: by CU_HOPPER_SCRATCH) */
    long long prefill_counts[2]; /* tensor-core prefill attention launches (one per key block): [0] mma.sync,
                                  * [1] attention_hopper.cu */
    int pdl;              /* programmatic dependent launch (compute capability 9.0+ and option cuda_pdl) */
    size_t memory_limit;  /* 0: none; else cu_alloc_raw fails once the pool would hand out more */
    xo_error_sink sink;   /* the engine's error channel: every failure is reported through it */
    CuFault *fault;       /* mapped host memory: faults the kernels found in their inputs */
    CuFault *fault_dev;   /* the same, as the kernels address it */
};

static inline CuCtx *cu_ctx(xo_backend *be) { return (CuCtx *)be->ctx; }

/* Records a failure message in the engine's channel and returns code. */
xo_status cu_fail(CuCtx *c, xo_status code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The same with the message already recorded appended: "<what>: <reason>" (a failed cu_alloc). */
xo_status cu_fail_more(CuCtx *c, xo_status code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* XO_OK, or XO_EDEVICE with the pending CUDA error recorded. */
xo_status cu_check(CuCtx *c, cudaError_t e, const char *what);
xo_status cu_check_launch(CuCtx *c, const char *what);

#define CU_TRY(c, call, what)                                  \
    do {                                                       \
        cudaError_t cu_e_ = (call);                            \
        if (cu_e_ != cudaSuccess) return cu_check((c), cu_e_, (what)); \
    } while (0)

/* records the first fault of a launch sequence; the caller then reads a safe value instead */
__device__ __forceinline__ void cu_report_fault(CuFault *f, int kind, int a, int b) {
    if (atomicCAS(&f->kind, CU_FAULT_NONE, kind) == CU_FAULT_NONE) {
        f->a = a;
        f->b = b;
    }
}
/* an expert id checked against E: a bad one is reported and replaced by 0 */
__device__ __forceinline__ int cu_expert_id(int e, int E, CuFault *f) {
    if (e >= 0 && e < E) return e;
    cu_report_fault(f, CU_FAULT_EXPERT_ID, e, E);
    return 0;
}
/* XO_OK, or the fault the kernels recorded since the last call (after the stream synchronised) */
xo_status cu_take_fault(CuCtx *c);

/* stream-ordered device memory, zero-filled (cu_alloc) or not (cu_alloc_raw); on failure NULL
 * with the reason (naming the size) recorded */
void *cu_alloc(CuCtx *c, size_t bytes);
void *cu_alloc_raw(CuCtx *c, size_t bytes);
void cu_free(CuCtx *c, void *p);
/* grows ctx->act16 (ctx->attn16) to at least `bytes` */
xo_status cu_act16_reserve(CuCtx *c, size_t bytes);
xo_status cu_attn16_reserve(CuCtx *c, size_t bytes);

/* products over at most this many rows take the skinny kernels (float32 x); more rows take a GEMM
 * over x converted to the weights' 16-bit type (gemm.cu) */
enum { CU_SKINNY_MAX_M = 8 };
static inline bool cu_is16(xo_dtype t) { return t == XO_BF16 || t == XO_F16; }

/* weight storage holds this many rows (the extra ones zero) */
static inline int cu_padded_rows(int out) { return (out + 7) & ~7; }

static inline size_t cu_dtype_size(xo_dtype t) {
    return t == XO_F32 ? 4 : (t == XO_BF16 || t == XO_F16) ? 2 : t == XO_I8 ? 1 : 0;
}

/* ---- device conversion helpers ---- */
__device__ __forceinline__ float cu_ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float cu_ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float cu_ld(const __half *p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void cu_st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void cu_st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void cu_st(__half *p, size_t i, float v) { p[i] = __float2half(v); }
template <typename T> __device__ __forceinline__ T cu_from_f32(float v);
template <> __device__ __forceinline__ float cu_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cu_from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half cu_from_f32<__half>(float v) { return __float2half(v); }

/* eight consecutive elements widened to float (16-byte aligned loads) */
__device__ __forceinline__ void load8(const float *p, float *v) {
    float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float *v) {
    uint4 r = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const __half *p, float *v) {
    uint4 r = *(const uint4 *)p;
    const __half2 *h = (const __half2 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

/* Columns i, i + 1 of an output stored as float32 in out, or (out16 not NULL) in out16 rounded to t
 * (BF16 or F16) exactly as cu_st rounds them: the attention kernels' store, 16-bit when the product
 * after them reads 16 bits (attention_o_proj), the same values a conversion of the float32 would give. */
__device__ __forceinline__ void cu_st_pair(float *out, void *out16, xo_dtype t, size_t i, float a, float b) {
    if (!out16) {
        *(float2 *)(out + i) = make_float2(a, b);
    } else if (t == XO_BF16) {
        __nv_bfloat162 v;
        v.x = __float2bfloat16(a);
        v.y = __float2bfloat16(b);
        *(__nv_bfloat162 *)((__nv_bfloat16 *)out16 + i) = v;
    } else {
        __half2 v;
        v.x = __float2half(a);
        v.y = __float2half(b);
        *(__half2 *)((__half *)out16 + i) = v;
    }
}

/* The rotary embedding of SPEC 5 on one pair (a, b) = (v[j], v[j + hd/2]) at angle theta = pos *
 * inv_freq[j]: every kernel that rotates goes through these, so fused and plain rotations agree
 * to the bit. */
__device__ __forceinline__ void cu_rope_angle(int32_t pos, float inv_freq, float mscale, float &cs, float &sn) {
    const float theta = (float)pos * inv_freq;
    cs = cosf(theta) * mscale;
    sn = sinf(theta) * mscale;
}
__device__ __forceinline__ void cu_rope_pair(float &a, float &b, float cs, float sn) {
    /* the roundings spelled out: left to itself the compiler contracts these into FMAs differently
     * in different kernels (a GEMV's rotated store against k_rope's were 1 ulp apart) */
    const float ra = __fmaf_rn(a, cs, -__fmul_rn(b, sn)), rb = __fmaf_rn(b, cs, __fmul_rn(a, sn));
    a = ra;
    b = rb;
}

/* Programmatic dependent launch (Hopper): a small kernel started by cu_launch may begin while
 * the kernel before it drains, so its launch and prologue overlap that tail (decode steps are
 * chains of such kernels; large grids gain nothing and are launched plainly). Every kernel
 * starts with CU_PDL_ENTRY (or prefetches constant data, then CU_PDL_ENTRY): the wait, in
 * every block before any return, holds it until the earlier work is complete and visible. */
__device__ __forceinline__ void cu_pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
#define CU_PDL_ENTRY() cu_pdl_entry()

/* L2 prefetch of data no earlier kernel writes (weights), before CU_PDL_ENTRY */
__device__ __forceinline__ void cu_prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

template <typename... KArgs, typename... Args>
static inline void cu_launch(CuCtx *c, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args &&...args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    cfg.numAttrs = c->pdl && blocks <= 8ull * (unsigned)c->num_sms ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...); /* errors: cu_check_launch */
}

static inline unsigned cu_blocks(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffff ? 0x7fffffff : (b ? b : 1));
}

/* ---- entry points, one concern per file ---- */
/* backends/cuda/attention_hopper.cu: a 16-bit prefill pass on the wgmma tensor cores, head_dim 64,
 * over a block of keys packed as float16 tiles of CU_HOPPER_TILE_KEYS keys (the running softmax
 * state across blocks kept by the kernel itself) */
enum { CU_HOPPER_TILE_KEYS = 128, CU_HOPPER_MASK_BYTES = 144 /* a tile's key bytes, then an int */ };
struct CuHopperAttn {
    int batch, t, past, nh, nkv, group; /* group: query heads per kv head */
    const float *q;
    float *out;
    void *out16;              /* or NULL: the output stored as out16_t (BF16 or F16) here instead of out */
    xo_dtype out16_t;
    const __half *tiles;      /* [batch][nkv][ntiles] K tile then V tile (cu_attention_hopper_pack) */
    const uint8_t *tile_mask; /* [batch][ntiles] (cu_attention_hopper_mask) */
    int kbeg, ntiles;         /* the block's first key (a multiple of the tile) and its tiles */
    float scale, eps;
    float *state;    /* [rows, nh, 66] across the blocks of a pass, or NULL: one block */
    int first, last; /* this block starts (the state is not read) / ends the pass (the output is written) */
};
/* len keys (the rows b * src_rows + jj, src_stride elements apart, K and V of kv head g at
 * g * 64) into the tiles tile0.. of a block of ntiles per (row, kv head); pos (or NULL: K is
 * rotated already): key jj of row b is at position pos[b * pos_rows + jj] */
struct CuHopperPack {
    __half *tiles;
    int batch, nkv, ntiles, tile0, len, src_rows;
    size_t src_stride;
    const int32_t *pos;
    int pos_rows;
    const float *inv_freq;
    float mscale;
};
/* compute capability 9.0 with the sm_90a image, head_dim 64, and not cuda_attention=mma */
bool cu_attention_hopper_fits(CuCtx *c, int head_dim);
xo_status cu_attention_hopper_pack(CuCtx *c, const CuHopperPack &a, const void *K, const void *V, xo_dtype kt);
/* the tile mask of the keys [kbeg, kbeg + 128 ntiles): visible iff below kend and mask[b * cap + j] */
xo_status cu_attention_hopper_mask(CuCtx *c, uint8_t *tile_mask, const uint8_t *mask, int batch, int cap, int kbeg,
                                   int kend, int ntiles);
xo_status cu_attention_hopper(CuCtx *c, const CuHopperAttn &a);
/* backends/cuda/cublaslt.cu, built where setup.py finds cublasLt.h (XO_CUDA_CUBLASLT) */
#if XO_CUDA_CUBLASLT
/* cuBLASLt from `library` ("" : the usual names), loaded once per process; NULL where it is not found */
XoLt *cu_lt_create(CuCtx *c, const char *library);
void cu_lt_destroy(XoLt *lt);
/* y[m, n] = x[m, k] @ W[n, k]^T (x of the weight's type t, or float32 with float32 W); 0 when
 * cuBLASLt cannot do it (the caller uses a kernel), else 1 with *rc set */
int cu_lt_gemm(CuCtx *c, float *y, const void *x, const void *w, xo_dtype t, int m, int n, int k, xo_status *rc);
/* the same for `batch` products, x batches x_stride elements apart, y compact (n % 8 == 0) */
int cu_lt_gemm_batched(CuCtx *c, float *y, const void *x, long long x_stride, const void *w, xo_dtype t, int m, int n,
                       int k, int batch, xo_status *rc);
#else
/* A plugin built without the header has no cuBLASLt path: c->lt stays NULL and every product
 * takes the built-in kernels (the options refuse an explicit cublaslt_library on such a build). */
static inline XoLt *cu_lt_create(CuCtx *, const char *) { return NULL; }
static inline void cu_lt_destroy(XoLt *) {}
static inline int cu_lt_gemm(CuCtx *, float *, const void *, const void *, xo_dtype, int, int, int, xo_status *) {
    return 0;
}
static inline int cu_lt_gemm_batched(CuCtx *, float *, const void *, long long, const void *, xo_dtype, int, int, int,
                                     int, xo_status *) {
    return 0;
}
#endif

/* backends/cuda/gemm.cu */
xo_status cu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m);
xo_status cu_gate_up_swiglu(xo_backend *be, float *act, const float *x, float *gu, const xo_linear *w, int m);
/* the kernel table's ffn (backend.h): with 16-bit weights over many rows the SwiGLU result goes
 * straight to the 16-bit input of the down product */
xo_status cu_ffn(xo_backend *be, float *out, const float *x, const xo_ffn *f, int n, float *gu, float *act);
/* y1 = x @ w1.T (rotated by rot when not NULL), y2 = x @ w2.T: one kernel for a few rows */
xo_status cu_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2, const float *x,
                         int m, const xo_rotary *rot);
/* the kernel table's rmsnorm_matmul, rmsnorm_matmul_pair and rmsnorm_ffn (backend.h): where the product
 * reads a 16-bit x (many rows, 16-bit weights) the norm stores its rows 16-bit for it, with no float32
 * copy to convert (nor any, unless nm->keep) */
xo_status cu_rmsnorm_matmul(xo_backend *be, float *y, const xo_rmsnorm_in *nm, const xo_linear *w, int m);
xo_status cu_rmsnorm_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                                 const xo_rmsnorm_in *nm, int m, const xo_rotary *rot);
xo_status cu_rmsnorm_ffn(xo_backend *be, float *out, const xo_rmsnorm_in *nm, const xo_ffn *f, int n, float *gu,
                         float *act);
/* y[m, out] = x16[m, k] @ W.T with x already 16-bit (the dtype of w) */
xo_status cu_matmul16(CuCtx *c, float *y, const void *x16, const xo_linear *w, int m);
/* batch products of m rows each, y[b] = x16[b] @ W.T, x16 batches x_stride elements apart, y compact;
 * returns 0 when cuBLASLt cannot (the caller does it another way), else 1 with *rc set */
int cu_matmul16_batched(CuCtx *c, float *y, const void *x16, long long x_stride, const xo_linear *w, int m, int batch,
                        xo_status *rc);
/* f32 -> 16-bit conversion of n values (dtype t: XO_BF16 or XO_F16) */
xo_status cu_convert_act(CuCtx *c, void *dst, const float *src, size_t n, xo_dtype t);

/* grouped products for the MoE (backends/cuda/gemm.cu) */
enum { CU_MAX_GROUPS = 128 };
struct CuGroupPtrs { const void *p[CU_MAX_GROUPS]; };
/* the row tile (64 or 128) of the grouped GEMM for `rows` rows over `groups` groups */
int cu_grouped_tile_rows(int rows, int groups);
/* Y[rows of group g] = X[rows of group g] @ W_g.T; offsets/tile_start device [G+1];
 * bm: the row tile tile_start was counted in (cu_grouped_tile_rows) */
xo_status cu_grouped_gemm16(CuCtx *c, float *y, const void *x16, const CuGroupPtrs *w, xo_dtype t, int out, int k,
                            const int *offsets, const int *tile_start, int groups, int max_tiles, int bm);
/* the same on Hopper (backends/cuda/grouped_gemm_hopper.cu), x16 [rows, k] with tile_start counted
 * in CU_GROUPED_HOPPER_ROWS-row tiles: whether both MoE products (gate/up: k = hidden, down: k =
 * inter) run there for `rows` rows over `groups` experts */
enum { CU_GROUPED_HOPPER_ROWS = 128 };
bool cu_grouped_hopper_fits(CuCtx *c, int bm, int groups, int rows, int hidden, int inter);
xo_status cu_grouped_gemm_hopper(CuCtx *c, float *y, const void *x16, int rows, const CuGroupPtrs *w, xo_dtype t, int out,
                                 int k, const int *offsets, const int *tile_start, int groups, int max_tiles);
/* act[rows of g, inter] = silu(X @ gate_g.T) * (X @ up_g.T) in dtype t, W_g = [gate_g; up_g] [2 inter, k] */
xo_status cu_grouped_swiglu_hopper(CuCtx *c, void *act, const void *x16, int rows, const CuGroupPtrs *w, xo_dtype t,
                                   int inter, int k, const int *offsets, const int *tile_start, int groups, int max_tiles);
/* the dense form: act[rows, inter] (16-bit, or float32 with act_f32) = silu(x16 @ gate.T) * (x16 @ up.T),
 * gate_up = [gate; up] [2 inter, k] 16-bit, x16 [rows, k] of its dtype; whether it runs here for that shape */
bool cu_swiglu_hopper_fits(CuCtx *c, int rows, int k, int inter);
xo_status cu_swiglu_hopper(CuCtx *c, void *act, bool act_f32, const void *x16, int rows, const xo_linear *gate_up, int k);
/* skinny version for few rows per group: f32 inputs, any weight dtype; offsets device [G+1] */
xo_status cu_grouped_skinny(CuCtx *c, float *y, const float *x, const CuGroupPtrs *w, xo_dtype t, int out, int k,
                            const int *offsets, int groups);

/* backends/cuda/elementwise.cu */
xo_status cu_rmsnorm(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps);
xo_status cu_add_rmsnorm(xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d, float eps);
/* the norm of nm (backend.h) over n rows stored in y16 as t (BF16 or F16), rounded as cu_convert rounds
 * the float32 values cu_rmsnorm / cu_add_rmsnorm give; nm->x written too only with nm->keep */
xo_status cu_rmsnorm_to16(CuCtx *c, void *y16, xo_dtype t, const xo_rmsnorm_in *nm, int n);
xo_status cu_rope(xo_backend *be, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                  const float *inv_freq, float mscale);
/* rows of x are row_stride floats apart; row i takes position pos[(i / rpb) * pcap + i % rpb] */
xo_status cu_rope_rows(CuCtx *c, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                       const float *inv_freq, float mscale, int rpb, int pcap);
xo_status cu_load_ids(xo_backend *be, int32_t *dst, const void *src, int wide, size_t n, int vocab, uint64_t *bad);
xo_status cu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n);
xo_status cu_add(xo_backend *be, float *y, const float *x, size_t n);
xo_status cu_swiglu(xo_backend *be, float *y, const float *gu, int n, int inter);
/* the same into y of type t (F32, or BF16 / F16: the input of a 16-bit GEMM) */
xo_status cu_swiglu_to(CuCtx *c, void *y, xo_dtype t, const float *gu, size_t rows, int inter);
xo_status cu_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int width, int start,
                         const int32_t *start_dev, const float *src, int batch, int n, int src_stride);
/* the kernel table's rmsnorm_cache_write and rope_kv_cache_write (backend.h), each one kernel */
xo_status cu_rmsnorm_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int start,
                                 const int32_t *start_dev, float *normed, const float *x, const float *w, int batch,
                                 int n, int d, float eps);
xo_status cu_rope_kv_cache_write(xo_backend *be, void *k_cache, void *v_cache, xo_dtype cache_t, int capacity,
                                 int start, const int32_t *start_dev, float *kv, int batch, int n, const xo_rotary *rot);
/* dst [batch * len, width] f32 <- slots [r, 0 .. len) of a [batch, capacity, width] array of dtype t */
xo_status cu_gather_rows(CuCtx *c, float *dst, const void *src, xo_dtype t, int batch, int capacity, int len, int width);
xo_status cu_argmax_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols);
xo_status cu_convert(CuCtx *c, void *dst, xo_dtype dt, const void *src, xo_dtype st, size_t n);

/* backends/cuda/sample.cu */
xo_status cu_sample_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols, float temperature,
                         int top_k, float top_p, float min_p, uint64_t seed, uint64_t step, const int32_t *step_dev);

/* backends/cuda/decode.cu: decode-session bookkeeping and step graphs */
xo_status cu_decode_begin(xo_backend *be, const xo_decode_state *st);
xo_status cu_decode_end(xo_backend *be, const xo_decode_state *st);
xo_status cu_suppress_tokens(xo_backend *be, float *logits, int rows, int cols, const int32_t *ids, int n,
                             const int32_t *step_dev, int below);
xo_status cu_capture_begin(xo_backend *be);
xo_status cu_capture_end(xo_backend *be, void **graph);
xo_status cu_graph_launch(xo_backend *be, void *graph);
void cu_graph_free(xo_backend *be, void *graph);

/* backends/cuda/moe.cu */
xo_status cu_moe_router(xo_backend *be, int32_t *idx, float *weight, const float *x, const float *norm_w,
                        const xo_linear *router, int n, int k);
xo_status cu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k);
xo_status cu_moe_experts(xo_backend *be, const xo_moe_args *a);

/* backends/cuda/attention.cu */
xo_status cu_attention(xo_backend *be, const xo_attention_args *a);
/* the kernel table's attention_o_proj (backend.h): on the tensor-core prefill kernels with a 16-bit
 * o, the kernels store the output 16-bit for the product (a->out unwritten) */
xo_status cu_attention_o_proj(xo_backend *be, float *y, const xo_attention_args *a, const xo_linear *o);

/* backends/cuda/decode_attention.cu: one new token per row over a 16-bit latent cache, K expanded
 * on the tensor cores inside the kernel and V absorbed; fits says whether the call qualifies */
/* whether the call is a decode step decode_attention.cu takes (shape and dtypes), and whether it
 * is to take it (cu_latent_decode_fits and the option, under auto cu_latent_decode_wins) */
bool cu_latent_decode_fits(const xo_attention_args *a);
bool cu_latent_decode_wins(const xo_attention_args *a);
bool cu_latent_decode_chosen(const CuCtx *c, const xo_attention_args *a);
xo_status cu_latent_decode(CuCtx *c, const xo_attention_args *a);
/* backends/cuda/latent_decode_hopper.cu: decode_attention.cu's key-split kernel for 4 heads per
 * block on the wgmma tensor cores (compute capability 9.0 with the sm_90a image); it writes the
 * same partial results (p.part_ml, p.part_acc) for the merge, which the caller then launches */
struct LatP; /* backends/cuda/latent_decode.h */
bool cu_latent_decode_hopper_fits(CuCtx *c);
xo_status cu_latent_decode_hopper(CuCtx *c, const LatP &p, int batch, xo_dtype t);

#endif
