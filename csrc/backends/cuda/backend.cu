/* The CUDA backend: the plugin's entry point, memory, weights and the kernel table. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/common.h"

/* The message is formatted here and handed to the engine's sink whole (a va_list cannot
 * cross the plugin boundary through a variadic pointer). */
xo_status cu_fail(CuCtx *c, xo_status code, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return c->sink.fail(code, "%s", msg);
}

xo_status cu_fail_more(CuCtx *c, xo_status code, const char *fmt, ...) {
    char msg[768], reason[512];
    snprintf(reason, sizeof reason, "%s", c->sink.last_error());
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return reason[0] ? c->sink.fail(code, "%s: %s", msg, reason) : c->sink.fail(code, "%s", msg);
}

xo_status cu_check(CuCtx *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return XO_OK;
    cudaGetLastError(); /* clear a non-sticky error */
    if (e == cudaErrorMemoryAllocation)
        return cu_fail(c, XO_ENOMEM, "%s: out of GPU memory on cuda:%d", what, c->device);
    return cu_fail(c, XO_EDEVICE, "%s: %s", what, cudaGetErrorString(e));
}

xo_status cu_check_launch(CuCtx *c, const char *what) { return cu_check(c, cudaGetLastError(), what); }

/* The bytes the device's pool hands out now (every model on the device draws from it). */
static size_t pool_used(CuCtx *c) {
    unsigned long long used = 0;
    if (cudaMemPoolGetAttribute(c->pool, cudaMemPoolAttrUsedMemCurrent, &used) != cudaSuccess) cudaGetLastError();
    return (size_t)used;
}

void *cu_alloc_raw(CuCtx *c, size_t bytes) {
    if (bytes == 0) bytes = 16;
    bytes = (bytes + 255) & ~(size_t)255;
    if (c->memory_limit && pool_used(c) + bytes > c->memory_limit) {
        cu_fail(c, XO_ENOMEM, "out of GPU memory: %zu bytes requested on cuda:%d would exceed cuda_memory_limit (%zu bytes)",
                bytes, c->device, c->memory_limit);
        return NULL;
    }
    void *p = NULL;
    cudaError_t e = cudaMallocAsync(&p, bytes, c->stream);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cu_fail(c, XO_ENOMEM, "out of GPU memory: %zu bytes requested on cuda:%d (%s)", bytes, c->device,
                cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

void *cu_alloc(CuCtx *c, size_t bytes) {
    void *p = cu_alloc_raw(c, bytes);
    if (!p) return NULL;
    cudaError_t e = cudaMemsetAsync(p, 0, bytes ? bytes : 16, c->stream);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cudaFreeAsync(p, c->stream);
        cu_fail(c, XO_EDEVICE, "zero-filling %zu bytes of GPU memory: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

void cu_free(CuCtx *c, void *p) {
    if (p) cudaFreeAsync(p, c->stream);
}

/* grows one of the context's scratch buffers (the old one freed in stream order, after its readers) */
static xo_status scratch_reserve(CuCtx *c, void **buf, size_t *have, size_t bytes, const char *what) {
    if (bytes <= *have) return XO_OK;
    size_t want = bytes + bytes / 4;
    void *p = cu_alloc_raw(c, want);
    if (!p) return cu_fail_more(c, XO_ENOMEM, "%s", what);
    cu_free(c, *buf);
    *buf = p;
    *have = want;
    return XO_OK;
}

xo_status cu_act16_reserve(CuCtx *c, size_t bytes) {
    return scratch_reserve(c, &c->act16, &c->act16_bytes, bytes, "GEMM scratch");
}

xo_status cu_attn16_reserve(CuCtx *c, size_t bytes) {
    return scratch_reserve(c, &c->attn16, &c->attn16_bytes, bytes, "attention output scratch");
}

#define SETDEV(c) cudaSetDevice((c)->device)

static void be_decode_attention_counts(xo_backend *be, long long counts[2]) {
    const CuCtx *c = cu_ctx(be);
    counts[0] = c->decode_counts[0];
    counts[1] = c->decode_counts[1];
}

static void be_moe_path_counts(xo_backend *be, long long counts[XO_MOE_PATHS]) {
    const CuCtx *c = cu_ctx(be);
    for (int i = 0; i < XO_MOE_PATHS; i++) counts[i] = c->moe_counts[i];
}

static void be_prefill_attention_counts(xo_backend *be, long long counts[2]) {
    const CuCtx *c = cu_ctx(be);
    counts[0] = c->prefill_counts[0];
    counts[1] = c->prefill_counts[1];
}

/* The device's pool (shared by every model on the device): in use now, and its high-water mark. */
static xo_status be_usage(xo_backend *be, size_t *in_use, size_t *peak, int reset_peak) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    XO_TRY(cu_check(c, cudaStreamSynchronize(c->stream), "memory usage"));
    unsigned long long now = 0, high = 0, zero = 0;
    if (reset_peak) XO_TRY(cu_check(c, cudaMemPoolSetAttribute(c->pool, cudaMemPoolAttrUsedMemHigh, &zero), "memory usage"));
    XO_TRY(cu_check(c, cudaMemPoolGetAttribute(c->pool, cudaMemPoolAttrUsedMemCurrent, &now), "memory usage"));
    XO_TRY(cu_check(c, cudaMemPoolGetAttribute(c->pool, cudaMemPoolAttrUsedMemHigh, &high), "memory usage"));
    *in_use = (size_t)now;
    *peak = (size_t)high;
    return XO_OK;
}

static void *be_alloc(xo_backend *be, size_t bytes) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    return cu_alloc(c, bytes);
}

static void be_release(xo_backend *be, void *p) {
    CuCtx *c = cu_ctx(be);
    if (!p) return;
    SETDEV(c);
    cu_free(c, p);
}

static void be_release_shared(xo_backend *be, void *p) {
    CuCtx *c = cu_ctx(be);
    if (!p) return;
    SETDEV(c);
    cudaDeviceSynchronize(); /* torch may have queued work on its own streams that reads p */
    cu_free(c, p);
}

static xo_status be_upload(xo_backend *be, void *dst, const void *host, size_t bytes) {
    CuCtx *c = cu_ctx(be);
    if (!bytes) return XO_OK;
    SETDEV(c);
    /* Pageable host memory is staged before this returns, so the caller may reuse it. */
    CU_TRY(c, cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, c->stream), "upload");
    return XO_OK;
}

xo_status cu_take_fault(CuCtx *c) {
    volatile CuFault *f = c->fault;
    const int kind = f->kind;
    if (kind == CU_FAULT_NONE) return XO_OK;
    const int a = f->a, b = f->b;
    f->a = f->b = 0;
    f->kind = CU_FAULT_NONE; /* cleared: the next call starts clean, the model stays usable */
    if (kind == CU_FAULT_NAN_LOGIT) return cu_fail(c, XO_EINVAL, "logits contain NaN at row %d (token %d)", a, b);
    return cu_fail(c, XO_EINVAL, "router picked expert %d of %d", a, b);
}

static xo_status be_download(xo_backend *be, void *host, const void *src, size_t bytes) {
    CuCtx *c = cu_ctx(be);
    if (!bytes) return XO_OK;
    SETDEV(c);
    CU_TRY(c, cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download");
    CU_TRY(c, cudaStreamSynchronize(c->stream), "download (synchronize)");
    return cu_take_fault(c);
}

static xo_status be_copy(xo_backend *be, void *dst, const void *src, size_t bytes) {
    CuCtx *c = cu_ctx(be);
    if (!bytes) return XO_OK;
    SETDEV(c);
    CU_TRY(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), "copy");
    return XO_OK;
}

static xo_status be_sync(xo_backend *be) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    CU_TRY(c, cudaStreamSynchronize(c->stream), "synchronize");
    XO_TRY(cu_check_launch(c, "synchronize"));
    return cu_take_fault(c);
}

/* ---- weights ---- */

static xo_status be_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    if (w->dtype != XO_F32 && w->dtype != XO_BF16 && w->dtype != XO_F16)
        return cu_fail(c, XO_EUNSUPPORTED, "CUDA weight storage %s is not supported (use float32, bfloat16 or float16)",
                       w->dtype == XO_I8 ? "int8" : w->dtype == XO_I4 ? "int4" : "of this dtype");
    if (src_t != XO_F32 && src_t != XO_BF16 && src_t != XO_F16)
        return cu_fail(c, XO_EUNSUPPORTED, "CUDA: cannot load weights of dtype %d", (int)src_t);
    if (row_offset < 0 || rows < 0 || row_offset + rows > w->out)
        return cu_fail(c, XO_EINVAL, "linear_init: rows [%d, %d) outside a %d-row matrix", row_offset, row_offset + rows, w->out);
    const size_t es = cu_dtype_size(w->dtype), row_elems = (size_t)w->in;
    /* rows rounded up to 8 (zeros): cuBLASLt then runs the product on aligned row counts */
    if (!w->data && !(w->data = cu_alloc(c, (size_t)cu_padded_rows(w->out) * row_elems * es)))
        return cu_fail_more(c, XO_ENOMEM, "a [%d, %d] weight", w->out, w->in);
    const size_t n = (size_t)rows * row_elems;
    if (!n) return XO_OK;
    char *dst = (char *)w->data + (size_t)row_offset * row_elems * es;
    if (src_t == w->dtype) {
        CU_TRY(c, cudaMemcpyAsync(dst, host, n * es, cudaMemcpyHostToDevice, c->stream), "weight upload");
        return XO_OK;
    }
    /* Upload the source bytes, convert on the device (round to nearest even). Weights
     * are loaded in pieces of at most 64M elements to bound the staging buffer. */
    const size_t ss = cu_dtype_size(src_t), piece = (size_t)64 << 20;
    void *tmp = cu_alloc(c, (n < piece ? n : piece) * ss);
    if (!tmp) return cu_fail_more(c, XO_ENOMEM, "staging a weight");
    xo_status rc = XO_OK;
    for (size_t off = 0; off < n && rc == XO_OK; off += piece) {
        size_t cnt = n - off < piece ? n - off : piece;
        cudaError_t e = cudaMemcpyAsync(tmp, (const char *)host + off * ss, cnt * ss, cudaMemcpyHostToDevice, c->stream);
        if (e != cudaSuccess) { rc = cu_check(c, e, "weight upload"); break; }
        rc = cu_convert(c, dst + off * es, w->dtype, tmp, src_t, cnt);
    }
    cu_free(c, tmp);
    return rc;
}

static void be_linear_free(xo_backend *be, xo_linear *w) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    cu_free(c, w->data);
    cu_free(c, w->scales);
    w->data = NULL;
    w->scales = NULL;
}

static xo_status be_linear_to_host(xo_backend *be, const xo_linear *w, float *host) {
    CuCtx *c = cu_ctx(be);
    SETDEV(c);
    const size_t n = (size_t)w->out * w->in;
    if (!n) return XO_OK;
    if (w->dtype == XO_F32) return be_download(be, host, w->data, n * sizeof(float));
    float *tmp = (float *)cu_alloc(c, n * sizeof(float));
    if (!tmp) return cu_fail_more(c, XO_ENOMEM, "reading a weight back");
    xo_status rc = cu_convert(c, tmp, XO_F32, w->data, w->dtype, n);
    if (rc == XO_OK) rc = be_download(be, host, tmp, n * sizeof(float));
    cu_free(c, tmp);
    return rc;
}

static void be_destroy(xo_backend *be) {
    if (!be) return;
    CuCtx *c = cu_ctx(be);
    if (c) {
        SETDEV(c);
        cudaStreamSynchronize(c->stream);
        cu_free(c, c->act16);
        cu_free(c, c->attn16);
        if (c->lt) cu_lt_destroy(c->lt);
        cudaStreamSynchronize(c->stream);
        cudaStreamDestroy(c->stream);
        cudaMemPoolTrimTo(c->pool, 0);
        if (c->fault) cudaFreeHost(c->fault);
        cudaGetLastError();
        free(c);
    }
    free(be);
}

/* Wrappers that select the device (the table may be called from any host thread). */
#define WRAP(name, sig, args)                \
    static xo_status w_##name sig {          \
        SETDEV(cu_ctx(be));                  \
        return cu_##name args;               \
    }
WRAP(matmul, (xo_backend *be, float *y, const float *x, const xo_linear *w, int m), (be, y, x, w, m))
WRAP(rmsnorm, (xo_backend *be, float *y, const float *x, int xs, const float *w, int n, int d, float eps), (be, y, x, xs, w, n, d, eps))
WRAP(add_rmsnorm, (xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d, float eps),
     (be, h, x, y, w, n, d, eps))
WRAP(rope, (xo_backend *be, float *x, size_t rs, const int32_t *pos, int n, int heads, int hd, const float *f, float ms),
     (be, x, rs, pos, n, heads, hd, f, ms))
WRAP(matmul_pair, (xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2, const float *x, int m,
                   const xo_rotary *rot),
     (be, y1, w1, y2, w2, x, m, rot))
WRAP(rmsnorm_matmul, (xo_backend *be, float *y, const xo_rmsnorm_in *nm, const xo_linear *w, int m), (be, y, nm, w, m))
WRAP(rmsnorm_matmul_pair, (xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                           const xo_rmsnorm_in *nm, int m, const xo_rotary *rot),
     (be, y1, w1, y2, w2, nm, m, rot))
WRAP(rmsnorm_ffn, (xo_backend *be, float *out, const xo_rmsnorm_in *nm, const xo_ffn *f, int n, float *gu, float *act),
     (be, out, nm, f, n, gu, act))
WRAP(rmsnorm_cache_write, (xo_backend *be, void *cache, xo_dtype ct, int cap, int start, const int32_t *sd, float *normed,
                           const float *x, const float *w, int b, int n, int d, float eps),
     (be, cache, ct, cap, start, sd, normed, x, w, b, n, d, eps))
WRAP(rope_kv_cache_write, (xo_backend *be, void *kc, void *vc, xo_dtype ct, int cap, int start, const int32_t *sd, float *kv,
                           int b, int n, const xo_rotary *rot),
     (be, kc, vc, ct, cap, start, sd, kv, b, n, rot))
WRAP(load_ids, (xo_backend *be, int32_t *dst, const void *src, int wide, size_t n, int vocab, uint64_t *bad),
     (be, dst, src, wide, n, vocab, bad))
WRAP(embed, (xo_backend *be, float *h, const xo_linear *t, const int32_t *ids, int n), (be, h, t, ids, n))
WRAP(add, (xo_backend *be, float *y, const float *x, size_t n), (be, y, x, n))
WRAP(gate_up_swiglu, (xo_backend *be, float *act, const float *x, float *gu, const xo_linear *w, int m), (be, act, x, gu, w, m))
WRAP(swiglu, (xo_backend *be, float *y, const float *gu, int n, int inter), (be, y, gu, n, inter))
WRAP(ffn, (xo_backend *be, float *out, const float *x, const xo_ffn *f, int n, float *gu, float *act),
     (be, out, x, f, n, gu, act))
WRAP(moe_route, (xo_backend *be, int32_t *idx, float *wt, const float *lg, int n, int e, int k), (be, idx, wt, lg, n, e, k))
/* the fused router kernel needs none of the graph's scratch */
static xo_status w_moe_router(xo_backend *be, int32_t *idx, float *wt, const float *x, const float *nw, const xo_linear *r,
                              int n, int k, float *normed, float *logits) {
    (void)normed;
    (void)logits;
    SETDEV(cu_ctx(be));
    return cu_moe_router(be, idx, wt, x, nw, r, n, k);
}
WRAP(moe_experts, (xo_backend *be, const xo_moe_args *a), (be, a))
WRAP(attention, (xo_backend *be, const xo_attention_args *a), (be, a))
WRAP(attention_o_proj, (xo_backend *be, float *y, const xo_attention_args *a, const xo_linear *o), (be, y, a, o))
WRAP(cache_write, (xo_backend *be, void *cache, xo_dtype ct, int cap, int width, int start, const int32_t *sd, const float *src,
                   int b, int n, int ss),
     (be, cache, ct, cap, width, start, sd, src, b, n, ss))
WRAP(argmax_rows, (xo_backend *be, int32_t *out, const float *logits, int rows, int cols), (be, out, logits, rows, cols))
WRAP(sample_rows, (xo_backend *be, int32_t *out, const float *logits, int rows, int cols, float temp, int top_k, float top_p,
                   float min_p, uint64_t seed, uint64_t step, const int32_t *sd),
     (be, out, logits, rows, cols, temp, top_k, top_p, min_p, seed, step, sd))
WRAP(decode_begin, (xo_backend *be, const xo_decode_state *st), (be, st))
WRAP(decode_end, (xo_backend *be, const xo_decode_state *st), (be, st))
WRAP(suppress_tokens, (xo_backend *be, float *lg, int rows, int cols, const int32_t *ids, int n, const int32_t *sd, int below),
     (be, lg, rows, cols, ids, n, sd, below))
WRAP(capture_begin, (xo_backend *be), (be))
WRAP(capture_end, (xo_backend *be, void **graph), (be, graph))
WRAP(graph_launch, (xo_backend *be, void *graph), (be, graph))
static void w_graph_free(xo_backend *be, void *graph) {
    SETDEV(cu_ctx(be));
    cu_graph_free(be, graph);
}

/* The plugin's one entry point; every failure, here and later, goes through `sink`. */
extern "C" __attribute__((visibility("default"))) xo_status xo_cuda_plugin_create(xo_backend **out, int device,
                                                                                   const xo_options *opts,
                                                                                   const xo_error_sink *sink) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        return sink->fail(XO_EUNSUPPORTED, "device 'cuda:%d' is not available: %s", device,
                          e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device is visible");
    }
    if (device < 0 || device >= count) {
        return sink->fail(XO_EINVAL, "device 'cuda:%d' does not exist: %d CUDA device%s visible (cuda:0%s)", device,
                          count, count == 1 ? " is" : "s are", count > 1 ? " .. cuda:N-1" : "");
    }
    CuCtx *c = (CuCtx *)calloc(1, sizeof *c);
    xo_backend *be = (xo_backend *)calloc(1, sizeof *be);
    if (!c || !be) {
        free(c);
        free(be);
        return sink->fail(XO_ENOMEM, "out of host memory creating the CUDA backend");
    }
    c->device = device;
    c->sink = *sink;
    c->moe_host = opts->cuda_moe_host;
    c->attn_rows = opts->cuda_attention == 1;
    c->attn_mma = opts->cuda_attention == 3;
    c->attn_keys = opts->cuda_attention_keys;
    /* rows: decode steps too expand K and V into scratch for the row-wise kernel */
    c->attn_decode = opts->cuda_attention == 2 ? CU_DECODE_LATENT : c->attn_rows ? CU_DECODE_EXPAND : CU_DECODE_AUTO;
    c->memory_limit = opts->cuda_memory_limit;
    int major = 0;
    if ((e = cudaSetDevice(device)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&c->num_sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaDeviceGetDefaultMemPool(&c->pool, device)) != cudaSuccess ||
        (e = cudaHostAlloc((void **)&c->fault, sizeof(CuFault), cudaHostAllocMapped)) != cudaSuccess ||
        (e = cudaHostGetDevicePointer((void **)&c->fault_dev, c->fault, 0)) != cudaSuccess) {
        cudaGetLastError();
        if (c->stream) cudaStreamDestroy(c->stream);
        if (c->fault) cudaFreeHost(c->fault);
        free(c);
        free(be);
        return sink->fail(XO_EDEVICE, "device 'cuda:%d': %s", device, cudaGetErrorString(e));
    }
    *c->fault = CuFault{};
    if (major < 8) {
        cudaStreamDestroy(c->stream);
        cudaFreeHost(c->fault);
        free(c);
        free(be);
        return sink->fail(XO_EUNSUPPORTED, "device 'cuda:%d' has compute capability %d.x; xoron needs 8.0 or newer",
                          device, major);
    }
    c->pdl = major >= 9 && opts->cuda_pdl;
    /* Keep freed blocks in the pool: the graph allocates its scratch on every call. */
    uint64_t keep = UINT64_MAX;
    cudaMemPoolSetAttribute(c->pool, cudaMemPoolAttrReleaseThreshold, &keep);
    if (!opts->cuda_gemm_builtin) c->lt = cu_lt_create(c, opts->cublaslt_library);
    if (!c->lt && !opts->cuda_gemm_builtin && opts->cublaslt_library[0]) {
        cudaStreamDestroy(c->stream);
        cudaFreeHost(c->fault);
        free(c);
        free(be);
        return sink->fail(XO_EUNSUPPORTED, "option cublaslt_library: cannot load cuBLASLt from '%s'",
                          opts->cublaslt_library);
    }

    be->name = "cuda";
    be->max_experts = CU_MAX_GROUPS; /* the MoE kernels hold per-expert state in arrays this long */
    be->prefill_chunk = 16384;       /* fewer passes re-expand the latent's keys less often (RESULTS.md,
                                      * "H200, 2026-12-02 (session 2)") */
    be->ctx = c;
    be->mem.alloc = be_alloc;
    be->mem.release = be_release;
    be->mem.release_shared = be_release_shared;
    be->device_index = device;
    be->mem.upload = be_upload;
    be->mem.download = be_download;
    be->mem.copy = be_copy;
    be->mem.synchronize = be_sync;
    be->mem.usage = be_usage;
    be->weights.linear_init = be_linear_init;
    be->weights.linear_free = be_linear_free;
    be->weights.linear_to_host = be_linear_to_host;
    be->ops.matmul = w_matmul;
    be->ops.rmsnorm = w_rmsnorm;
    be->ops.add_rmsnorm = w_add_rmsnorm;
    be->ops.rope = w_rope;
    be->ops.matmul_pair = w_matmul_pair;
    be->ops.rmsnorm_matmul = w_rmsnorm_matmul;
    be->ops.rmsnorm_matmul_pair = w_rmsnorm_matmul_pair;
    be->ops.rmsnorm_ffn = w_rmsnorm_ffn;
    be->ops.rmsnorm_cache_write = w_rmsnorm_cache_write;
    be->ops.rope_kv_cache_write = w_rope_kv_cache_write;
    be->ops.embed = w_embed;
    be->ops.load_ids = w_load_ids;
    be->native_stream = c->stream;
    be->ops.add = w_add;
    be->ops.swiglu = w_swiglu;
    be->ops.gate_up_swiglu = w_gate_up_swiglu;
    be->ops.ffn = w_ffn;
    be->ops.moe_route = w_moe_route;
    be->ops.moe_experts = w_moe_experts;
    be->ops.moe_router = w_moe_router;
    be->ops.attention = w_attention;
    be->ops.attention_o_proj = w_attention_o_proj;
    be->ops.cache_write = w_cache_write;
    be->ops.argmax_rows = w_argmax_rows;
    be->ops.sample_rows = w_sample_rows;
    be->decode.decode_begin = w_decode_begin;
    be->decode.decode_end = w_decode_end;
    be->decode.suppress_tokens = w_suppress_tokens;
    if (opts->cuda_graphs) {
        be->graphs.capture_begin = w_capture_begin;
        be->graphs.capture_end = w_capture_end;
        be->graphs.graph_launch = w_graph_launch;
        be->graphs.graph_free = w_graph_free;
    }
    be->decode_attention_counts = be_decode_attention_counts;
    be->moe_path_counts = be_moe_path_counts;
    be->prefill_attention_counts = be_prefill_attention_counts;
    be->destroy = be_destroy;
    *out = be;
    return XO_OK;
}
