/* C entry points for tests and benchmarks, exported by the test-only extension xoron._testing
 * (testing/module.c) and reached from Python through ctypes: one product through the CPU
 * backend on any storage dtype with any options, kernel timing, the machine's read
 * bandwidth, the best kernel set and the CPU team size. Not part of the engine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

#define XO_EXPORT __attribute__((visibility("default")))

static xo_status make_linear(xo_backend *be, xo_linear *L, int dtype, int out, int in, const float *w) {
    memset(L, 0, sizeof *L);
    L->out = out;
    L->in = in;
    L->dtype = (xo_dtype)dtype;
    /* written in two halves, as the gate/up pairs are */
    int half = out / 2;
    XO_TRY(be->weights.linear_init(be, L, w, XO_F32, 0, half));
    return be->weights.linear_init(be, L, w + (size_t)half * in, XO_F32, half, out - half);
}

/* a CPU backend with the defaults and then n (name, value) options */
static xo_status make_backend(xo_backend **be, const char *const *names, const char *const *values, int n) {
    xo_options o;
    XO_TRY(xo_options_init(&o));
    for (int i = 0; i < n; i++) XO_TRY(xo_options_set(&o, names[i], values[i]));
    return xo_cpu_backend_create(be, &o);
}

/* y[m, out] = x[m, in] @ W.T with W [out, in] float32 stored as `dtype` (xo_dtype value), on a
 * backend made with n_opts options; w_back (optional) receives the stored weights widened
 * back. 0 on success, else -status. */
XO_EXPORT int xo_hook_matmul(int dtype, int out, int in, int m, const float *w, const float *x, float *y, float *w_back,
                             const char *const *opt_names, const char *const *opt_values, int n_opts) {
    xo_backend *be = NULL;
    xo_status made = make_backend(&be, opt_names, opt_values, n_opts);
    if (made != XO_OK) return -(int)made;
    xo_linear L;
    /* a `threads` option is applied as a model call applies it (the team of the product) */
    int own_team = 0;
    for (int i = 0; i < n_opts; i++) own_team |= strcmp(opt_names[i], "threads") == 0;
    xo_status rc = make_linear(be, &L, dtype, out, in, w);
    if (own_team) be->enter(be);
    if (rc == XO_OK) rc = be->ops.matmul(be, y, x, &L, m);
    if (own_team) be->leave(be);
    if (rc == XO_OK && w_back) rc = be->weights.linear_to_host(be, &L, w_back);
    be->weights.linear_free(be, &L);
    be->destroy(be);
    return -(int)rc;
}

/* y[m, rows] = x[m, in] @ W[row0 : row0 + rows].T (xo_cpu_matmul_rows), W as in xo_hook_matmul. */
XO_EXPORT int xo_hook_matmul_rows(int dtype, int out, int in, int m, int row0, int rows, const float *w, const float *x,
                                  float *y, const char *const *opt_names, const char *const *opt_values, int n_opts) {
    xo_backend *be = NULL;
    xo_status made = make_backend(&be, opt_names, opt_values, n_opts);
    if (made != XO_OK) return -(int)made;
    xo_linear L;
    xo_status rc = make_linear(be, &L, dtype, out, in, w);
    if (rc == XO_OK) rc = xo_cpu_matmul_rows(be, y, x, &L, m, row0, rows);
    be->weights.linear_free(be, &L);
    be->destroy(be);
    return -(int)rc;
}

/* out[r] = the first index of the largest of logits[r, :cols] (the backend's argmax_rows) with a
 * team of `threads`. 0 on success, else -status. */
XO_EXPORT int xo_hook_argmax_rows(const float *logits, int rows, int cols, int threads, int32_t *out) {
    xo_backend *be = NULL;
    char count[16];
    snprintf(count, sizeof count, "%d", threads);
    const char *names[] = { "threads" }, *values[] = { count };
    xo_status rc = make_backend(&be, names, values, 1);
    if (rc != XO_OK) return -(int)rc;
    be->enter(be);
    rc = be->ops.argmax_rows(be, out, logits, rows, cols);
    be->leave(be);
    be->destroy(be);
    return -(int)rc;
}

/* h[n, in] = embedding rows ids of W stored as dtype. */
XO_EXPORT int xo_hook_embed(int dtype, int out, int in, const float *w, const int32_t *ids, int n, float *h) {
    xo_backend *be = NULL;
    if (make_backend(&be, NULL, NULL, 0) != XO_OK) return -1;
    xo_linear L;
    xo_status rc = make_linear(be, &L, dtype, out, in, w);
    if (rc == XO_OK) rc = be->ops.embed(be, h, &L, ids, n);
    be->weights.linear_free(be, &L);
    be->destroy(be);
    return -(int)rc;
}

/* Seconds per y = x @ W.T call (best of `iters`, after one warm-up) for a random [out, in]
 * weight stored as dtype, on a backend made with n_opts options; negative on failure. */
XO_EXPORT double xo_hook_time_matmul(int dtype, int out, int in, int m, int iters, const char *const *opt_names,
                                     const char *const *opt_values, int n_opts) {
    xo_backend *be = NULL;
    if (make_backend(&be, opt_names, opt_values, n_opts) != XO_OK) return -1.0;
    float *w = malloc((size_t)out * in * sizeof *w);
    float *x = malloc((size_t)m * in * sizeof *x);
    float *y = malloc((size_t)m * out * sizeof *y);
    double best = -1.0;
    xo_linear L;
    memset(&L, 0, sizeof L);
    if (w && x && y) {
        uint32_t s = 12345u;
        for (size_t i = 0; i < (size_t)out * in; i++) { s = s * 1664525u + 1013904223u; w[i] = (float)(int)(s >> 8) * 1e-9f; }
        for (size_t i = 0; i < (size_t)m * in; i++) { s = s * 1664525u + 1013904223u; x[i] = (float)(int)(s >> 8) * 1e-9f; }
        if (make_linear(be, &L, dtype, out, in, w) == XO_OK && be->ops.matmul(be, y, x, &L, m) == XO_OK) {
            for (int it = 0; it < iters; it++) {
                double t0 = omp_get_wtime();
                be->ops.matmul(be, y, x, &L, m);
                double dt = omp_get_wtime() - t0;
                if (best < 0 || dt < best) best = dt;
            }
        }
    }
    be->weights.linear_free(be, &L);
    free(w);
    free(x);
    free(y);
    be->destroy(be);
    return best;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* sums a span with AVX2 as 4 interleaved sequential streams, software-prefetched 1 KB ahead,
 * the access pattern of the matrix-vector kernels (one stream per core, or hardware prefetch
 * alone, leaves a third of the bandwidth unused on some machines) */
__attribute__((target("avx2")))
static float sum_span_avx2(const float *p, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const size_t q = (n / 4) & ~(size_t)15;
    const float *p0 = p, *p1 = p + q, *p2 = p + 2 * q, *p3 = p + 3 * q;
    for (size_t i = 0; i < q; i += 16) {
        _mm_prefetch((const char *)(p0 + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(p1 + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(p2 + i) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(p3 + i) + 1024, _MM_HINT_T0);
        a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_loadu_ps(p0 + i), _mm256_loadu_ps(p0 + i + 8)));
        a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_loadu_ps(p1 + i), _mm256_loadu_ps(p1 + i + 8)));
        a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_loadu_ps(p2 + i), _mm256_loadu_ps(p2 + i + 8)));
        a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_loadu_ps(p3 + i), _mm256_loadu_ps(p3 + i + 8)));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += t[j];
    for (size_t i = 4 * q; i < n; i++) s += p[i];
    return s;
}
#endif

static float sum_span(const float *p, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
    if (xo_cpu_best_isa() >= XO_ISA_AVX2) return sum_span_avx2(p, n);
#endif
    float a[16] = { 0 };
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) a[j] += p[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += a[j];
    for (; i < n; i++) s += p[i];
    return s;
}

/* Read bandwidth in GB/s over a `mbytes` MB buffer, all threads, best of `reps`. */
XO_EXPORT double xo_hook_read_bandwidth(int mbytes, int reps) {
    size_t n = ((size_t)mbytes << 20) / sizeof(float);
    n &= ~(size_t)1023;
    float *p = xo_cpu_weight_alloc(n * sizeof(float));   /* same pages as the weights */
    if (!p) return -1.0;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) p[i] = 1.0f;   /* each thread first-touches its own span */
    double best = 0.0;
    volatile float sink = 0.0f;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        float s = 0.0f;
        #pragma omp parallel reduction(+ : s)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t per = (n / nt) & ~(size_t)15;
            size_t beg = (size_t)id * per, len = id == nt - 1 ? n - beg : per;
            s += sum_span(p + beg, len);
        }
        double dt = omp_get_wtime() - t0;
        sink += s;
        double gbs = (double)n * sizeof(float) / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    (void)sink;
    free(p);
    return best;
}

/* The best kernel set this CPU runs (XO_ISA_*), and its name. */
XO_EXPORT int xo_hook_best_isa(void) { return xo_cpu_best_isa(); }
XO_EXPORT const char *xo_hook_isa_name(void) { return xo_cpu_isa_name(xo_cpu_best_isa()); }

/* The team size the CPU backend would use now for a model whose threads option is `threads`. */
XO_EXPORT int xo_hook_team(int threads) {
    xo_cpu_ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.threads = threads;
    return xo_cpu_team(&cx);
}

/* Runnable tasks on the machine as the automatic team size reads them (0: unknown). */
XO_EXPORT long xo_hook_runnable_now(void) { return xo_cpu_runnable_now(); }

/* Sets this library's process default thread count (its copy of the engine's; 0 on success). */
XO_EXPORT int xo_hook_set_default_threads(int n) { return -(int)xo_cpu_set_default_threads(n); }
