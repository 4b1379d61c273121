/* Elementwise and row-wise CPU kernels: RMSNorm, rotary embedding, residual add, SwiGLU, cache writes. */
#include <math.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"


XO_CLONES
static void rmsnorm_row(float *y, const float *x, const float *w, int d, float eps) {
    float ss = 0.0f;
    #pragma omp simd reduction(+ : ss)
    for (int j = 0; j < d; j++) ss += x[j] * x[j];
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    #pragma omp simd
    for (int j = 0; j < d; j++) y[j] = w[j] * (x[j] * inv);
}

xo_status xo_cpu_rmsnorm(xo_backend *be, float *y, const float *x, int x_stride, const float *w, int n, int d, float eps) {
    (void)be;
    #pragma omp parallel for schedule(static) if (n > 16)
    for (int i = 0; i < n; i++) rmsnorm_row(y + (size_t)i * d, x + (size_t)i * x_stride, w, d, eps);
    return XO_OK;
}

xo_status xo_cpu_add_rmsnorm(xo_backend *be, float *h, const float *x, float *y, const float *w, int n, int d,
                             float eps) {
    XO_TRY(xo_cpu_add(be, h, x, (size_t)n * d));
    return xo_cpu_rmsnorm(be, y, h, d, w, n, d, eps);
}

/* cos/sin for one position, in float32 as the reference computes them: theta = p * inv_freq. */
static void rope_angles(float *cs, float *sn, int32_t pos, const float *inv_freq, int half, float mscale) {
    for (int j = 0; j < half; j++) {
        float theta = (float)pos * inv_freq[j];
        cs[j] = cosf(theta) * mscale;
        sn[j] = sinf(theta) * mscale;
    }
}

XO_CLONES
static void rope_apply(float *x, const float *cs, const float *sn, int heads, int hd) {
    const int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *v = x + (size_t)h * hd;
        #pragma omp simd
        for (int j = 0; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = a * cs[j] - b * sn[j];
            v[j + half] = b * cs[j] + a * sn[j];
        }
    }
}

xo_status xo_cpu_rope_rows(float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                           const float *inv_freq, float mscale) {
    const int half = hd / 2;
    if (half > 512) return xo_fail(XO_EINVAL, "head_dim %d is above the supported 1024", hd);
    #pragma omp parallel if (n > 8)
    {
        float cs[512], sn[512];
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            rope_angles(cs, sn, pos[i], inv_freq, half, mscale);
            rope_apply(x + (size_t)i * row_stride, cs, sn, heads, hd);
        }
    }
    return XO_OK;
}

xo_status xo_cpu_rope(xo_backend *be, float *x, size_t row_stride, const int32_t *pos, int n, int heads, int hd,
                      const float *inv_freq, float mscale) {
    (void)be;
    return xo_cpu_rope_rows(x, row_stride, pos, n, heads, hd, inv_freq, mscale);
}

XO_CLONES
static void add_span(float *y, const float *x, size_t n) {
    #pragma omp simd
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

xo_status xo_cpu_add(xo_backend *be, float *y, const float *x, size_t n) {
    (void)be;
    const size_t block = 16384;
    size_t nb = (n + block - 1) / block;
    #pragma omp parallel for schedule(static) if (nb > 1)
    for (size_t b = 0; b < nb; b++) {
        size_t end = (b + 1) * block < n ? (b + 1) * block : n;
        add_span(y + b * block, x + b * block, end - b * block);
    }
    return XO_OK;
}

XO_CLONES
static void swiglu_row(float *y, const float *g, const float *u, int n) {
    for (int j = 0; j < n; j++) y[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* Products below this many outputs are computed by one thread. */
enum { SWIGLU_SPLIT = 1024 };

xo_status xo_cpu_swiglu(xo_backend *be, float *y, const float *gu, int n, int inter) {
    (void)be;
    if (n > 4) {
        #pragma omp parallel for schedule(static)
        for (int i = 0; i < n; i++) {
            const float *row = gu + (size_t)i * 2 * inter;
            swiglu_row(y + (size_t)i * inter, row, row + inter, inter);
        }
        return XO_OK;
    }
    /* few rows (decode): each row's columns split over the team, libm's expf being the cost */
    #pragma omp parallel if ((long)n * inter >= SWIGLU_SPLIT)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int c0 = (int)((long)inter * id / nt), c1 = (int)((long)inter * (id + 1) / nt);
        for (int i = 0; i < n; i++) {
            const float *row = gu + (size_t)i * 2 * inter;
            swiglu_row(y + (size_t)i * inter + c0, row + c0, row + inter + c0, c1 - c0);
        }
    }
    return XO_OK;
}

xo_status xo_cpu_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int width, int start,
                             const int32_t *start_device, const float *src, int batch, int n, int src_stride) {
    (void)be;
    if (start_device) start = *start_device;
    const size_t es = xo_dtype_size(cache_t);
    for (int r = 0; r < batch; r++) {
        for (int i = 0; i < n; i++) {
            const float *s = src + ((size_t)r * n + i) * src_stride;
            char *dst = (char *)cache + ((size_t)r * capacity + start + i) * width * es;
            if (cache_t == XO_F32) {
                memcpy(dst, s, (size_t)width * sizeof(float));
            } else {
                uint16_t *d16 = (uint16_t *)dst;
                for (int j = 0; j < width; j++) d16[j] = cache_t == XO_BF16 ? xo_f32_to_bf16(s[j]) : xo_f32_to_f16(s[j]);
            }
        }
    }
    return XO_OK;
}

/* The first index of the largest of z[v0, v1) (as a strict '>' scan finds it) into *best and
 * its value into *top; returns whether the span holds a NaN. Two vectorised passes: the
 * largest value, then the first index holding it. */
XO_CLONES
static int argmax_span(const float *z, int v0, int v1, int *best, float *top) {
    float mx = -INFINITY;
    int nan = 0;
    #pragma omp simd reduction(max : mx) reduction(| : nan)
    for (int v = v0; v < v1; v++) {
        nan |= z[v] != z[v];
        mx = z[v] > mx ? z[v] : mx;
    }
    int at = v0;
    while (at < v1 && !(z[at] == mx)) at++;
    *best = at < v1 ? at : v0;   /* all -inf: the first, as the scan keeps it */
    *top = mx;
    return nan;
}

/* Rows shorter than this are scanned by one thread; at most ARGMAX_PARTS threads share one. */
enum { ARGMAX_SPLIT = 32768, ARGMAX_PARTS = 64 };

xo_status xo_cpu_argmax_rows(xo_backend *be, int32_t *out, const float *logits, int rows, int cols) {
    (void)be;
    const int team = omp_get_max_threads() < ARGMAX_PARTS ? omp_get_max_threads() : ARGMAX_PARTS;
    for (int r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * cols;
        int idx[ARGMAX_PARTS], nan[ARGMAX_PARTS], parts = 1;
        float top[ARGMAX_PARTS];
        #pragma omp parallel num_threads(team) if (cols >= ARGMAX_SPLIT)
        {
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
            if (id == 0) parts = nt;
            const int v0 = (int)((long)cols * id / nt), v1 = (int)((long)cols * (id + 1) / nt);
            nan[id] = argmax_span(z, v0, v1, &idx[id], &top[id]);
        }
        int best = idx[0], any_nan = nan[0];
        float best_v = top[0];
        for (int p = 1; p < parts; p++) {   /* a later part wins only with a larger value */
            any_nan |= nan[p];
            if (top[p] > best_v) { best = idx[p]; best_v = top[p]; }
        }
        if (any_nan) return xo_fail(XO_EINVAL, "logits contain NaN at row %d", r);
        out[r] = best;
    }
    return XO_OK;
}
