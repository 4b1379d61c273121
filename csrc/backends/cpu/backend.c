/* The CPU backend: host memory, oneDNN matrix products, OpenMP-threaded kernels. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

static void *cpu_alloc(xo_backend *be, size_t bytes) {
    (void)be;
    /* 64-byte alignment keeps vector loads on cache-line boundaries. */
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (!p) {
        xo_fail(XO_ENOMEM, "cannot allocate %zu bytes of host memory", bytes);
        return NULL;
    }
    memset(p, 0, rounded ? rounded : 64);
    return p;
}

static void cpu_release(xo_backend *be, void *p) {
    (void)be;
    free(p);
}

static xo_status cpu_copy(xo_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memmove(dst, src, bytes);
    return XO_OK;
}

static xo_status cpu_sync(xo_backend *be) {
    (void)be;
    return XO_OK;
}

/* The thread count is an OpenMP setting of the calling thread: set for the call (the model's
 * option, else the process default of backends/cpu/threads.c), then restored. */
static void cpu_enter(xo_backend *be) {
    xo_cpu_ctx *cx = be->ctx;
    cx->saved_threads = omp_get_max_threads();
    xo_cpu_guard_signals(cx);  /* before any oneDNN call: a signal there can corrupt the heap */
    const int n = xo_cpu_team(cx);
    if (n != cx->saved_threads) omp_set_num_threads(n);
}

static void cpu_leave(xo_backend *be) {
    const xo_cpu_ctx *cx = be->ctx;
    if (omp_get_max_threads() != cx->saved_threads) omp_set_num_threads(cx->saved_threads);
}

static void cpu_destroy(xo_backend *be) {
    free(be->ctx);
    free(be);
}

xo_status xo_cpu_backend_create(xo_backend **out, const xo_options *opts) {
    xo_backend *be = calloc(1, sizeof *be);
    xo_cpu_ctx *cx = calloc(1, sizeof *cx);
    if (!be || !cx) {
        free(be);
        free(cx);
        return xo_fail(XO_ENOMEM, "out of host memory creating the CPU backend");
    }
    const int best = xo_cpu_best_isa();
    cx->isa = opts->cpu_isa == XO_ISA_AUTO || opts->cpu_isa > best ? best : opts->cpu_isa;
    cx->gemv_max_rows = opts->cpu_gemv_max_rows;
    cx->tile_rows = opts->cpu_tile_rows;
    cx->threads = opts->threads;
    be->ctx = cx;
    be->name = "cpu";
    be->host_memory = 1;
    be->prefill_chunk = 4096; /* RESULTS.md, "Chunked prefill" */
    be->mem.alloc = cpu_alloc;
    be->mem.release = cpu_release;
    be->mem.release_shared = cpu_release;
    be->mem.upload = cpu_copy;
    be->mem.download = cpu_copy;
    be->mem.copy = cpu_copy;
    be->mem.synchronize = cpu_sync;
    be->weights.linear_init = xo_cpu_linear_init;
    be->weights.linear_free = xo_cpu_linear_free;
    be->weights.linear_to_host = xo_cpu_linear_to_host;
    be->ops.matmul = xo_cpu_matmul;
    be->ops.rmsnorm = xo_cpu_rmsnorm;
    be->ops.add_rmsnorm = xo_cpu_add_rmsnorm;
    be->ops.rope = xo_cpu_rope;
    be->ops.embed = xo_cpu_embed;
    be->ops.add = xo_cpu_add;
    be->ops.swiglu = xo_cpu_swiglu;
    be->ops.moe_route = xo_cpu_moe_route;
    be->ops.moe_experts = xo_cpu_moe_experts;
    be->ops.attention = xo_cpu_attention;
    be->ops.cache_write = xo_cpu_cache_write;
    be->ops.argmax_rows = xo_cpu_argmax_rows;
    be->decode.decode_begin = xo_cpu_decode_begin;
    be->decode.decode_end = xo_cpu_decode_end;
    be->decode.suppress_tokens = xo_cpu_suppress_tokens;
    be->enter = cpu_enter;
    be->leave = cpu_leave;
    be->destroy = cpu_destroy;
    *out = be;
    return XO_OK;
}
