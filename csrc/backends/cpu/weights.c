/* Weight storage conversions on the CPU: float32/float16/bfloat16 source rows to the storage
 * dtype (bfloat16 and float16 rounded to nearest even; int8 and int4 group-wise, one float32
 * scale per XO_QGROUP weights of a row, layouts in kernels.h), and back to float32. */
#include <float.h>
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

/* Quantises one float32 row, group by group, into q[groups * 32] (zero padded) and scales
 * (int8: q = round(v / d), |q| <= 127, d = max|group| / 127); an all-zero group is stored as
 * zeros. Returns 0, or -1 when the row holds a NaN or an infinity (no scale represents it). */
XO_CLONES
static int quantize_row_i8(int8_t *q, float *scales, const float *v, int n) {
    for (int g0 = 0, g = 0; g0 < n; g0 += XO_QGROUP, g++) {
        const int len = n - g0 < XO_QGROUP ? n - g0 : XO_QGROUP;
        float mx = 0.0f;
        for (int j = 0; j < len; j++) {
            float a = fabsf(v[g0 + j]);
            if (!(a <= FLT_MAX)) return -1;   /* NaN or infinity, which the max would skip */
            mx = a > mx ? a : mx;
        }
        memset(q + g0, 0, XO_QGROUP);
        if (!(mx > 0.0f)) {
            scales[g] = 0.0f;
            continue;
        }
        const float inv = 127.0f / mx;
        for (int j = 0; j < len; j++) {
            float r = nearbyintf(v[g0 + j] * inv);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            q[g0 + j] = (int8_t)r;
        }
        scales[g] = mx / 127.0f;
    }
    return 0;
}

/* int4, as quantize_row_i8 (q in [-8, 7], padding 0); 16 levels: d = -(the group's value of
 * largest magnitude) / 8, q = round(v / d), so that value is stored exactly (as -8) and the rest
 * within d/2, or d for a value of the opposite sign and the same magnitude (clamped to 7). */
XO_CLONES
static int quantize_row_i4(int8_t *q, float *scales, const float *v, int n) {
    for (int g0 = 0, g = 0; g0 < n; g0 += XO_QGROUP, g++) {
        const int len = n - g0 < XO_QGROUP ? n - g0 : XO_QGROUP;
        float big = 0.0f, mx = 0.0f;
        for (int j = 0; j < len; j++) {
            float a = fabsf(v[g0 + j]);
            if (!(a <= FLT_MAX)) return -1;
            if (a > mx) { mx = a; big = v[g0 + j]; }
        }
        memset(q + g0, 0, XO_QGROUP);
        if (!(mx > 0.0f)) {
            scales[g] = 0.0f;
            continue;
        }
        const float inv = -8.0f / big;
        for (int j = 0; j < len; j++) {
            float r = nearbyintf(v[g0 + j] * inv);
            r = r > 7.0f ? 7.0f : r < -8.0f ? -8.0f : r;
            q[g0 + j] = (int8_t)r;
        }
        scales[g] = big / -8.0f;
    }
    return 0;
}

/* Byte offset, inside a block's group, of the byte holding column k (0-31) of the block's row j
 * (kernels.h); for I4 the high nibble when k >= 16. */
static inline size_t piece_offset(xo_dtype t, int j, int k) {
    const int kk = t == XO_I4 ? k % 16 : k;
    return (size_t)(kk / 2) * 32 + 2 * (size_t)j + (kk & 1);
}

/* row r of a grouped linear from its q (groups * 32) and scales (groups), into the blocks */
static void place_row(const xo_linear *w, size_t r, const int8_t *q, const float *sc) {
    const int G = xo_cpu_groups(w->in), j = (int)(r % XO_QROWS);
    const size_t blk = r / XO_QROWS, gb = xo_cpu_group_bytes(w->dtype);
    uint8_t *base = (uint8_t *)w->data + blk * G * gb;
    float *scales = w->scales + blk * G * XO_QROWS + j;
    for (int g = 0; g < G; g++) {
        uint8_t *piece = base + (size_t)g * gb;
        const int8_t *qg = q + (size_t)g * XO_QGROUP;
        if (w->dtype == XO_I8) {
            for (int k = 0; k < XO_QGROUP; k++) piece[piece_offset(XO_I8, j, k)] = (uint8_t)qg[k];
        } else {
            for (int k = 0; k < XO_QGROUP / 2; k++)
                piece[piece_offset(XO_I4, j, k)] = (uint8_t)((qg[k] + 8) | (qg[k + 16] + 8) << 4);
        }
        scales[(size_t)g * XO_QROWS] = sc[g];
    }
}

XO_CLONES
static void row_to_bf16(uint16_t *d, const float *v, int n) {
    for (int j = 0; j < n; j++) d[j] = xo_f32_to_bf16(v[j]);
}

xo_status xo_cpu_store_rows(xo_linear *w, const void *host, xo_dtype src_t, int row_offset, int rows) {
    const int K = w->in, G = xo_cpu_groups(K);
    const size_t src_row = (size_t)K * xo_dtype_size(src_t);
    const xo_dtype t = w->dtype;
    if (t == src_t) {   /* same representation: copy */
        memcpy((char *)w->data + (size_t)row_offset * K * xo_dtype_size(t), host, (size_t)rows * src_row);
        return XO_OK;
    }
    int failed = 0, nonfinite_row = -1;
    #pragma omp parallel if ((size_t)rows * K > 65536)
    {
        /* a row in float32 (padded to whole groups), then (grouped) its scales and q */
        const size_t padded = (size_t)G * XO_QGROUP;
        float *tmp = malloc(padded * sizeof(float) + (size_t)G * sizeof(float) + padded + 1);
        float *sc = tmp ? tmp + padded : NULL;
        int8_t *q = tmp ? (int8_t *)(sc + G) : NULL;
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
            case XO_I8:
            case XO_I4: {
                int bad = t == XO_I8 ? quantize_row_i8(q, sc, tmp, K) : quantize_row_i4(q, sc, tmp, K);
                if (bad) {
                    #pragma omp critical(xo_nonfinite_row)
                    if (nonfinite_row < 0 || i < nonfinite_row) nonfinite_row = i;
                } else {
                    place_row(w, r, q, sc);
                }
                break;
            }
            default: break;
            }
        }
        free(tmp);
    }
    if (failed) return xo_fail(XO_ENOMEM, "out of memory converting a [%d, %d] weight", rows, K);
    if (nonfinite_row >= 0)
        return xo_fail(XO_EINVAL, "row %d holds a NaN or infinity, which %s quantisation cannot represent",
                       nonfinite_row, xo_dtype_name(t));
    return XO_OK;
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

/* rows [row0, row0 + rows) of a grouped linear, widened: per block and group the 16 rows'
 * byte pairs are first gathered row by row (a 16 x 16 transpose of 16-bit words), then each
 * row's 32 bytes widen in order */
XO_CLONES
static void dequant_grouped(float *dst, const xo_linear *w, size_t row0, size_t rows) {
    const int K = w->in, G = xo_cpu_groups(K), i4 = w->dtype == XO_I4;
    const size_t gb = xo_cpu_group_bytes(w->dtype), end = row0 + rows;
    const int pieces = i4 ? XO_QGROUP / 4 : XO_QGROUP / 2;
    for (size_t blk = row0 / XO_QROWS; blk * XO_QROWS < end; blk++) {
        const size_t first = blk * XO_QROWS;
        const int j0 = row0 > first ? (int)(row0 - first) : 0;
        const int j1 = end - first < XO_QROWS ? (int)(end - first) : XO_QROWS;
        const uint8_t *base = (const uint8_t *)w->data + blk * G * gb;
        const float *sc = w->scales + blk * G * XO_QROWS;
        for (int g = 0; g < G; g++) {
            const uint8_t *piece = base + (size_t)g * gb;
            uint8_t rowq[XO_QROWS][XO_QGROUP];   /* row j: its bytes in order */
            for (int p = 0; p < pieces; p++)
                for (int j = j0; j < j1; j++) {
                    rowq[j][2 * p] = piece[p * 32 + 2 * j];
                    rowq[j][2 * p + 1] = piece[p * 32 + 2 * j + 1];
                }
            const int k0 = g * XO_QGROUP, len = K - k0 < XO_QGROUP ? K - k0 : XO_QGROUP;
            for (int j = j0; j < j1; j++) {
                const float d = sc[(size_t)g * XO_QROWS + j];
                float *o = dst + (first + j - row0) * (size_t)K + k0;
                if (i4) {
                    float v[XO_QGROUP];
                    for (int k = 0; k < XO_QGROUP / 2; k++) {
                        v[k] = (float)((rowq[j][k] & 15) - 8) * d;
                        v[k + XO_QGROUP / 2] = (float)((rowq[j][k] >> 4) - 8) * d;
                    }
                    memcpy(o, v, (size_t)len * sizeof(float));
                } else {
                    for (int k = 0; k < len; k++) o[k] = (float)(int8_t)rowq[j][k] * d;
                }
            }
        }
    }
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
    case XO_I8:
    case XO_I4:
        dequant_grouped(dst, w, row0, rows);
        break;
    default:
        memset(dst, 0, n * sizeof(float));
        break;
    }
}

size_t xo_cpu_weight_bytes(const xo_linear *w) {
    if (xo_cpu_grouped(w->dtype))
        return (size_t)xo_cpu_blocks(w->out) * xo_cpu_groups(w->in) * xo_cpu_group_bytes(w->dtype);
    return (size_t)w->out * w->in * xo_dtype_size(w->dtype);
}

size_t xo_cpu_scale_count(const xo_linear *w) {
    return xo_cpu_grouped(w->dtype) ? (size_t)xo_cpu_blocks(w->out) * XO_QROWS * xo_cpu_groups(w->in) : 0;
}
