/* Weight storage and matrix products on the CPU.
 *
 * Storage (xo_linear.dtype): float32 (the exact mode), bfloat16, float16, or int8 / int4 with
 * one float32 scale per group of 32 weights of a row (weight-only, kernels.h). Products
 * always accumulate in float32:
 *   - float32: oneDNN sgemm, for every m (the exact path);
 *   - other storage, m <= cpu_gemv_max_rows (the option, XO_CPU_GEMV_MAX_ROWS by default;
 *     decode, the latent cache's K/V expansion): our own vectorised matrix-vector kernels
 *     (backends/cpu/gemv.c), memory-bandwidth bound at m = 1;
 *   - other storage, larger m (prefill): W is widened, a tile of rows at a time, into a
 *     per-thread float32 buffer that oneDNN sgemm consumes (single-threaded per tile, the
 *     tiles spread over the threads), so the conversion is paid once per m rows of x, close to
 *     float32 sgemm's speed. oneDNN 3.2's matmul primitive has no implementation for bf16 (or
 *     f32 x bf16 / f32 x s8) weights on an AVX2-only CPU ("unimplemented"), so it is not used. */
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>

#include "backends/cpu/kernels.h"

/* The crossover between the two non-float32 paths (XO_CPU_GEMV_MAX_ROWS, option
 * cpu_gemv_max_rows) and the tile height (option cpu_tile_rows, 64) were measured on a 2-core
 * Zen 2 (benchmarks/RESULTS.md). */

static int storage_ok(xo_dtype t) { return t == XO_F32 || t == XO_BF16 || t == XO_F16 || t == XO_I8 || t == XO_I4; }

xo_status xo_cpu_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    if (!storage_ok(w->dtype))
        return xo_fail(XO_EUNSUPPORTED, "CPU weight storage %s is not supported", xo_dtype_name(w->dtype));
    if (src_t != XO_F32 && src_t != XO_F16 && src_t != XO_BF16)
        return xo_fail(XO_EINVAL, "linear_init: source dtype %s is not float32, float16 or bfloat16", xo_dtype_name(src_t));
    if (row_offset < 0 || rows < 0 || row_offset + rows > w->out)
        return xo_fail(XO_EINVAL, "linear_init: rows [%d, %d) outside a %d-row matrix", row_offset, row_offset + rows, w->out);
    if (!w->data && !(w->data = xo_cpu_weight_alloc((size_t)w->out * xo_cpu_row_bytes(w))))
        return xo_fail(XO_ENOMEM, "out of memory for a [%d, %d] %s weight", w->out, w->in, xo_dtype_name(w->dtype));
    const int grouped = w->dtype == XO_I8 || w->dtype == XO_I4;
    if (grouped && !w->scales && !(w->scales = be->mem.alloc(be, (size_t)w->out * xo_cpu_groups(w->in) * sizeof(float))))
        return xo_fail_more(XO_ENOMEM, "out of memory for the scales of a [%d, %d] weight", w->out, w->in);
    return xo_cpu_store_rows(w, host, src_t, row_offset, rows);
}

void xo_cpu_linear_free(xo_backend *be, xo_linear *w) {
    free(w->data);
    be->mem.release(be, w->scales);
    w->data = NULL;
    w->scales = NULL;
}

xo_status xo_cpu_linear_to_host(xo_backend *be, const xo_linear *w, float *host) {
    (void)be;
    const size_t K = (size_t)w->in;
    const int block = 64;
    #pragma omp parallel for schedule(static) if ((size_t)w->out * K > 65536)
    for (int r = 0; r < w->out; r += block) {
        int rows = w->out - r < block ? w->out - r : block;
        xo_cpu_dequant_rows(host + (size_t)r * K, w, (size_t)r, (size_t)rows);
    }
    return XO_OK;
}

static xo_status sgemm(float *y, int ldy, const float *x, const float *W, int m, int n, int K) {
    /* Row-major: y[m, n] = x[m, K] * W[n, K]^T */
    dnnl_status_t st = dnnl_sgemm('N', 'T', m, n, K, 1.0f, x, K, W, K, 0.0f, y, ldy);
    if (st != dnnl_success)
        return xo_fail(XO_EDEVICE, "oneDNN sgemm failed (status %d) for [%d, %d] x [%d, %d]^T", (int)st, m, K, n, K);
    return XO_OK;
}

/* y = x @ W.T for non-float32 W: tiles of W widened to float32, one sgemm per tile. */
static xo_status matmul_tiles(float *y, const float *x, const xo_linear *w, int m, int tile) {
    const int out = w->out, K = w->in;
    const int ntiles = (out + tile - 1) / tile;
    const size_t bytes = (((size_t)tile * K * sizeof(float)) + 63) & ~(size_t)63;
    int failed = 0, status = 0;
    #pragma omp parallel
    {
        float *buf = aligned_alloc(64, bytes ? bytes : 64);
        #pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < ntiles; t++) {
            if (!buf) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            const int r0 = t * tile, rows = out - r0 < tile ? out - r0 : tile;
            xo_cpu_dequant_rows(buf, w, (size_t)r0, (size_t)rows);
            /* inside the parallel region oneDNN runs this call on the calling thread */
            dnnl_status_t st = dnnl_sgemm('N', 'T', m, rows, K, 1.0f, x, K, buf, K, 0.0f, y + r0, out);
            if (st != dnnl_success) {
                #pragma omp atomic write
                status = (int)st;
            }
        }
        free(buf);
    }
    if (failed) return xo_fail(XO_ENOMEM, "out of memory in a [%d, %d] x [%d, %d]^T product", m, K, out, K);
    if (status) return xo_fail(XO_EDEVICE, "oneDNN sgemm failed (status %d) for [%d, %d] x [%d, %d]^T", status, m, K, out, K);
    return XO_OK;
}

xo_status xo_cpu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m) {
    const xo_cpu_ctx *cx = xo_cpu_ctx_of(be);
    if (m <= 0 || w->out == 0) return XO_OK;
    if (w->in == 0) {
        memset(y, 0, (size_t)m * w->out * sizeof(float));
        return XO_OK;
    }
    if (w->dtype == XO_F32) return sgemm(y, w->out, x, (const float *)w->data, m, w->out, w->in);
    if (!storage_ok(w->dtype))
        return xo_fail(XO_EUNSUPPORTED, "CPU weight storage %s is not supported", xo_dtype_name(w->dtype));
    if (m <= cx->gemv_max_rows) {
        xo_cpu_gemv(y, x, m, w, cx->isa);
        return XO_OK;
    }
    return matmul_tiles(y, x, w, m, cx->tile_rows);
}

xo_status xo_cpu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n) {
    (void)be;
    const size_t H = (size_t)table->in;
    if (table->dtype == XO_F32) {
        #pragma omp parallel for schedule(static) if (n > 64)
        for (int i = 0; i < n; i++) memcpy(h + (size_t)i * H, (const float *)table->data + (size_t)ids[i] * H, H * sizeof(float));
    } else {
        #pragma omp parallel for schedule(static) if (n > 64)
        for (int i = 0; i < n; i++) xo_cpu_dequant_rows(h + (size_t)i * H, table, (size_t)ids[i], 1);
    }
    return XO_OK;
}
