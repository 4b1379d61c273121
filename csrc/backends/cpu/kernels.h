/* CPU implementations of the backend table (backends/backend.h), one concern per file. */
#ifndef XO_CPU_KERNELS_H
#define XO_CPU_KERNELS_H

#include "backends/backend.h"
#include "engine/options.h"

/* The CPU backend's context (be->ctx): this model's kernel choices, from its options. */
typedef struct {
    int isa;            /* XO_ISA_* of the matrix-vector kernels: the option's ceiling on what the CPU has */
    int gemv_max_rows;  /* the option: largest m of a non-float32 product on the matrix-vector kernels; -1 auto */
    int tile_rows;      /* rows of W widened per tile for the sgemm of larger m */
    int threads;        /* OpenMP threads while one of this model's calls runs; 0: the process default */
    int saved_threads;  /* the calling thread's count, restored by leave */
} xo_cpu_ctx;

static inline const xo_cpu_ctx *xo_cpu_ctx_of(const xo_backend *be) { return (const xo_cpu_ctx *)be->ctx; }

/* Hot loops get AVX2/FMA (x86-64-v3) and AVX-512 (v4) versions, picked at load time by CPU
 * features (an "arch=haswell" clone would be picked by CPU model and never run on AMD). */
#define XO_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))

/* backends/cpu/threads.c: thread counts */
enum { XO_CPU_MAX_THREADS = 4096 };   /* as the threads option */
int xo_cpu_physical_cores(void);          /* physical cores within the process's affinity mask */
int xo_cpu_default_threads(void);         /* the process default (OMP_NUM_THREADS, else physical cores) */
xo_status xo_cpu_check_threads(long long n);   /* 1 <= n <= XO_CPU_MAX_THREADS, else XO_EINVAL */
xo_status xo_cpu_set_default_threads(long long n);
/* the team size for the next parallel work of a backend: its option, else the process default,
 * which when automatic leaves a core to each other runnable task */
int xo_cpu_team(const xo_cpu_ctx *cx);
long xo_cpu_runnable_now(void);   /* runnable tasks on the machine (/proc/loadavg), 0 when unknown */
/* the calling thread and its OpenMP team made safe for signals during oneDNN's sgemm (threads.c) */
void xo_cpu_guard_signals(const xo_cpu_ctx *cx);

/* backends/cpu/gemm.c */
xo_status xo_cpu_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows);
void xo_cpu_linear_free(xo_backend *be, xo_linear *w);
xo_status xo_cpu_linear_to_host(xo_backend *be, const xo_linear *w, float *host);
xo_status xo_cpu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m);
/* y[m, rows] = x[m, w->in] @ W[row0 : row0 + rows].T (a row range of any storage dtype) */
xo_status xo_cpu_matmul_rows(xo_backend *be, float *y, const float *x, const xo_linear *w, int m, int row0, int rows);
xo_status xo_cpu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n);
/* the largest m that takes the matrix-vector kernels when the option leaves it to the rule: before
 * the widened tiles or the AMX tiles (backends/cpu/amx.c), and before the AMX tiles for bfloat16
 * (measured: benchmarks/RESULTS.md) */
enum { XO_CPU_GEMV_MAX_ROWS = 40, XO_CPU_AMX_BF16_GEMV_MAX_ROWS = 8 };
/* backends/cpu/weights.c: weight storage. 64-byte aligned, on 2 MB pages (madvise) from 2 MB up, not
 * zeroed; release with free(). */
void *xo_cpu_weight_alloc(size_t bytes);
/* Group-wise weights (I8, I4): one float32 scale per XO_QGROUP consecutive weights of a row
 * (a row's last group is padded with q = 0), rows stored in blocks of XO_QROWS, interleaved so
 * that one 32-byte piece holds the same few columns of all 16 rows of a block: the dot product
 * kernels then keep one lane per row and never reduce horizontally. Block b, group g occupies
 * xo_cpu_group_bytes(dtype) bytes at (b * groups + g) * that; inside it, piece p (32 bytes) holds
 * for row j of the block (0-15) the bytes 2j and 2j+1:
 *   I8: q[2p], q[2p + 1] of the group (int8, |q| <= 127), p = 0..15;
 *   I4: (q[2p] + 8) | (q[16 + 2p] + 8) << 4 and (q[2p + 1] + 8) | (q[17 + 2p] + 8) << 4,
 *       q in [-8, 7], p = 0..7.
 * Scales: [blocks][groups][XO_QROWS]. Rows past `out` in the last block are zeros. */
enum { XO_QGROUP = 32, XO_QROWS = 16 };
static inline int xo_cpu_groups(int in) { return (in + XO_QGROUP - 1) / XO_QGROUP; }
static inline int xo_cpu_blocks(int out) { return (out + XO_QROWS - 1) / XO_QROWS; }
static inline int xo_cpu_grouped(xo_dtype t) { return t == XO_I8 || t == XO_I4; }
/* bytes of one block's group: 16 rows x 32 weights */
static inline size_t xo_cpu_group_bytes(xo_dtype t) { return t == XO_I4 ? 256 : 512; }
size_t xo_cpu_weight_bytes(const xo_linear *w);   /* bytes of w->data */
size_t xo_cpu_scale_count(const xo_linear *w);    /* floats of w->scales (0 unless grouped) */
/* rows [row_offset, row_offset+rows) of w (storage allocated, w->scales too for I8/I4) from host
 * rows of dtype src_t; bf16/f16 round to nearest even, int8/int4 are group-wise (above) */
xo_status xo_cpu_store_rows(xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows);
/* dst[rows, w->in] = rows row0.. of w, widened to float32 (int8/int4: times the scales); serial */
void xo_cpu_dequant_rows(float *dst, const xo_linear *w, size_t row0, size_t rows);

/* The activations of a grouped product, quantised once per product and shared by every row of
 * W: row i of x, group g, as int16 with one float32 scale (|q| <= 32767, so the rounding is
 * 2^-16 of the group's largest magnitude), stored as pairs (k even in the low half), with the
 * group's sum of q (the I4 nibbles' +8 is taken off through it). */
typedef struct {
    int m, G;             /* rows, groups per row */
    const uint32_t *pair; /* [m][G * 16]: q[2p] & 0xffff | q[2p + 1] << 16 */
    const float *d;       /* [m][G]; NaN for a group holding a NaN or an infinity */
    const int32_t *sum;   /* [m][G] */
} xo_cpu_qx;

/* backends/cpu/qgemv.c: y[i, r - row0] = x[i] . W[r] for rows r in [row0, row0 + rows) of a
 * grouped W, i < m (outputs ldy floats apart), with x quantised as xo_cpu_qx; OpenMP over blocks
 * of rows. Fails only for want of memory. */
xo_status xo_cpu_qgemv(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows, int isa);
/* the same on the calling thread alone (inside a parallel region), with the activations
 * quantised into scratch: xo_cpu_qx_bytes(m, w->in) bytes */
size_t xo_cpu_qx_bytes(int m, int K);
void xo_cpu_qgemv_serial(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows, int isa,
                         void *scratch);

/* backends/cpu/gemv.c: y[m, w->out] = x[m, w->in] @ W.T for the float storage dtypes (F32, BF16,
 * F16) with float32 accumulation; vectorised matrix-vector kernels meant for small m (decode),
 * OpenMP over output rows. */
void xo_cpu_gemv(float *y, const float *x, int m, const xo_linear *w, int isa);
int xo_cpu_best_isa(void);              /* the best kernel set this CPU runs (XO_ISA_*) */
const char *xo_cpu_isa_name(int level);

/* backends/cpu/amx.c: y[i, r - row0] = x[i] . W[r] for rows r in [row0, row0 + rows) of a
 * bfloat16, int8 or int4 W (xo_cpu_amx_dtype), on AMX tiles; OpenMP over blocks of 16 rows. */
int xo_cpu_amx_available(void);          /* AMX-BF16 on this CPU, and the OS lets the process use it */
int xo_cpu_amx_dtype(xo_dtype t);
xo_status xo_cpu_amx_matmul(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows);
/* the largest m of a product that takes the matrix-vector kernels: the option, else the rule
 * for this storage (AMX takes over from fewer rows than the widened tiles do) */
int xo_cpu_gemv_limit(const xo_cpu_ctx *cx, xo_dtype t);

/* backends/cpu/elementwise.c */
xo_status xo_cpu_rmsnorm(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps);
xo_status xo_cpu_rope(xo_backend *be, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                      const float *inv_freq, float mscale);
/* rows of x are row_stride floats apart; heads*hd of each row are rotated */
xo_status xo_cpu_rope_rows(float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                           const float *inv_freq, float mscale);
xo_status xo_cpu_add(xo_backend *be, float *y, const float *x, size_t n);
xo_status xo_cpu_add_rmsnorm(xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d, float eps);
xo_status xo_cpu_swiglu(xo_backend *be, float *y, const float *gu, int n, int inter);
xo_status xo_cpu_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int width, int start,
                             const int32_t *start_device, const float *src, int batch, int n, int src_stride);
xo_status xo_cpu_argmax_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols);

/* backends/cpu/decode.c: the decode session's bookkeeping (backends/backend.h) */
xo_status xo_cpu_decode_begin(xo_backend *be, const xo_decode_state *st);
xo_status xo_cpu_decode_end(xo_backend *be, const xo_decode_state *st);
xo_status xo_cpu_suppress_tokens(xo_backend *be, float *logits, int rows, int cols, const int32_t *ids, int n,
                                 const int32_t *step_device, int below);

/* backends/cpu/moe.c */
xo_status xo_cpu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k);
xo_status xo_cpu_moe_experts(xo_backend *be, const xo_moe_args *a);

/* backends/cpu/attention.c */
xo_status xo_cpu_attention(xo_backend *be, const xo_attention_args *a);

#endif
