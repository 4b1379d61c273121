/* Weight storage conversions on the CPU: float32/float16/bfloat16 source rows to the storage
 * dtype (bfloat16 and float16 rounded to nearest even; int8 symmetric per output row,
 * scale = max|row| / 127), and back to float32. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "backends/cpu/kernels.h"

/* ISA-level clones: GCC dispatches "arch=haswell"-style clones on the CPU model (so never on
 * AMD), "arch=x86-64-v3/v4" on the features */

/* Weight storage: large matrices on 2 MB pages where the kernel allows (transparent huge pages
 * in "madvise" mode are common): streaming a matrix then costs no TLB misses, a large part of
 * the matrix-vector kernels' bandwidth (benchmarks/RESULTS.md). Zero-filled (by all threads,
 * which also places the pages) like the backend's alloc. Released with free(). */
void *xo_cpu_weight_alloc(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    void *p = NULL;
    size_t n = ((bytes + 63) & ~(size_t)63) + (bytes ? 0 : 64);
    if (bytes >= huge) {
        n = (bytes + huge - 1) & ~(huge - 1);
        p = aligned_alloc(huge, n);
#ifdef MADV_HUGEPAGE
        if (p) madvise(p, n, MADV_HUGEPAGE);
#endif
    }
    if (!p && !(p = aligned_alloc(64, n))) return NULL;
    const size_t chunk = huge;
    const long chunks = (long)((n + chunk - 1) / chunk);
    #pragma omp parallel for schedule(static) if (chunks > 1)
    for (long c = 0; c < chunks; c++) {
        size_t off = (size_t)c * chunk;
        memset((char *)p + off, 0, n - off < chunk ? n - off : chunk);
    }
    return p;
}

/* Quantises one float32 row: q = round(v / scale), |q| <= 127. Returns the scale. */
XO_CLONES
static float quantize_row(int8_t *q, const float *v, int n) {
    float mx = 0.0f;
    for (int j = 0; j < n; j++) {
        float a = fabsf(v[j]);
        mx = a > mx ? a : mx;
    }
    if (!(mx > 0.0f) || !isfinite(mx)) {   /* all zero (or non-finite): store zeros */
        memset(q, 0, (size_t)n);
        return 0.0f;
    }
    const float scale = mx / 127.0f, inv = 127.0f / mx;
    for (int j = 0; j < n; j++) {
        float r = nearbyintf(v[j] * inv);
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        q[j] = (int8_t)r;
    }
    return scale;
}

XO_CLONES
static void row_to_bf16(uint16_t *d, const float *v, int n) {
    for (int j = 0; j < n; j++) d[j] = xo_f32_to_bf16(v[j]);
}

xo_status xo_cpu_store_rows(xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    const int K = w->in;
    const size_t src_row = (size_t)K * xo_dtype_size(src_t);
    const xo_dtype t = w->dtype;
    if (t == src_t && t != XO_I8) {   /* same representation: copy */
        memcpy((char *)w->data + (size_t)row_offset * K * xo_dtype_size(t), host, (size_t)rows * src_row);
        return XO_OK;
    }
    int failed = 0;
    #pragma omp parallel if ((size_t)rows * K > 65536)
    {
        float *tmp = malloc((size_t)(K ? K : 1) * sizeof *tmp);
        if (!tmp) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int i = 0; i < rows; i++) {
            if (!tmp) continue;
            const size_t r = (size_t)row_offset + i;
            xo_convert_to_f32(tmp, (const char *)host + (size_t)i * src_row, src_t, (size_t)K);
            switch (t) {
            case XO_F32: memcpy((float *)w->data + r * K, tmp, (size_t)K * sizeof(float)); break;
            case XO_BF16: row_to_bf16((uint16_t *)w->data + r * K, tmp, K); break;
            case XO_F16:
                for (int j = 0; j < K; j++) ((uint16_t *)w->data)[r * K + j] = xo_f32_to_f16(tmp[j]);
                break;
            case XO_I8: w->scales[r] = quantize_row((int8_t *)w->data + r * K, tmp, K); break;
            default: break;
            }
        }
        free(tmp);
    }
    return failed ? xo_fail(XO_ENOMEM, "out of memory converting a [%d, %d] weight", rows, K) : XO_OK;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
__attribute__((target("avx,f16c")))
static void f16_to_f32_f16c(const uint16_t *s, float *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = xo_f16_to_f32(s[i]);
}
#endif

static void f16_to_f32(const uint16_t *s, float *d, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
    if (xo_cpu_best_isa() >= XO_ISA_AVX2) { f16_to_f32_f16c(s, d, n); return; }
#endif
    for (size_t i = 0; i < n; i++) d[i] = xo_f16_to_f32(s[i]);
}

XO_CLONES
void xo_cpu_dequant_rows(float *dst, const xo_linear *w, size_t row0, size_t rows) {
    const size_t K = (size_t)w->in, n = rows * K;
    switch (w->dtype) {
    case XO_F32:
        memcpy(dst, (const float *)w->data + row0 * K, n * sizeof(float));
        break;
    case XO_BF16: {
        const uint16_t *s = (const uint16_t *)w->data + row0 * K;
        for (size_t i = 0; i < n; i++) {
            union { uint32_t u; float f; } v = { .u = (uint32_t)s[i] << 16 };
            dst[i] = v.f;
        }
        break;
    }
    case XO_F16:
        f16_to_f32((const uint16_t *)w->data + row0 * K, dst, n);
        break;
    case XO_I8: {
        for (size_t r = 0; r < rows; r++) {
            const int8_t *q = (const int8_t *)w->data + (row0 + r) * K;
            const float s = w->scales[row0 + r];
            float *d = dst + r * K;
            for (size_t j = 0; j < K; j++) d[j] = (float)q[j] * s;
        }
        break;
    }
    default:
        memset(dst, 0, n * sizeof(float));
        break;
    }
}
