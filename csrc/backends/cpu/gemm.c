/* Weight storage and matrix products on the CPU.
 *
 * Storage (xo_linear.dtype): float32 (the exact mode), bfloat16, float16, or int8 / int4 with
 * one float32 scale per group of 32 weights of a row (weight-only, kernels.h). Products
 * always accumulate in float32:
 *   - float32: oneDNN sgemm, for every m (the exact path);
 *   - other storage, m <= cpu_gemv_max_rows (the option; by default XO_CPU_GEMV_MAX_ROWS, for
 *     bfloat16 on an AMX CPU XO_CPU_AMX_BF16_GEMV_MAX_ROWS; decode, the latent cache's K/V
 *     expansion): our own vectorised matrix-vector kernels (backends/cpu/gemv.c; int8 / int4:
 *     qgemv.c, integer dot products against the activations quantised to int16), memory-bandwidth
 *     bound at m = 1;
 *   - bfloat16, int8 and int4, larger m, on a CPU with AMX-BF16 (cpu_isa amx): the tile kernels
 *     of backends/cpu/amx.c;
 *   - other storage, larger m (prefill) otherwise: W is widened, a tile of rows at a time, into a
 *     per-thread float32 buffer that oneDNN sgemm consumes (single-threaded per tile, the
 *     tiles spread over the threads), so the conversion is paid once per m rows of x, close to
 *     float32 sgemm's speed. oneDNN 3.2's matmul primitive has no implementation for bf16 (or
 *     f32 x bf16 / f32 x s8) weights on an AVX2-only CPU ("unimplemented"), so it is not used. */
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>

#include "backends/cpu/kernels.h"

/* The crossovers between the non-float32 paths (XO_CPU_GEMV_MAX_ROWS, option cpu_gemv_max_rows;
 * XO_CPU_AMX_BF16_GEMV_MAX_ROWS) and the tile height (option cpu_tile_rows, 64) were measured
 * (benchmarks/RESULTS.md). */

static int storage_ok(xo_dtype t) { return t == XO_F32 || t == XO_BF16 || t == XO_F16 || t == XO_I8 || t == XO_I4; }

xo_status xo_cpu_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    if (!storage_ok(w->dtype))
        return xo_fail(XO_EUNSUPPORTED, "CPU weight storage %s is not supported", xo_dtype_name(w->dtype));
    if (src_t != XO_F32 && src_t != XO_F16 && src_t != XO_BF16)
        return xo_fail(XO_EINVAL, "linear_init: source dtype %s is not float32, float16 or bfloat16", xo_dtype_name(src_t));
    if (row_offset < 0 || rows < 0 || row_offset + rows > w->out)
        return xo_fail(XO_EINVAL, "linear_init: rows [%d, %d) outside a %d-row matrix", row_offset, row_offset + rows, w->out);
    if (!w->data && !(w->data = xo_cpu_weight_alloc(xo_cpu_weight_bytes(w))))
        return xo_fail(XO_ENOMEM, "out of memory for a [%d, %d] %s weight", w->out, w->in, xo_dtype_name(w->dtype));
    /* zeroed: the padding rows of the last block must read as zeros */
    if (xo_cpu_grouped(w->dtype) && !w->scales && !(w->scales = be->mem.alloc(be, xo_cpu_scale_count(w) * sizeof(float))))
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

/* y[m, rows] = x @ W[row0 : row0 + rows].T for non-float32 W: tiles of W widened to float32,
 * one sgemm per tile. */
static xo_status matmul_tiles(float *y, const float *x, const xo_linear *w, int m, int row0, int out, int tile) {
    const int K = w->in;
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
            xo_cpu_dequant_rows(buf, w, (size_t)row0 + r0, (size_t)rows);
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

int xo_cpu_gemv_limit(const xo_cpu_ctx *cx, xo_dtype t) {
    if (cx->gemv_max_rows >= 0) return cx->gemv_max_rows;
    return cx->isa >= XO_ISA_AMX && t == XO_BF16 ? XO_CPU_AMX_BF16_GEMV_MAX_ROWS : XO_CPU_GEMV_MAX_ROWS;
}

xo_status xo_cpu_matmul_rows(xo_backend *be, float *y, const float *x, const xo_linear *w, int m, int row0, int rows) {
    const xo_cpu_ctx *cx = xo_cpu_ctx_of(be);
    if (row0 < 0 || rows < 0 || row0 + rows > w->out)
        return xo_fail(XO_EINVAL, "matmul: rows [%d, %d) outside a %d-row matrix", row0, row0 + rows, w->out);
    if (m <= 0 || rows == 0) return XO_OK;
    if (w->in == 0) {
        memset(y, 0, (size_t)m * rows * sizeof(float));
        return XO_OK;
    }
    if (!storage_ok(w->dtype))
        return xo_fail(XO_EUNSUPPORTED, "CPU weight storage %s is not supported", xo_dtype_name(w->dtype));
    if (w->dtype == XO_F32) return sgemm(y, rows, x, (const float *)w->data + (size_t)row0 * w->in, m, rows, w->in);
    if (m <= xo_cpu_gemv_limit(cx, w->dtype)) {
        if (xo_cpu_grouped(w->dtype)) return xo_cpu_qgemv(y, (size_t)rows, x, m, w, row0, rows, cx->isa);
        xo_linear v = *w;   /* the float formats' rows are contiguous */
        v.out = rows;
        v.data = (char *)w->data + (size_t)row0 * w->in * xo_dtype_size(w->dtype);
        xo_cpu_gemv(y, x, m, &v, cx->isa);
        return XO_OK;
    }
    if (cx->isa >= XO_ISA_AMX && xo_cpu_amx_dtype(w->dtype)) return xo_cpu_amx_matmul(y, (size_t)rows, x, m, w, row0, rows);
    return matmul_tiles(y, x, w, m, row0, rows, cx->tile_rows);
}

xo_status xo_cpu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m) {
    return xo_cpu_matmul_rows(be, y, x, w, m, 0, w->out);
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
