/* CPU implementations of the backend table (xo_backend.h), one concern per file. */
#ifndef XO_CPU_KERNELS_H
#define XO_CPU_KERNELS_H

#include "xo_backend.h"

/* cpu_matmul.c */
xo_status xo_cpu_linear_init(xo_backend *be, xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows);
void xo_cpu_linear_free(xo_backend *be, xo_linear *w);
xo_status xo_cpu_linear_to_host(xo_backend *be, const xo_linear *w, float *host);
xo_status xo_cpu_matmul(xo_backend *be, float *y, const float *x, const xo_linear *w, int m);
xo_status xo_cpu_embed(xo_backend *be, float *h, const xo_linear *table, const int32_t *ids, int n);

/* cpu_ops.c */
xo_status xo_cpu_rmsnorm(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps);
xo_status xo_cpu_rope(xo_backend *be, float *x, const int32_t *pos, int n, int heads, int hd,
                      const float *inv_freq, float mscale);
/* rows of x are row_stride floats apart; heads*hd of each row are rotated */
xo_status xo_cpu_rope_rows(float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                           const float *inv_freq, float mscale);
xo_status xo_cpu_add(xo_backend *be, float *y, const float *x, size_t n);
xo_status xo_cpu_swiglu(xo_backend *be, float *y, const float *gu, int n, int inter);
xo_status xo_cpu_cache_write(xo_backend *be, float *cache, int capacity, int width, int row, int start,
                             const float *src, int n, int src_stride);

/* cpu_moe.c */
xo_status xo_cpu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k);
xo_status xo_cpu_moe_experts(xo_backend *be, const xo_moe_args *a);

/* cpu_attention.c */
xo_status xo_cpu_attention(xo_backend *be, const xo_attention_args *a);

#endif
