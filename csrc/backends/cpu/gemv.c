/* Matrix-vector kernels for few rows of x (decode): y[i, r] = sum_k x[i, k] * W[r, k] with W
 * stored as bfloat16, float16 or float32, accumulated in float32 (int8 / int4: qgemv.c).
 *
 * Batch-1 decode streams every weight once per token, so these kernels are bound by memory
 * read bandwidth: each W element is loaded once, widened to float32 in registers and used for
 * every x row of the block (up to 8). For few x rows each thread walks 4 (or 2) widely separated
 * rows of its span at once, software-prefetched: with the weights on 2 MB pages that reads at
 * the machine's bandwidth where one stream per core, or adjacent rows, fall well short of it
 * (benchmarks/RESULTS.md).
 * Three builds of one template: AVX-512F, AVX2+FMA+F16C and a portable one; the best the CPU
 * supports is used unless the model's cpu_isa option caps it.
 * Threading: OpenMP over contiguous spans of output rows. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XO_X86 1
#endif

#define ALWAYS static inline __attribute__((always_inline))

/* Signature of one kernel: rows [r0, r1) of W [*, K] (elements of the storage dtype), m x rows
 * (m <= 8) ldx floats apart, outputs ldy floats apart. scales: NULL (the float formats carry none). */
typedef void (*gemv_block_fn)(float *y, size_t ldy, const float *x, size_t ldx, int m, int K,
                              const void *W, const float *scales, int r0, int r1);

/* ------------------------------------------------------------------ scalar element loads */

ALWAYS float sc_f32(const void *W, size_t i) { return ((const float *)W)[i]; }
ALWAYS float sc_bf16(const void *W, size_t i) { return xo_bf16_to_f32(((const uint16_t *)W)[i]); }
ALWAYS float sc_f16(const void *W, size_t i) { return xo_f16_to_f32(((const uint16_t *)W)[i]); }

/* ------------------------------------------------------------------ portable build */

/* each row widened once into a buffer, then one vectorisable dot product per x row */
#define GENERIC_KERNEL(NAME, SC)                                                                  \
    static void NAME(float *y, size_t ldy, const float *x, size_t ldx, int m, int K,              \
                     const void *W, const float *scales, int r0, int r1) {                        \
        float stack[1024];                                                                        \
        float *wr = K <= 1024 ? stack : malloc((size_t)K * sizeof *wr);                           \
        for (int r = r0; r < r1; r++) {                                                           \
            const size_t base = (size_t)r * K;                                                    \
            const float s = scales ? scales[r] : 1.0f;                                            \
            if (wr) {                                                                             \
                for (int k = 0; k < K; k++) wr[k] = SC(W, base + k);                              \
                for (int i = 0; i < m; i++) {                                                     \
                    const float *xi = x + (size_t)i * ldx;                                        \
                    float acc = 0.0f;                                                             \
                    _Pragma("omp simd reduction(+ : acc)")                                        \
                    for (int k = 0; k < K; k++) acc += wr[k] * xi[k];                             \
                    y[(size_t)i * ldy + r] = acc * s;                                             \
                }                                                                                 \
            } else {   /* no memory for the buffer: convert on the fly */                         \
                for (int i = 0; i < m; i++) {                                                     \
                    float acc = 0.0f;                                                             \
                    for (int k = 0; k < K; k++) acc += SC(W, base + k) * x[(size_t)i * ldx + k];  \
                    y[(size_t)i * ldy + r] = acc * s;                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        if (wr != stack) free(wr);                                                                \
    }

GENERIC_KERNEL(gemv_generic_f32, sc_f32)
GENERIC_KERNEL(gemv_generic_bf16, sc_bf16)
GENERIC_KERNEL(gemv_generic_f16, sc_f16)

enum { PREFETCH_BYTES = 1024 };   /* software prefetch distance along a row */

#ifdef XO_X86
/* ------------------------------------------------------------------ AVX2 + FMA (+F16C) build */

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))

T_AVX2 ALWAYS __m256 ld8_f32(const void *W, size_t i) { return _mm256_loadu_ps((const float *)W + i); }
T_AVX2 ALWAYS __m256 ld8_bf16(const void *W, size_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)W + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
T_AVX2 ALWAYS __m256 ld8_f16(const void *W, size_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + i)));
}
T_AVX2 ALWAYS float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* S rows of W (r, r + stride, ..., r + (S-1)*stride) against M x rows, U vectors per step:
 * S*M*U accumulators (S, M, U constants after inlining). The S rows lie far apart, so each
 * thread reads S independent sequential streams, each software-prefetched `pf` bytes ahead:
 * with 2 MB pages (backends/cpu/gemm.c) this reaches the machine's bandwidth, which one stream per
 * core (or several adjacent rows) does not. */
#define AVX2_BLOCK(NAME, LD8, SC, ESZ)                                                            \
    T_AVX2 ALWAYS void NAME(float *y, size_t ldy, const float *x, size_t ldx, int K, const void *W, \
                            const float *scales, int r, int stride, const int S, const int M,     \
                            const int U, size_t pf) {                                             \
        __m256 acc[4][8][2];                                                                      \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)                                       \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                                   \
                _Pragma("GCC unroll 2") for (int u = 0; u < U; u++) acc[s][b][u] = _mm256_setzero_ps(); \
        int k = 0;                                                                                \
        for (; k + 8 * U <= K; k += 8 * U) {                                                      \
            if ((((size_t)k * (ESZ)) & 63) < (size_t)(8 * U * (ESZ)))                             \
                _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)                               \
                    _mm_prefetch((const char *)W + ((size_t)(r + s * stride) * K + k) * (ESZ) + pf, _MM_HINT_T0); \
            _Pragma("GCC unroll 2") for (int u = 0; u < U; u++) {                                 \
                _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                             \
                    __m256 w = LD8(W, (size_t)(r + s * stride) * K + k + 8 * u);                  \
                    _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                           \
                        acc[s][b][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (size_t)b * ldx + k + 8 * u), acc[s][b][u]); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (; k + 8 <= K; k += 8) {                                                              \
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                 \
                __m256 w = LD8(W, (size_t)(r + s * stride) * K + k);                              \
                _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                               \
                    acc[s][b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (size_t)b * ldx + k), acc[s][b][0]); \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                     \
            const int rs = r + s * stride;                                                        \
            const float sc = scales ? scales[rs] : 1.0f;                                          \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {                                 \
                if (U > 1) acc[s][b][0] = _mm256_add_ps(acc[s][b][0], acc[s][b][U - 1]);          \
                float t = hsum8(acc[s][b][0]);                                                    \
                for (int kk = k; kk < K; kk++) t += SC(W, (size_t)rs * K + kk) * x[(size_t)b * ldx + kk]; \
                y[(size_t)b * ldy + rs] = t * sc;                                                 \
            }                                                                                     \
        }                                                                                         \
    }

/* rows [r0, r1) as S interleaved spans, the remainder one row at a time */
#define ROWS_LOOP(BLOCK, S, M, U)                                                                 \
    do {                                                                                          \
        const int span_ = (r1 - r0) / (S);                                                        \
        for (int i_ = 0; i_ < span_; i_++) BLOCK(y, ldy, x, ldx, K, W, scales, r0 + i_, span_, (S), (M), (U), pf); \
        for (int r_ = r0 + (S) * span_; r_ < r1; r_++) BLOCK(y, ldy, x, ldx, K, W, scales, r_, 0, 1, (M), (U), pf); \
    } while (0)

/* streams x rows x unroll: m = 1: 4x1x2; 2: 4x2x1; 3-4: 2xmx1; 5-8: 1xmx1 (compute-bound there) */
#define BLOCK_DISPATCH(BLOCK)                                                                     \
    const size_t pf = PREFETCH_BYTES;                                                             \
    switch (m) {                                                                                  \
    case 1: ROWS_LOOP(BLOCK, 4, 1, 2); break;                                                     \
    case 2: ROWS_LOOP(BLOCK, 4, 2, 1); break;                                                     \
    case 3: ROWS_LOOP(BLOCK, 2, 3, 1); break;                                                     \
    case 4: ROWS_LOOP(BLOCK, 2, 4, 1); break;                                                     \
    case 5: ROWS_LOOP(BLOCK, 1, 5, 1); break;                                                     \
    case 6: ROWS_LOOP(BLOCK, 1, 6, 1); break;                                                     \
    case 7: ROWS_LOOP(BLOCK, 1, 7, 1); break;                                                     \
    default: ROWS_LOOP(BLOCK, 1, 8, 1); break;                                                    \
    }

#define AVX2_KERNEL(NAME, BLOCK, LD8, SC, ESZ)                                                    \
    AVX2_BLOCK(BLOCK, LD8, SC, ESZ)                                                               \
    T_AVX2 static void NAME(float *y, size_t ldy, const float *x, size_t ldx, int m, int K,       \
                            const void *W, const float *scales, int r0, int r1) {                 \
        BLOCK_DISPATCH(BLOCK)                                                                     \
    }

AVX2_KERNEL(gemv_avx2_f32, blk_avx2_f32, ld8_f32, sc_f32, 4)
AVX2_KERNEL(gemv_avx2_bf16, blk_avx2_bf16, ld8_bf16, sc_bf16, 2)
AVX2_KERNEL(gemv_avx2_f16, blk_avx2_f16, ld8_f16, sc_f16, 2)

/* ------------------------------------------------------------------ AVX-512F build */

#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

T_AVX512 ALWAYS __m512 ld16_f32(const void *W, size_t i) { return _mm512_loadu_ps((const float *)W + i); }
T_AVX512 ALWAYS __m512 ld16_bf16(const void *W, size_t i) {
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
T_AVX512 ALWAYS __m512 ld16_f16(const void *W, size_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i)));
}
#define AVX512_BLOCK(NAME, LD16, SC, ESZ)                                                            \
    T_AVX512 ALWAYS void NAME(float *y, size_t ldy, const float *x, size_t ldx, int K, const void *W, \
                            const float *scales, int r, int stride, const int S, const int M,     \
                            const int U, size_t pf) {                                             \
        __m512 acc[4][8][2];                                                                      \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)                                       \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                                   \
                _Pragma("GCC unroll 2") for (int u = 0; u < U; u++) acc[s][b][u] = _mm512_setzero_ps(); \
        int k = 0;                                                                                \
        for (; k + 16 * U <= K; k += 16 * U) {                                                      \
            if ((((size_t)k * (ESZ)) & 63) < (size_t)(16 * U * (ESZ)))                             \
                _Pragma("GCC unroll 4") for (int s = 0; s < S; s++)                               \
                    _mm_prefetch((const char *)W + ((size_t)(r + s * stride) * K + k) * (ESZ) + pf, _MM_HINT_T0); \
            _Pragma("GCC unroll 2") for (int u = 0; u < U; u++) {                                 \
                _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                             \
                    __m512 w = LD16(W, (size_t)(r + s * stride) * K + k + 16 * u);                  \
                    _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                           \
                        acc[s][b][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (size_t)b * ldx + k + 16 * u), acc[s][b][u]); \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (; k + 16 <= K; k += 16) {                                                              \
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                 \
                __m512 w = LD16(W, (size_t)(r + s * stride) * K + k);                              \
                _Pragma("GCC unroll 8") for (int b = 0; b < M; b++)                               \
                    acc[s][b][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (size_t)b * ldx + k), acc[s][b][0]); \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                     \
            const int rs = r + s * stride;                                                        \
            const float sc = scales ? scales[rs] : 1.0f;                                          \
            _Pragma("GCC unroll 8") for (int b = 0; b < M; b++) {                                 \
                if (U > 1) acc[s][b][0] = _mm512_add_ps(acc[s][b][0], acc[s][b][U - 1]);          \
                float t = _mm512_reduce_add_ps(acc[s][b][0]);                                                    \
                for (int kk = k; kk < K; kk++) t += SC(W, (size_t)rs * K + kk) * x[(size_t)b * ldx + kk]; \
                y[(size_t)b * ldy + rs] = t * sc;                                                 \
            }                                                                                     \
        }                                                                                         \
    }

#define AVX512_KERNEL(NAME, BLOCK, LD16, SC, ESZ)                                                 \
    AVX512_BLOCK(BLOCK, LD16, SC, ESZ)                                                                \
    T_AVX512 static void NAME(float *y, size_t ldy, const float *x, size_t ldx, int m, int K,     \
                              const void *W, const float *scales, int r0, int r1) {               \
        BLOCK_DISPATCH(BLOCK)                                                                     \
    }

AVX512_KERNEL(gemv_avx512_f32, blk_avx512_f32, ld16_f32, sc_f32, 4)
AVX512_KERNEL(gemv_avx512_bf16, blk_avx512_bf16, ld16_bf16, sc_bf16, 2)
AVX512_KERNEL(gemv_avx512_f16, blk_avx512_f16, ld16_f16, sc_f16, 2)

/* Many x rows (m > 8: a context's latents, short prompts): the products are bound by arithmetic,
 * and widening each weight again for every few x rows, then reducing each output's 16 partial
 * sums, cost as much as the multiply-adds. Instead 16 rows of W at a time are widened once and
 * transposed into wt [K][16] floats (columns gathered in pairs), and each x row's 16 outputs
 * accumulate in one vector: per column one load of wt and one multiply-add per x row with the x
 * value broadcast. Sums run over spans of SPAN_COLS columns, then across spans, which keeps the
 * rounding of long rows near that of the vector-wide partial sums. */
enum { MANY_M = 14, SPAN_COLS = 64 };

/* wt[k][j] = W[r0 + j][k] (16-bit W) as float32 for j < rows (<= 16), 0 for the rest */
#define TRANSPOSE16(NAME, LO, HI, ONE)                                                               \
    T_AVX512 static void NAME(float *wt, const void *W, int K, int r0, int rows) {                  \
        const __mmask16 live = (__mmask16)((1u << rows) - 1u);                                       \
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, \
                                                                 14, 15), _mm512_set1_epi32(K));     \
        const char *base = (const char *)W + (size_t)r0 * K * 2;                                     \
        int k = 0;                                                                                   \
        for (; k + 2 <= K; k += 2) {   /* one 32-bit gather holds columns k and k + 1 */             \
            const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, base + (size_t)k * 2, 2); \
            _mm512_storeu_ps(wt + (size_t)k * 16, LO(v));                                            \
            _mm512_storeu_ps(wt + (size_t)(k + 1) * 16, HI(v));                                      \
        }                                                                                            \
        for (; k < K; k++) {   /* an odd last column */                                              \
            float col[16] = {0};                                                                     \
            for (int j = 0; j < rows; j++) col[j] = ONE(W, (size_t)(r0 + j) * K + k);                \
            _mm512_storeu_ps(wt + (size_t)k * 16, _mm512_loadu_ps(col));                             \
        }                                                                                            \
    }

T_AVX512 ALWAYS __m512 bf16_lo(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
T_AVX512 ALWAYS __m512 bf16_hi(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}
T_AVX512 ALWAYS __m512 f16_lo(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
T_AVX512 ALWAYS __m512 f16_hi(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))); }
TRANSPOSE16(transpose16_bf16, bf16_lo, bf16_hi, sc_bf16)
TRANSPOSE16(transpose16_f16, f16_lo, f16_hi, sc_f16)

/* y[b, r0 + j] = x[b] . W[r0 + j] for b < M (a constant after inlining), j < rows, from wt */
T_AVX512 ALWAYS void many_rows(float *y, size_t ldy, const float *x, size_t ldx, int K, const float *wt, int r0,
                               int rows, const int M) {
    __m512 total[MANY_M], acc[MANY_M];
    _Pragma("GCC unroll 14") for (int b = 0; b < M; b++) total[b] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += SPAN_COLS) {
        const int k1 = k0 + SPAN_COLS < K ? k0 + SPAN_COLS : K;
        _Pragma("GCC unroll 14") for (int b = 0; b < M; b++) acc[b] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m512 w = _mm512_loadu_ps(wt + (size_t)k * 16);
            _Pragma("GCC unroll 14") for (int b = 0; b < M; b++)
                acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)b * ldx + k]), w, acc[b]);
        }
        _Pragma("GCC unroll 14") for (int b = 0; b < M; b++) total[b] = _mm512_add_ps(total[b], acc[b]);
    }
    const __mmask16 live = (__mmask16)((1u << rows) - 1u);
    _Pragma("GCC unroll 14") for (int b = 0; b < M; b++) _mm512_mask_storeu_ps(y + (size_t)b * ldy + r0, live, total[b]);
}

/* rows [r0, r1) of W against all m x rows, wt: 16 * K floats of scratch */
typedef void (*transpose_fn)(float *wt, const void *W, int K, int r0, int rows);
T_AVX512 static void gemv_many_avx512(float *y, size_t ldy, const float *x, size_t ldx, int m, int K, const void *W,
                                      transpose_fn transpose, float *wt, int r0, int r1) {
    const int chunks = (m + MANY_M - 1) / MANY_M;
    for (int r = r0; r < r1; r += 16) {
        const int rows = r1 - r < 16 ? r1 - r : 16;
        transpose(wt, W, K, r, rows);
        for (int c = 0, i0 = 0; c < chunks; c++) {   /* x rows in near-equal chunks of at most MANY_M */
            const int mm = (m - i0) / (chunks - c);
            float *yc = y + (size_t)i0 * ldy;
            const float *xc = x + (size_t)i0 * ldx;
            switch (mm) {
#define MANY_CASE(N) case N: many_rows(yc, ldy, xc, ldx, K, wt, r, rows, N); break;
            MANY_CASE(1) MANY_CASE(2) MANY_CASE(3) MANY_CASE(4) MANY_CASE(5) MANY_CASE(6) MANY_CASE(7)
            MANY_CASE(8) MANY_CASE(9) MANY_CASE(10) MANY_CASE(11) MANY_CASE(12) MANY_CASE(13)
            default: many_rows(yc, ldy, xc, ldx, K, wt, r, rows, MANY_M); break;
#undef MANY_CASE
            }
            i0 += mm;
        }
    }
}

#endif /* XO_X86 */

/* ------------------------------------------------------------------ run-time choice */

static int detect_isa(void) {
#ifdef XO_X86
    __builtin_cpu_init();
    int best = XO_ISA_GENERIC;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = XO_ISA_AVX2;
    /* AVX-512 means F and BW (the grouped kernels' 16-bit products): every AVX-512 CPU but Xeon Phi */
    if (best == XO_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = XO_ISA_AVX512;
    if (best == XO_ISA_AVX512 && __builtin_cpu_supports("avx512vnni")) best = XO_ISA_AVX512VNNI;
    if (best == XO_ISA_AVX512VNNI && xo_cpu_amx_available()) best = XO_ISA_AMX;
    return best;
#else
    return XO_ISA_GENERIC;
#endif
}

int xo_cpu_best_isa(void) {
    static int best = -1;  /* detected once; every thread finds the same value */
    int v = __atomic_load_n(&best, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_isa();
        __atomic_store_n(&best, v, __ATOMIC_RELAXED);
    }
    return v;
}

const char *xo_cpu_isa_name(int level) {
    return level == XO_ISA_AMX ? "amx" : level == XO_ISA_AVX512VNNI ? "avx512vnni" : level == XO_ISA_AVX512 ? "avx512" : level == XO_ISA_AVX2 ? "avx2"
                                                                                                   : "generic";
}

static gemv_block_fn pick(xo_dtype t, int isa) {
#ifdef XO_X86
    if (isa >= XO_ISA_AVX512) {   /* the float formats have no VNNI variant */
        switch (t) {
        case XO_F32: return gemv_avx512_f32;
        case XO_BF16: return gemv_avx512_bf16;
        case XO_F16: return gemv_avx512_f16;
        default: return NULL;
        }
    }
    if (isa == XO_ISA_AVX2) {
        switch (t) {
        case XO_F32: return gemv_avx2_f32;
        case XO_BF16: return gemv_avx2_bf16;
        case XO_F16: return gemv_avx2_f16;
        default: return NULL;
        }
    }
#else
    (void)isa;
#endif
    switch (t) {
    case XO_F32: return gemv_generic_f32;
    case XO_BF16: return gemv_generic_bf16;
    case XO_F16: return gemv_generic_f16;
    default: return NULL;
    }
}

void xo_cpu_gemv(float *y, const float *x, int m, const xo_linear *w, int isa) {
    const gemv_block_fn fn = pick(w->dtype, isa);
    const int out = w->out, K = w->in;
    const float *scales = NULL;
    const double work = (double)out * K * m;
    /* AVX-512, many x rows: each thread's transposed block of W (without the memory, the
     * path below, which needs none) */
    float *wt = NULL;
#ifdef XO_X86
    transpose_fn transpose = NULL;
    if (m > 8 && isa >= XO_ISA_AVX512 && (w->dtype == XO_BF16 || w->dtype == XO_F16)) {
        transpose = w->dtype == XO_BF16 ? transpose16_bf16 : transpose16_f16;
        wt = malloc((size_t)omp_get_max_threads() * 16 * K * sizeof *wt);
    }
#endif
    #pragma omp parallel if (work > 65536.0)
    {
        /* one contiguous span of rows per thread, so each core streams its own part of W */
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = (out + nt - 1) / nt;
        per = wt ? (per + 15) & ~15 : (per + 3) & ~3;
        const int r0 = id * per, r1 = r0 + per < out ? r0 + per : out;
        if (m <= 8) {
            if (r0 < r1) fn(y, (size_t)out, x, (size_t)K, m, K, w->data, scales, r0, r1);
#ifdef XO_X86
        } else if (wt) {
            if (r0 < r1)
                gemv_many_avx512(y, (size_t)out, x, (size_t)K, m, K, w->data, transpose,
                                 wt + (size_t)id * 16 * K, r0, r1);
#endif
        } else {
            /* more than 8 x rows (AVX2, portable): blocks of 32 W rows stay in cache while groups of 4 x rows
             * pass over them (2 W rows x 4 x rows per step: 6 loads per 8 FMAs; 4 rows of x stay
             * in L1 up to in = 2048), so W is read from memory once, as fast as sgemm up to
             * m ~ 40. (Widening each 32-row block to float32 first, then running the float32
             * kernel, was slower: benchmarks/RESULTS.md.) */
            const int rb = 32, xg = 4;
            for (int b0 = r0; b0 < r1; b0 += rb) {
                const int b1 = b0 + rb < r1 ? b0 + rb : r1;
                for (int i0 = 0; i0 < m; i0 += xg) {
                    const int mm = m - i0 < xg ? m - i0 : xg;
                    fn(y + (size_t)i0 * out, (size_t)out, x + (size_t)i0 * K, (size_t)K, mm, K, w->data, scales, b0, b1);
                }
            }
        }
    }
    free(wt);
}
