/* Weight storage and matrix products on the CPU. float32 goes through oneDNN's sgemm. */
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>

#include "cpu_kernels.h"

xo_status xo_cpu_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    if (w->dtype != XO_F32)
        return xo_fail(XO_EUNSUPPORTED, "CPU weight storage %s is not supported", xo_dtype_name(w->dtype));
    if (row_offset < 0 || rows < 0 || row_offset + rows > w->out)
        return xo_fail(XO_EINVAL, "linear_init: rows [%d, %d) outside a %d-row matrix", row_offset, row_offset + rows, w->out);
    size_t row_elems = (size_t)w->in;
    if (!w->data && !(w->data = be->alloc(be, (size_t)w->out * row_elems * sizeof(float))))
        return xo_fail(XO_ENOMEM, "out of memory for a [%d, %d] weight", w->out, w->in);
    xo_convert_to_f32((float *)w->data + (size_t)row_offset * row_elems, host, src_t, (size_t)rows * row_elems);
    return XO_OK;
}

void xo_cpu_linear_free(xo_backend *be, xo_linear *w) {
    be->release(be, w->data);
    be->release(be, w->scales);
    w->data = NULL;
    w->scales = NULL;
}

xo_status xo_cpu_linear_to_host(xo_backend *be, const xo_linear *w, float *host) {
    (void)be;
    memcpy(host, w->data, (size_t)w->out * w->in * sizeof(float));
    return XO_OK;
}

xo_status xo_cpu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m) {
    (void)be;
    if (m == 0) return XO_OK;
    /* Row-major: y[m, out] = x[m, in] * W[out, in]^T */
    dnnl_status_t st = dnnl_sgemm('N', 'T', m, w->out, w->in, 1.0f, x, w->in, (const float *)w->data, w->in,
                                  0.0f, y, w->out);
    if (st != dnnl_success)
        return xo_fail(XO_EDEVICE, "oneDNN sgemm failed (status %d) for [%d, %d] x [%d, %d]^T", (int)st, m, w->in, w->out, w->in);
    return XO_OK;
}

xo_status xo_cpu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n) {
    (void)be;
    const size_t H = (size_t)table->in;
    #pragma omp parallel for schedule(static) if (n > 64)
    for (int i = 0; i < n; i++) memcpy(h + (size_t)i * H, (const float *)table->data + (size_t)ids[i] * H, H * sizeof(float));
    return XO_OK;
}
