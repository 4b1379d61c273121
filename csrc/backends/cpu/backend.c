/* The CPU backend: host memory, oneDNN matrix products, OpenMP-threaded kernels. */
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/kernels.h"

static void *cpu_alloc(xo_backend *be, size_t bytes) {
    (void)be;
    /* 64-byte alignment keeps vector loads on cache-line boundaries. */
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (p) memset(p, 0, rounded ? rounded : 64);
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

static xo_status cpu_set_threads(xo_backend *be, int n) {
    if (n != 0) XO_TRY(xo_cpu_check_threads(n));
    ((xo_cpu_ctx *)be->ctx)->threads = n;
    return XO_OK;
}

static void cpu_destroy(xo_backend *be) {
    free(be->ctx);
    free(be);
}

xo_status xo_cpu_backend_create(xo_backend **out) {
    xo_backend *be = calloc(1, sizeof *be);
    xo_cpu_ctx *ctx = calloc(1, sizeof *ctx);
    if (!be || !ctx) {
        free(be);
        free(ctx);
        return xo_fail(XO_ENOMEM, "out of memory");
    }
    be->ctx = ctx;
    be->name = "cpu";
    be->host_memory = 1;
    be->alloc = cpu_alloc;
    be->release = cpu_release;
    be->release_shared = cpu_release;
    be->upload = cpu_copy;
    be->download = cpu_copy;
    be->copy = cpu_copy;
    be->synchronize = cpu_sync;
    be->linear_init = xo_cpu_linear_init;
    be->linear_free = xo_cpu_linear_free;
    be->linear_to_host = xo_cpu_linear_to_host;
    be->matmul = xo_cpu_matmul;
    be->rmsnorm = xo_cpu_rmsnorm;
    be->add_rmsnorm = xo_cpu_add_rmsnorm;
    be->rope = xo_cpu_rope;
    be->embed = xo_cpu_embed;
    be->add = xo_cpu_add;
    be->swiglu = xo_cpu_swiglu;
    be->moe_route = xo_cpu_moe_route;
    be->moe_experts = xo_cpu_moe_experts;
    be->attention = xo_cpu_attention;
    be->cache_write = xo_cpu_cache_write;
    be->argmax_rows = xo_cpu_argmax_rows;
    be->decode_begin = xo_cpu_decode_begin;
    be->decode_end = xo_cpu_decode_end;
    be->suppress_tokens = xo_cpu_suppress_tokens;
    be->set_threads = cpu_set_threads;
    be->destroy = cpu_destroy;
    *out = be;
    return XO_OK;
}
