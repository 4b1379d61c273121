/* The kernel table. The model graph (engine/model.c) calls only these entries, so it never
 * knows whether it runs on the CPU or on a GPU. All activations are float32, row-major;
 * weights are stored in whatever dtype the linear asks for. Every pointer named "device"
 * below lives in the backend's memory. */
#ifndef XO_BACKEND_H
#define XO_BACKEND_H

#include <stdint.h>

#include "engine/interrupt.h"
#include "engine/options.h"
#include "engine/status.h"
#include "engine/tensor.h"

typedef struct xo_backend xo_backend;

/* The latent and router norms use a fixed epsilon whatever the config says (SPEC 3). */
#define XO_LATENT_NORM_EPS 1e-6f
#define XO_ROUTER_NORM_EPS 1e-6f
/* Added to the sum of the top-k router probabilities before they are renormalised (SPEC 6). */
#define XO_TOPK_RENORM_EPS 1e-5f

/* A weight matrix W [out, in], applied as y = x @ W.T. */
typedef struct {
    int out, in;
    xo_dtype dtype;  /* storage: F32, BF16, F16, or I8 / I4 (group-wise scales) */
    void *data;      /* device, [out, in] (I4: the backend's packed layout) */
    float *scales;   /* device, I8 / I4: one per group of `in` (the backend's layout) */
} xo_linear;

/* The rotation rope() applies (SPEC 5) to rows of `heads` heads of head_dim each, row i at pos[i]. */
typedef struct {
    const int32_t *pos;     /* device [rows] */
    int heads, head_dim;
    const float *inv_freq;  /* device [head_dim / 2] */
    float mscale;
} xo_rotary;

/* One SwiGLU FFN: gate and up stored as one [2*I, H] linear (gate rows first). */
typedef struct {
    xo_linear gate_up;
    xo_linear down;
} xo_ffn;

/* The RMSNorm in front of a product, as the rmsnorm_* entries take it: h[n, d] += add first when add
 * is not NULL (written back, as add_rmsnorm does), then x[n, d] = rmsnorm(h; w, eps). With keep the
 * caller reads x afterwards; without, x is scratch a backend may leave unwritten (handing the product
 * its own, narrower copy of the normed rows instead). */
typedef struct {
    float *h;
    const float *add;
    float *x;
    const float *w;
    int d;
    float eps;
    int keep;
} xo_rmsnorm_in;

/* Cache layout shared by the graph and the attention kernels. Per layer and batch row,
 * `capacity` token slots; slot j of row b holds the token at sequence index j.
 *
 * The latent-attention contract (SPEC 4). Every token contributes only its normed latent
 * c [rank] to the keys and values: with kv_b = [Wk | Wv] ([nkv*hd, rank] each),
 *     K = RoPE(c @ Wk.T, key position),   V = c @ Wv.T.
 * A LATENT cache stores c and the kernel expands K and V from it; a KV cache stores K
 * (already rotated) and V. Either way the result is the same; a kernel may absorb Wv into
 * the output (sum_j p_j (c_j @ Wv.T) = (sum_j p_j c_j) @ Wv.T) instead of expanding V. */
enum { XO_CACHE_LATENT = 0, XO_CACHE_KV = 1 };

typedef struct {
    int batch, new_tokens, past;   /* queries are sequence indices past .. past+new_tokens-1 */
    const int32_t *past_device;    /* or NULL; else the true past is read from here when the kernels
                                    * run, and `past` is only its upper bound (a replayed decode step) */
    int num_heads, num_kv_heads, head_dim, rank;
    int capacity;                  /* slots per row in the cache arrays below */
    int format;                    /* XO_CACHE_LATENT or XO_CACHE_KV */
    const float *q;                /* [batch*new_tokens, nh*hd], rotated */
    float *out;                    /* [batch*new_tokens, nh*hd] */
    const void *latent;            /* LATENT: [batch, capacity, rank], normed c, of latent_dtype */
    xo_dtype latent_dtype;         /* F32, BF16 or F16 */
    const xo_linear *kv_b;         /* LATENT: expands c to [K | V], [2*nkv*hd, rank] */
    const void *k, *v;             /* KV: [batch, capacity, nkv*hd] of kv_dtype, K rotated */
    xo_dtype kv_dtype;             /* F32, BF16 or F16 */
    const int32_t *key_pos;        /* [batch, capacity] position ids (LATENT: to rotate K) */
    const uint8_t *key_mask;       /* [batch, capacity] 1 = may be attended */
    const float *inv_freq;         /* [hd/2] */
    float mscale;
    float scale;                   /* 1/sqrt(hd) */
    float denom_eps;               /* added to the softmax denominator (SPEC 4.4 ring formulation) */
    int key_block;                 /* keys per row a kernel may expand or convert into scratch at once, so
                                    * that its scratch does not grow with the context; 0: no bound */
    const xo_interrupt *interrupt; /* a long prefill may stop between key blocks; or NULL */
} xo_attention_args;

typedef struct {
    int tokens, hidden, num_experts, top_k;
    const float *x;                /* [tokens, hidden] post-attention-normed input */
    float *out;                    /* [tokens, hidden]; the routed experts' sum is ADDED here */
    const int32_t *topk_idx;       /* [tokens, top_k] */
    const float *topk_weight;      /* [tokens, top_k] */
    const xo_ffn *experts;         /* [num_experts] */
} xo_moe_args;

/* The device-side state of a decode session. One step: decode_begin feeds each row's token
 * in and records its position in the cache; the forward pass runs with past read from
 * state[0]; decode_end turns the drawn tokens into outputs and advances the counters. */
typedef struct {
    int batch, capacity, ring;
    int32_t *state;            /* device [2]: tokens stored per row (past), index of the token being made */
    int32_t *tokens;           /* device [batch]: each row's last token; the draw writes the next here */
    int32_t *ids, *pos;        /* device [batch]: the forward pass's input ids and positions */
    int32_t *next_pos;         /* device [batch]: position id of each row's next token */
    int32_t *cache_pos;        /* device [batch, capacity]: the cache's positions ... */
    uint8_t *cache_mask;       /* ... and key mask */
    uint8_t *finished;         /* device [batch]: 1 once a row produced an EOS */
    int32_t *out;              /* device [ring, batch]: the token made at step s, row s % ring */
    const int32_t *eos;        /* device [num_eos] */
    int num_eos;
    int32_t pad_id;            /* written for finished rows */
} xo_decode_state;

/* The table's entries by concern: memory, weight storage, the kernels of a forward pass, the
 * bookkeeping of a decode step, and graph capture. */
typedef struct {
    /* zero-filled; NULL on failure, with an XO_ENOMEM message naming the size recorded (xo_fail) */
    void *(*alloc)(xo_backend *be, size_t bytes);
    void (*release)(xo_backend *be, void *ptr);
    /* frees memory that another framework's streams may still read (waits for the device) */
    void (*release_shared)(xo_backend *be, void *ptr);
    xo_status (*upload)(xo_backend *be, void *dst, const void *host, size_t bytes);
    xo_status (*download)(xo_backend *be, void *host, const void *src, size_t bytes);
    xo_status (*copy)(xo_backend *be, void *dst, const void *src, size_t bytes);
    xo_status (*synchronize)(xo_backend *be);
    /* optional (NULL: not tracked): bytes the backend's allocator hands out now, and at most since
     * the last reset (reset_peak: the peak restarts from now); the queued work is finished first */
    xo_status (*usage)(xo_backend *be, size_t *in_use, size_t *peak, int reset_peak);
} xo_memory_ops;

typedef struct {
    /* weights: rows [row_offset, row_offset+rows) of w (out, in, dtype set by the caller; storage
     * allocated on first use) from host data [rows, in] of dtype src_t */
    xo_status (*linear_init)(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows);
    void (*linear_free)(xo_backend *be, xo_linear *w);
    xo_status (*linear_to_host)(xo_backend *be, const xo_linear *w, float *host); /* dequantised */
} xo_weight_ops;

typedef struct {
    /* y[m, w.out] = x[m, w.in] @ W.T */
    xo_status (*matmul)(xo_backend *be, float *y, const float *x, const xo_linear *w, int m);
    /* y[n, d] = w * x / sqrt(mean(x^2) + eps); x rows are x_stride apart */
    xo_status (*rmsnorm)(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps);
    /* h[n, d] += x[n, d], then y[n, d] = rmsnorm(h) as above (the residual add and the next norm) */
    xo_status (*add_rmsnorm)(xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d, float eps);
    /* rows of x (row_stride floats apart) rotated in place, heads*hd each; row i uses pos[i] */
    xo_status (*rope)(xo_backend *be, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                      const float *inv_freq, float mscale);
    /* optional (NULL: two matmuls, then rope): y1[m, w1.out] = x @ w1.T and y2[m, w2.out] = x @ w2.T
     * (w1.in == w2.in); with rot, y1's rows are then rotated as rope(y1, w1.out, rot->pos, m, rot->heads,
     * rot->head_dim, ...) rotates them (rot->heads * rot->head_dim == w1.out) */
    xo_status (*matmul_pair)(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                             const float *x, int m, const xo_rotary *rot);
    /* optional (NULL: the norm as add_rmsnorm or rmsnorm computes it, then matmul / matmul_pair / ffn):
     * the product over the normed rows of nm (xo_rmsnorm_in above), with nm->d == the weights' in */
    xo_status (*rmsnorm_matmul)(xo_backend *be, float *y, const xo_rmsnorm_in *nm, const xo_linear *w, int m);
    xo_status (*rmsnorm_matmul_pair)(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                                     const xo_rmsnorm_in *nm, int m, const xo_rotary *rot);
    xo_status (*rmsnorm_ffn)(xo_backend *be, float *out, const xo_rmsnorm_in *nm, const xo_ffn *f, int n, float *gu,
                             float *act);
    /* optional (NULL: ids come from the host): dst[i] = src[i] for n token ids in the backend's
     * memory (int64 when wide, else int32); an id outside [0, vocab) becomes 0 and the first such
     * is reported in bad[0] (its flat index; UINT64_MAX when none) and bad[1] (its value) */
    xo_status (*load_ids)(xo_backend *be, int32_t *dst, const void *src, int wide, size_t n, int vocab, uint64_t *bad);
    /* h[n, H] = rows ids[i] of the embedding table */
    xo_status (*embed)(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n);
    /* y[n, d] += x[n, d] */
    xo_status (*add)(xo_backend *be, float *y, const float *x, size_t n);
    /* y[n, I] = silu(gu[:, :I]) * gu[:, I:] */
    xo_status (*swiglu)(xo_backend *be, float *y, const float *gu, int n, int inter);
    /* optional (NULL: matmul then swiglu): act[n, I] = swiglu(x @ gate_up.T), gate_up [2I, in]
     * with the gate rows first; gu [n, 2I] is scratch the backend may use */
    xo_status (*gate_up_swiglu)(xo_backend *be, float *act, const float *x, float *gu, const xo_linear *gate_up, int n);
    /* optional (NULL: gate_up_swiglu, then matmul): the SwiGLU FFN, out[n, f->down.out] =
     * swiglu(x @ f->gate_up.T) @ f->down.T; gu [n, 2I] and act [n, I] are scratch the backend may use
     * (left unwritten by a backend that keeps the activations in its own, narrower storage) */
    xo_status (*ffn)(xo_backend *be, float *out, const float *x, const xo_ffn *f, int n, float *gu, float *act);
    /* router: softmax over logits[n, E], top-k (ties: lower index), renormalised by sum + XO_TOPK_RENORM_EPS */
    xo_status (*moe_route)(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k);
    /* optional (NULL: rmsnorm, matmul, moe_route): the router of SPEC 6 in one call: top-k of
     * softmax(rmsnorm(x; norm_w, XO_ROUTER_NORM_EPS) @ router.T) as moe_route gives them;
     * normed [n, router.in] and logits [n, router.out] are scratch the backend may use */
    xo_status (*moe_router)(xo_backend *be, int32_t *idx, float *weight, const float *x, const float *norm_w,
                            const xo_linear *router, int n, int k, float *normed, float *logits);
    /* routed experts, each run once on the tokens routed to it */
    xo_status (*moe_experts)(xo_backend *be, const xo_moe_args *a);
    /* causal attention over the cache, chunked with an online softmax */
    xo_status (*attention)(xo_backend *be, const xo_attention_args *a);
    /* optional (NULL: attention, then matmul): the heads through the output projection, y[n, o->out] =
     * attention(a) @ o->T with n = a->batch * a->new_tokens (o->in == num_heads * head_dim); a->out is
     * scratch the backend may use (left unwritten as ffn's) */
    xo_status (*attention_o_proj)(xo_backend *be, float *y, const xo_attention_args *a, const xo_linear *o);
    /* cache slots [r, start .. start+n) of a [batch, capacity, width] array of dtype cache_t
     * (F32, BF16 or F16), for every row r, <- float src rows r*n .. r*n+n-1 (src_stride apart);
     * start is read from start_device when that is not NULL */
    xo_status (*cache_write)(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int width, int start,
                             const int32_t *start_device, const float *src, int batch, int n, int src_stride);
    /* optional (NULL: rmsnorm, then cache_write): the rows of x [batch*n, d] normed as
     * rmsnorm(normed, x, d, w, batch*n, d, eps) norms them, stored as cache_write(cache, cache_t, capacity,
     * d, start, start_device, normed, batch, n, d) stores them; normed [batch*n, d] (may be x) is
     * scratch the backend may use */
    xo_status (*rmsnorm_cache_write)(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int start,
                                     const int32_t *start_device, float *normed, const float *x, const float *w,
                                     int batch, int n, int d, float eps);
    /* optional (NULL: rope, then two cache_writes): kv [batch*n, 2*W] holds rows [K | V], W =
     * rot->heads * rot->head_dim; K rotated as rope(kv, 2*W, rot->pos, batch*n, ...) rotates it, then
     * stored as cache_write(k_cache, cache_t, capacity, W, start, start_device, kv, batch, n, 2*W) and V
     * as the same into v_cache from kv + W; kv is scratch the backend may leave rotated or not */
    xo_status (*rope_kv_cache_write)(xo_backend *be, void *k_cache, void *v_cache, xo_dtype cache_t, int capacity,
                                     int start, const int32_t *start_device, float *kv, int batch, int n,
                                     const xo_rotary *rot);
    /* out[r] = argmax of logits row r, lower index on ties */
    xo_status (*argmax_rows)(xo_backend *be, int32_t *out, const float *logits, int rows, int cols);
    /* optional (NULL: sampling runs on the host): out[r] = a token drawn from row r after
     * temperature, top-k (0: none), nucleus (SPEC 7) and min-p filtering (as xo_sample_row), from
     * a counter-based generator keyed by (seed, step, r); step is read from step_device when that
     * is not NULL */
    xo_status (*sample_rows)(xo_backend *be, int32_t *out, const float *logits, int rows, int cols,
                             float temperature, int top_k, float top_p, float min_p, uint64_t seed, uint64_t step,
                             const int32_t *step_device);
} xo_kernel_ops;

typedef struct {
    /* decode sessions (engine/decode_session.c): the bookkeeping of one step on the backend, so that a
     * step needs nothing from the host and can be replayed */
    xo_status (*decode_begin)(xo_backend *be, const xo_decode_state *st);
    xo_status (*decode_end)(xo_backend *be, const xo_decode_state *st);
    /* logits[r, ids[i]] = -inf for every row while the step counter is below `below` */
    xo_status (*suppress_tokens)(xo_backend *be, float *logits, int rows, int cols, const int32_t *ids, int n,
                                 const int32_t *step_device, int below);
} xo_decode_ops;

typedef struct {
    /* optional (NULL: steps run eagerly): record the work queued between capture_begin and
     * capture_end as a graph, replayed by graph_launch */
    xo_status (*capture_begin)(xo_backend *be);
    xo_status (*capture_end)(xo_backend *be, void **graph);
    xo_status (*graph_launch)(xo_backend *be, void *graph);
    void (*graph_free)(xo_backend *be, void *graph);
} xo_graph_ops;

/* the CUDA backend's routed-expert paths, as moe_path_counts names them */
enum { XO_MOE_PATH_INDEXED, XO_MOE_PATH_DECODE_BATCH, XO_MOE_PATH_SKINNY, XO_MOE_PATH_GROUPED,
       XO_MOE_PATH_GROUPED_WGMMA, XO_MOE_PATH_HOST, XO_MOE_PATHS };

struct xo_backend {
    const char *name;
    void *ctx;
    int host_memory;   /* 1: "device" pointers are host memory (the graph may write into caller arrays) */
    int max_experts;   /* the most MoE experts the backend's kernels take; 0: no limit of its own */
    int prefill_chunk; /* tokens per pass of a long input under prefill_chunk=auto (benchmarks/RESULTS.md) */
    int device_index;  /* for DLPack: the device the memory lives on */
    void *native_stream; /* CUDA: the cudaStream_t the kernels run on (handed to a DLPack producer, which
                          * orders its pending work before ours); else NULL */

    xo_memory_ops mem;
    xo_weight_ops weights;
    xo_kernel_ops ops;
    xo_decode_ops decode;
    xo_graph_ops graphs;

    /* optional: around each call into the model from one host thread (its lock held); the CPU
     * applies its thread count there */
    void (*enter)(xo_backend *be);
    void (*leave)(xo_backend *be);

    /* optional (NULL: not counted): decode-attention calls over the latent cache since the backend
     * was made, by the kernel they took: counts[0] K and V expanded into scratch first, counts[1]
     * the in-kernel expansion (a recorded step counts once, when recorded); for tests */
    void (*decode_attention_counts)(xo_backend *be, long long counts[2]);
    /* optional (NULL: not counted): routed-expert calls since the backend was made, by the path
     * they took (XO_MOE_PATH_*; a recorded step counts once, when recorded); for tests */
    void (*moe_path_counts)(xo_backend *be, long long counts[XO_MOE_PATHS]);
    /* optional (NULL: not counted): tensor-core prefill attention launches (one per key block) since the
     * backend was made: counts[0] the mma.sync kernel, counts[1] the wgmma one (Hopper); for tests */
    void (*prefill_attention_counts)(xo_backend *be, long long counts[2]);

    void (*destroy)(xo_backend *be);
};

/* Fills each optional slot left NULL with its default composed from the required ones
 * (matmul_pair, gate_up_swiglu, ffn, moe_router, attention_o_proj, rmsnorm_cache_write,
 * rope_kv_cache_write, rmsnorm_matmul, rmsnorm_matmul_pair, rmsnorm_ffn), so the graph makes one
 * call per step. */
void xo_backend_fill_defaults(xo_backend *be);

/* The CPU backend (oneDNN + OpenMP), with the model's options (engine/options.h). */
xo_status xo_cpu_backend_create(xo_backend **out, const xo_options *opts);
/* The CUDA backend, loaded from the plugin library (set by the binding) on first use. */
xo_status xo_cuda_backend_create(xo_backend **out, int device, const xo_options *opts);
void xo_cuda_set_plugin_path(const char *path);
/* CUDA devices this build can use: 0 when it has no plugin, or no GPU or driver. Never fails. */
int xo_cuda_device_count(void);
/* The id a plugin must report to be loaded: this build's, ending in "-cpu", "-cuda" or
 * "-cuda-cublaslt". */
const char *xo_cuda_build_id(void);
/* 1 when this build has a CUDA plugin (whether a GPU is there or not: xo_cuda_device_count). */
int xo_cuda_built(void);

#endif
