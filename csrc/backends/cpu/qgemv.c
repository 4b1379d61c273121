/* Matrix-vector kernels of the grouped formats (int8, int4; layout in kernels.h) for few rows of
 * x (decode): y[i, r] = sum_g d_w[r, g] d_x[i, g] sum_{k in g} q_w[r, k] q_x[i, k].
 *
 * The activations are quantised once per product to int16 per group of 32 (xo_cpu_qx), shared
 * by every row of W, so a group's dot product is integer multiply-adds of 16-bit pairs
 * (pmaddwd) with one int32 -> float conversion and one multiply-add per group and row: far
 * fewer operations per weight byte than widening every weight to float32, which left the
 * float kernels bound by arithmetic rather than memory (benchmarks/RESULTS.md). int16 keeps the
 * activations' rounding (2^-16 of a group's largest magnitude) far below the weights'.
 * Rows are interleaved in blocks of 16, one 32-bit lane per row, so a block's 16 outputs leave
 * in one vector; each thread walks S blocks far apart at once (S sequential streams, software
 * prefetched) like the float kernels. int4 nibbles are stored as q + 8 and widened unsigned; the
 * +8 is taken off once per group through the activations' group sums.
 * Four builds: AVX-512 (F + BW) with and without VNNI, AVX2 and a portable one, chosen as in gemv.c. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XO_X86 1
#endif

#define ALWAYS static inline __attribute__((always_inline))

enum { PAIRS = XO_QGROUP / 2, PREFETCH_BYTES = 1024, MAX_M = 8 };

/* ------------------------------------------------------------------ activations */

/* groups [g0, g1) of one row of x: per group, d = max|x| / 32767 and q = round(x / d); a group
 * holding a NaN or an infinity gets d = NaN (its products come out NaN, as in float32), an
 * all-zero one d = 0. The pairs are the int16 q in memory order (little-endian: q[2p] low). */
XO_CLONES   /* rounding and division inline and vectorised, not a libm call per element */
static void quantize_x_groups(uint32_t *pair, float *d, int32_t *sum, const float *x, int K, int g0, int g1) {
    for (int g = g0; g < g1; g++) {
        const int k0 = g * XO_QGROUP, len = K - k0 < XO_QGROUP ? K - k0 : XO_QGROUP;
        float v[XO_QGROUP] = {0};
        for (int j = 0; j < len; j++) v[j] = x[k0 + j];
        float mx = 0.0f;
        int finite = 1;
        for (int j = 0; j < XO_QGROUP; j++) {
            const float a = fabsf(v[j]);
            finite &= a <= FLT_MAX;
            mx = a > mx ? a : mx;
        }
        int16_t q[XO_QGROUP] = {0};
        const float dg = mx / 32767.0f;
        int32_t s = 0;
        if (!finite) {
            d[g] = NAN;
        } else if (!(dg > 0.0f)) {
            d[g] = 0.0f;
        } else {
            d[g] = dg;
            for (int j = 0; j < XO_QGROUP; j++) {   /* the padding is 0 and stays 0 */
                float r = nearbyintf(v[j] / dg);
                r = r > 32767.0f ? 32767.0f : r < -32767.0f ? -32767.0f : r;
                q[j] = (int16_t)r;
                s += q[j];
            }
        }
        sum[g] = s;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(pair + (size_t)g * PAIRS, q, sizeof q);
#else
        for (int p = 0; p < PAIRS; p++)
            pair[(size_t)g * PAIRS + p] = (uint32_t)(uint16_t)q[2 * p] | (uint32_t)(uint16_t)q[2 * p + 1] << 16;
#endif
    }
}

/* groups [f0, f1) of the m x G groups of x, counted row by row */
static void quantize_x_span(const xo_cpu_qx *xq, const float *x, int K, int f0, int f1) {
    const int G = xq->G;
    for (int f = f0; f < f1;) {
        const int i = f / G, g0 = f - i * G, g1 = f1 - i * G < G ? f1 - i * G : G;
        quantize_x_groups((uint32_t *)xq->pair + (size_t)i * G * PAIRS, (float *)xq->d + (size_t)i * G,
                          (int32_t *)xq->sum + (size_t)i * G, x + (size_t)i * K, K, g0, g1);
        f += g1 - g0;
    }
}

/* the signed 16-bit halves of a pair */
ALWAYS int pair_lo(uint32_t v) { return (int)(v & 0xffff) - (int)((v & 0x8000) << 1); }
ALWAYS int pair_hi(uint32_t v) { return pair_lo(v >> 16); }

/* Block outputs: lane j is row 16 * blk + j; rows outside [row_lo, row_hi) are not stored. */
ALWAYS void store_rows(float *y, const float *v, int rs, int row_lo, int row_hi) {
    for (int j = 0; j < XO_QROWS; j++)
        if (rs + j >= row_lo && rs + j < row_hi) y[rs + j - row_lo] = v[j];
}

/* A thread's work: blocks [b0, b1) against x rows [0, m) (ldy between output rows). */
typedef void (*qblocks_fn)(float *y, size_t ldy, const xo_cpu_qx *xq, const xo_linear *w, int b0, int b1,
                           int row_lo, int row_hi);

/* ------------------------------------------------------------------ portable build */

static void qblocks_generic(float *y, size_t ldy, const xo_cpu_qx *xq, const xo_linear *w, int b0, int b1,
                            int row_lo, int row_hi) {
    const int G = xq->G, i4 = w->dtype == XO_I4;
    const size_t gb = xo_cpu_group_bytes(w->dtype);
    for (int blk = b0; blk < b1; blk++) {
        const uint8_t *base = (const uint8_t *)w->data + (size_t)blk * G * gb;
        const float *sc = w->scales + (size_t)blk * G * XO_QROWS;
        for (int i = 0; i < xq->m; i++) {
            const uint32_t *xp = xq->pair + (size_t)i * G * PAIRS;
            float acc[XO_QROWS] = {0};
            for (int g = 0; g < G; g++) {
                const uint8_t *piece = base + (size_t)g * gb;
                const uint32_t *xg = xp + (size_t)g * PAIRS;
                int32_t dot[XO_QROWS];
                for (int j = 0; j < XO_QROWS; j++) dot[j] = i4 ? -8 * xq->sum[(size_t)i * G + g] : 0;
                if (i4) {
                    for (int p = 0; p < PAIRS / 2; p++) {
                        const int xl0 = pair_lo(xg[p]), xl1 = pair_hi(xg[p]);
                        const int xh0 = pair_lo(xg[p + 8]), xh1 = pair_hi(xg[p + 8]);
                        for (int j = 0; j < XO_QROWS; j++) {
                            const uint8_t c0 = piece[p * 32 + 2 * j], c1 = piece[p * 32 + 2 * j + 1];
                            dot[j] += (c0 & 15) * xl0 + (c1 & 15) * xl1 + (c0 >> 4) * xh0 + (c1 >> 4) * xh1;
                        }
                    }
                } else {
                    for (int p = 0; p < PAIRS; p++) {
                        const int x0 = pair_lo(xg[p]), x1 = pair_hi(xg[p]);
                        for (int j = 0; j < XO_QROWS; j++)
                            dot[j] += (int8_t)piece[p * 32 + 2 * j] * x0 + (int8_t)piece[p * 32 + 2 * j + 1] * x1;
                    }
                }
                const float dx = xq->d[(size_t)i * G + g];
                for (int j = 0; j < XO_QROWS; j++) acc[j] += (float)dot[j] * (sc[(size_t)g * XO_QROWS + j] * dx);
            }
            store_rows(y + (size_t)i * ldy, acc, blk * XO_QROWS, row_lo, row_hi);
        }
    }
}

#ifdef XO_X86
/* ------------------------------------------------------------------ AVX2 build */

#define T_AVX2 __attribute__((target("avx2,fma")))

/* S blocks (blk, blk + stride, ...) against M x rows (from x row i0): per block and x row two
 * int32 accumulators (rows 0-7, 8-15) per group, two float32 ones across groups. */
T_AVX2 ALWAYS void qblk_avx2(float *y, size_t ldy, const xo_cpu_qx *xq, int i0, const xo_linear *w, int blk,
                             int stride, const int S, const int M, const int I4, int row_lo, int row_hi) {
    const int G = xq->G;
    const size_t gb = I4 ? 256 : 512, bb = (size_t)G * gb;
    const int P = I4 ? PAIRS / 2 : PAIRS;   /* 32-byte pieces per group */
    const char *W = (const char *)w->data;
    const uint32_t *xp = xq->pair + (size_t)i0 * G * PAIRS;
    __m256 facc[4][MAX_M][2];
    _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)
        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)
            facc[s][b][0] = facc[s][b][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i iacc[4][MAX_M][2];
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)
                iacc[s][b][0] = iacc[s][b][1] = I4 ? _mm256_set1_epi32(-8 * xq->sum[(size_t)(i0 + b) * G + g])
                                                   : _mm256_setzero_si256();
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {
            __m256i xl[MAX_M], xh[MAX_M];
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {
                const uint32_t *xg = xp + ((size_t)b * G + g) * PAIRS;
                xl[b] = _mm256_set1_epi32((int)xg[p]);
                if (I4) xh[b] = _mm256_set1_epi32((int)xg[p + 8]);
            }
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {
                const char *src = W + (size_t)(blk + s * stride) * bb + (size_t)g * gb + (size_t)p * 32;
                if (!(p & 1)) _mm_prefetch(src + PREFETCH_BYTES, _MM_HINT_T0);
                _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                    const __m128i raw = _mm_loadu_si128((const __m128i *)(src + 16 * h));
                    if (I4) {
                        const __m256i v = _mm256_cvtepu8_epi16(raw);
                        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
                        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {
                            iacc[s][b][h] = _mm256_add_epi32(iacc[s][b][h], _mm256_madd_epi16(lo, xl[b]));
                            iacc[s][b][h] = _mm256_add_epi32(iacc[s][b][h], _mm256_madd_epi16(hi, xh[b]));
                        }
                    } else {
                        const __m256i v = _mm256_cvtepi8_epi16(raw);
                        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)
                            iacc[s][b][h] = _mm256_add_epi32(iacc[s][b][h], _mm256_madd_epi16(v, xl[b]));
                    }
                }
            }
        }
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {
            const float *sc = w->scales + ((size_t)(blk + s * stride) * G + g) * XO_QROWS;
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {
                const __m256 dx = _mm256_set1_ps(xq->d[(size_t)(i0 + b) * G + g]);
                _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
                    facc[s][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[s][b][h]),
                                                    _mm256_mul_ps(_mm256_loadu_ps(sc + 8 * h), dx), facc[s][b][h]);
            }
        }
    }
    _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {
        const int rs = (blk + s * stride) * XO_QROWS;
        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {
            float v[XO_QROWS];
            _mm256_storeu_ps(v, facc[s][b][0]);
            _mm256_storeu_ps(v + 8, facc[s][b][1]);
            store_rows(y + (size_t)(i0 + b) * ldy, v, rs, row_lo, row_hi);
        }
    }
}

/* ------------------------------------------------------------------ AVX-512 (F + BW) build */

#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma")))

/* as qblk_avx2, one 16-lane accumulator per block and x row; DOT(acc, a, b) adds the pairwise
 * products of a and b to acc: pmaddwd + paddd, or one vpdpwssd with AVX-512 VNNI */
#define QBLK_AVX512(NAME, TARGET, DOT)                                                               \
TARGET ALWAYS void NAME(float *y, size_t ldy, const xo_cpu_qx *xq, int i0, const xo_linear *w, int blk,    \
                        int stride, const int S, const int M, const int I4, int row_lo, int row_hi) {        \
    const int G = xq->G;                                                                             \
    const size_t gb = I4 ? 256 : 512, bb = (size_t)G * gb;                                           \
    const int P = I4 ? PAIRS / 2 : PAIRS;   /* 32-byte pieces per group */                           \
    const char *W = (const char *)w->data;                                                           \
    const uint32_t *xp = xq->pair + (size_t)i0 * G * PAIRS;                                          \
    __m512 facc[4][MAX_M];                                                                           \
    _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)                                              \
        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) facc[s][b] = _mm512_setzero_ps();        \
    for (int g = 0; g < G; g++) {                                                                    \
        __m512i iacc[4][MAX_M];                                                                      \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                        \
            _mm_prefetch((const char *)(w->scales + ((size_t)(blk + s * stride) * G + g + 4) * XO_QROWS), _MM_HINT_T0); \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                                      \
                iacc[s][b] = I4 ? _mm512_set1_epi32(-8 * xq->sum[(size_t)(i0 + b) * G + g]) : _mm512_setzero_si512(); \
        }                                                                                            \
        _Pragma("GCC unroll 16") for (int p = 0; p < P; p++) {                                       \
            __m512i xl[MAX_M], xh[MAX_M];                                                            \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {                                    \
                const uint32_t *xg = xp + ((size_t)b * G + g) * PAIRS;                               \
                xl[b] = _mm512_set1_epi32((int)xg[p]);                                               \
                if (I4) xh[b] = _mm512_set1_epi32((int)xg[p + 8]);                                   \
            }                                                                                        \
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                    \
                const char *src = W + (size_t)(blk + s * stride) * bb + (size_t)g * gb + (size_t)p * 32; \
                if (!(p & 1)) _mm_prefetch(src + PREFETCH_BYTES, _MM_HINT_T0);                       \
                const __m256i raw = _mm256_loadu_si256((const __m256i *)src);                        \
                if (I4) {                                                                            \
                    const __m512i v = _mm512_cvtepu8_epi16(raw);                                     \
                    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(v, 4); \
                    _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {                            \
                        iacc[s][b] = DOT(iacc[s][b], lo, xl[b]);                                     \
                        iacc[s][b] = DOT(iacc[s][b], hi, xh[b]);                                     \
                    }                                                                                \
                } else {                                                                             \
                    const __m512i v = _mm512_cvtepi8_epi16(raw);                                     \
                    _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                              \
                        iacc[s][b] = DOT(iacc[s][b], v, xl[b]);                                      \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                        \
            const __m512 dw = _mm512_loadu_ps(w->scales + ((size_t)(blk + s * stride) * G + g) * XO_QROWS); \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                                      \
                facc[s][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[s][b]),                         \
                                             _mm512_mul_ps(dw, _mm512_set1_ps(xq->d[(size_t)(i0 + b) * G + g])), facc[s][b]); \
        }                                                                                            \
    }                                                                                                \
    _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                            \
        const int rs = (blk + s * stride) * XO_QROWS;                                                \
        _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {                                        \
            float *yb = y + (size_t)(i0 + b) * ldy;                                                  \
            if (rs >= row_lo && rs + XO_QROWS <= row_hi) {                                           \
                _mm512_storeu_ps(yb + (rs - row_lo), facc[s][b]);                                    \
            } else {                                                                                 \
                float v[XO_QROWS];                                                                   \
                _mm512_storeu_ps(v, facc[s][b]);                                                     \
                store_rows(yb, v, rs, row_lo, row_hi);                                               \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}

#define T_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
#define DOT_MADD(acc, a, b) _mm512_add_epi32((acc), _mm512_madd_epi16((a), (b)))
#define DOT_VNNI(acc, a, b) _mm512_dpwssd_epi32((acc), (a), (b))
QBLK_AVX512(qblk_avx512, T_AVX512, DOT_MADD)
QBLK_AVX512(qblk_avx512vnni, T_AVX512VNNI, DOT_VNNI)

/* Blocks [b0, b1) as S interleaved spans (the remainder one block at a time) for m <= 8 x rows,
 * in one pass over W; more x rows go in chunks of 8 over one block at a time (it stays in cache). */
#define QBLOCKS(NAME, BLK, I4, S1, S2, S4)                                                          \
    static void NAME(float *y, size_t ldy, const xo_cpu_qx *xq, const xo_linear *w, int b0, int b1, \
                     int row_lo, int row_hi) {                                                      \
        const int m = xq->m;                                                                        \
        if (m <= 4) {                                                                               \
            const int S = m == 1 ? (S1) : m == 2 ? (S2) : (S4);                                     \
            const int span = (b1 - b0) / S;                                                         \
            for (int i = 0; i < span; i++) {                                                        \
                const int blk = b0 + i;                                                             \
                switch (m * 8 + S) {                                                                \
                case 8 + 4: BLK(y, ldy, xq, 0, w, blk, span, 4, 1, I4, row_lo, row_hi); break;      \
                case 8 + 2: BLK(y, ldy, xq, 0, w, blk, span, 2, 1, I4, row_lo, row_hi); break;      \
                case 16 + 2: BLK(y, ldy, xq, 0, w, blk, span, 2, 2, I4, row_lo, row_hi); break;     \
                case 16 + 1: BLK(y, ldy, xq, 0, w, blk, span, 1, 2, I4, row_lo, row_hi); break;     \
                case 24 + 2: BLK(y, ldy, xq, 0, w, blk, span, 2, 3, I4, row_lo, row_hi); break;     \
                case 24 + 1: BLK(y, ldy, xq, 0, w, blk, span, 1, 3, I4, row_lo, row_hi); break;     \
                case 32 + 2: BLK(y, ldy, xq, 0, w, blk, span, 2, 4, I4, row_lo, row_hi); break;     \
                default: BLK(y, ldy, xq, 0, w, blk, span, 1, 4, I4, row_lo, row_hi); break;         \
                }                                                                                   \
            }                                                                                       \
            b0 += S * span;                                                                         \
        }                                                                                           \
        for (int blk = b0; blk < b1; blk++) {                                                       \
            for (int i0 = 0; i0 < m; i0 += MAX_M) {                                                 \
                switch (m - i0 < MAX_M ? m - i0 : MAX_M) {                                          \
                case 1: BLK(y, ldy, xq, i0, w, blk, 0, 1, 1, I4, row_lo, row_hi); break;            \
                case 2: BLK(y, ldy, xq, i0, w, blk, 0, 1, 2, I4, row_lo, row_hi); break;            \
                case 3: BLK(y, ldy, xq, i0, w, blk, 0, 1, 3, I4, row_lo, row_hi); break;            \
                case 4: BLK(y, ldy, xq, i0, w, blk, 0, 1, 4, I4, row_lo, row_hi); break;            \
                case 5: BLK(y, ldy, xq, i0, w, blk, 0, 1, 5, I4, row_lo, row_hi); break;            \
                case 6: BLK(y, ldy, xq, i0, w, blk, 0, 1, 6, I4, row_lo, row_hi); break;            \
                case 7: BLK(y, ldy, xq, i0, w, blk, 0, 1, 7, I4, row_lo, row_hi); break;            \
                default: BLK(y, ldy, xq, i0, w, blk, 0, 1, 8, I4, row_lo, row_hi); break;           \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

/* streams per x-row count (1, 2, 3-4): AVX2 has 16 registers, AVX-512 32 */
T_AVX2 QBLOCKS(qblocks_avx2_i8, qblk_avx2, 0, 2, 1, 1)
T_AVX2 QBLOCKS(qblocks_avx2_i4, qblk_avx2, 1, 2, 1, 1)
T_AVX512 QBLOCKS(qblocks_avx512_i8, qblk_avx512, 0, 4, 2, 2)
T_AVX512 QBLOCKS(qblocks_avx512_i4, qblk_avx512, 1, 4, 2, 2)
T_AVX512VNNI QBLOCKS(qblocks_avx512vnni_i8, qblk_avx512vnni, 0, 4, 2, 2)
T_AVX512VNNI QBLOCKS(qblocks_avx512vnni_i4, qblk_avx512vnni, 1, 4, 2, 2)
#endif /* XO_X86 */

/* ------------------------------------------------------------------ run-time choice */

static qblocks_fn pick(xo_dtype t, int isa) {
#ifdef XO_X86
    if (isa >= XO_ISA_AVX512VNNI) return t == XO_I4 ? qblocks_avx512vnni_i4 : qblocks_avx512vnni_i8;
    if (isa == XO_ISA_AVX512) return t == XO_I4 ? qblocks_avx512_i4 : qblocks_avx512_i8;
    if (isa == XO_ISA_AVX2) return t == XO_I4 ? qblocks_avx2_i4 : qblocks_avx2_i8;
#else
    (void)t;
    (void)isa;
#endif
    return qblocks_generic;
}

size_t xo_cpu_qx_bytes(int m, int K) {
    return (size_t)m * xo_cpu_groups(K) * (PAIRS * sizeof(uint32_t) + sizeof(float) + sizeof(int32_t));
}

static xo_cpu_qx qx_in(void *scratch, int m, int K) {
    const int G = xo_cpu_groups(K);
    uint32_t *pair = scratch;
    float *d = (float *)(pair + (size_t)m * G * PAIRS);
    int32_t *sum = (int32_t *)(d + (size_t)m * G);
    return (xo_cpu_qx){ .m = m, .G = G, .pair = pair, .d = d, .sum = sum };
}

void xo_cpu_qgemv_serial(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows, int isa,
                         void *scratch) {
    const xo_cpu_qx xq = qx_in(scratch, m, w->in);
    quantize_x_span(&xq, x, w->in, 0, m * xq.G);
    pick(w->dtype, isa)(y, ldy, &xq, w, row0 / XO_QROWS, xo_cpu_blocks(row0 + rows), row0, row0 + rows);
}

/* Groups of x below this are quantised by one thread: splitting them costs a barrier's wait. */
enum { SPLIT_QUANTISE_GROUPS = 96 };

xo_status xo_cpu_qgemv(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows, int isa) {
    const int K = w->in;
    void *buf = malloc(xo_cpu_qx_bytes(m, K) + 1);
    if (!buf) return xo_fail(XO_ENOMEM, "out of memory quantising a [%d, %d] product's activations", m, K);
    const xo_cpu_qx xq = qx_in(buf, m, K);
    const int groups = m * xq.G;
    const qblocks_fn fn = pick(w->dtype, isa);
    const int first = row0 / XO_QROWS, last = xo_cpu_blocks(row0 + rows), nb = last - first;
    const double work = (double)rows * K * m;
    #pragma omp parallel if (work > 65536.0)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        /* the activations first (in the team when there are many, a context's latents say),
         * then contiguous spans of blocks, one per thread, so each core streams its own part of W */
        if (nt > 1 && groups >= SPLIT_QUANTISE_GROUPS) {
            quantize_x_span(&xq, x, K, (int)((long)groups * id / nt), (int)((long)groups * (id + 1) / nt));
        } else if (id == 0) {
            quantize_x_span(&xq, x, K, 0, groups);
        }
        if (nt > 1) {
            #pragma omp barrier
        }
        const int per = (nb + nt - 1) / nt, b0 = first + id * per, b1 = b0 + per < last ? b0 + per : last;
        if (b0 < b1) fn(y, ldy, &xq, w, b0, b1, row0, row0 + rows);
    }
    free(buf);
    return XO_OK;
}
