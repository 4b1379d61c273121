/* Matrix products on AMX tiles (AMX-BF16: Intel Sapphire Rapids and later) for products of more
 * rows of x than the matrix-vector kernels serve: prefill, and with bfloat16 weights the latent
 * cache's key expansion in decode (one row per cached key).
 *
 * The tiles multiply bfloat16 pairs into float32 sums. x is split into bfloat16 hi + lo
 * (x - hi - lo within 2^-17 |x|), and both halves go through the product, so x is carried about
 * as exactly as the int16 activations of the matrix-vector kernels (or exactly when it came from
 * a bfloat16 cache: lo is then zero and its product is skipped). The weights go in exactly:
 * bfloat16 as stored, int8 / int4 as their integers (exact in bfloat16), each group's float32
 * tile sum times the group's scale, accumulated in float32.
 *
 * Grouped weights (int8, int4) are already stored in the tiles' pair layout (kernels.h: a block's
 * group is 16 k-pairs x 16 rows x 2), so they are the B operand, widened to bfloat16 a block at a
 * time, with x's rows as A. Row-major bfloat16 weights are the A operand instead (a tile is 16
 * rows of W straight from memory) and x, laid out as pairs, is B: the tile then holds y
 * transposed, which is transposed back on the way out. Threading: OpenMP over blocks of 16
 * output rows. */
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

/* the AMX intrinsics and __builtin_cpu_supports("amx-*") came with GCC 11 and clang 12 */
#if defined(__x86_64__) && defined(__linux__) && \
    (defined(__clang__) ? __clang_major__ >= 12 : (defined(__GNUC__) && __GNUC__ >= 11))
#define XO_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { TILE = 16,            /* rows of a tile, and float32 columns of a result tile */
       KSTEP = 32,           /* bfloat16 of k per tile row: one weight group */
       PANEL_ROWS = 512 };   /* rows of x split and laid out at a time (bounds the scratch) */

int xo_cpu_amx_dtype(xo_dtype t) { return t == XO_BF16 || t == XO_I8 || t == XO_I4; }

#ifdef XO_AMX

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

static int probe(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw"))
        return 0;
    /* Linux hands out the tile state only to a process that asks for it (once, for every thread) */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int xo_cpu_amx_available(void) {
    static int avail = -1;
    int v = __atomic_load_n(&avail, __ATOMIC_RELAXED);
    if (v < 0) {
        v = probe();
        __atomic_store_n(&avail, v, __ATOMIC_RELAXED);
    }
    return v;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* every tile 16 rows x 64 bytes (palette 1); a constant, since the compiler does not see
 * ldtilecfg read its operand and would drop stores into a local one */
static const tile_config TILES_16X64 __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = { 64, 64, 64, 64, 64, 64, 64, 64 },
    .rows = { TILE, TILE, TILE, TILE, TILE, TILE, TILE, TILE },
};

AMX_TARGET static void tiles_on(void) { _tile_loadconfig(&TILES_16X64); }

AMX_TARGET static void tiles_off(void) { _tile_release(); }

/* bfloat16 bits of x (round to nearest even), and of the remainder x - hi (0 when x is not finite,
 * so that an infinity stays one); returns nonzero if any remainder is nonzero. n floats. */
AMX_TARGET static int split_row(uint16_t *hi, uint16_t *lo, const float *x, int n) {
    __m512i any = _mm512_setzero_si512();
    int k = 0;
    for (; k < n; k += 16) {
        const __mmask16 mk = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(mk, x + k);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        const __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
        const __m512 r = _mm512_maskz_sub_ps(finite, v, hv);
        const __m256i l = (__m256i)_mm512_cvtneps_pbh(r);
        any = _mm512_or_si512(any, _mm512_castsi256_si512(l));
        _mm256_mask_storeu_epi16(hi + k, mk, h);
        _mm256_mask_storeu_epi16(lo + k, mk, l);
    }
    return _mm512_test_epi32_mask(any, any) != 0;
}

/* ------------------------------------------------------------------ int8 / int4: x as A, W as B */

/* bfloat16 bits of n - 8 for the int4 nibble n (twice: vpermw takes 32 entries) */
static const uint16_t I4_BF16[32] __attribute__((aligned(64))) = {
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
};

/* one block's group of W (16 k-pairs x 16 rows x 2, kernels.h) widened to a bfloat16 B tile */
AMX_TARGET static void widen_group(uint16_t *dst, const uint8_t *src, xo_dtype t) {
    if (t == XO_I4) {  /* piece p: low nibbles are k-pair p, high nibbles k-pair 8 + p; value - 8 */
        const __m512i table = _mm512_loadu_si512(I4_BF16);
        const __m512i low4 = _mm512_set1_epi16(0x0F);
        for (int p = 0; p < 8; p++) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + 32 * p)));
            _mm512_storeu_si512(dst + 32 * p, _mm512_permutexvar_epi16(_mm512_and_si512(w, low4), table));
            _mm512_storeu_si512(dst + 32 * (8 + p), _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table));
        }
    } else {            /* piece p is k-pair p already */
        for (int p = 0; p < 16; p++) {
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(src + 32 * p)));
            const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w)));
            const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1)));
            _mm512_storeu_si512(dst + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
        }
    }
}

/* y rows [0, 16) of a tile = sum_g cg[g] * scale[g] (cg: each group's 16 x 16 result tile, the
 * scales 16 floats per group); a pass of its own after the tiles are stored, so the loads never
 * wait on a tile store just issued and the 16 sums stay in registers. */
__attribute__((target("avx512f"))) static void scale_groups(float *out, const float *cg, const float *scale, int G) {
    __m512 acc[TILE];
    for (int r = 0; r < TILE; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const __m512 s = _mm512_loadu_ps(scale + (size_t)g * TILE);
        const float *c = cg + (size_t)g * TILE * TILE;
        for (int r = 0; r < TILE; r++) acc[r] = _mm512_fmadd_ps(_mm512_load_ps(c + TILE * r), s, acc[r]);
    }
    for (int r = 0; r < TILE; r++) _mm512_store_ps(out + TILE * r, acc[r]);
}

enum { BLOCKS_AT_ONCE = 3 };   /* W blocks sharing each x tile load: tiles x hi, x lo, then W and C per block */

/* every group's result tile of one x tile (xt: per group its hi tile then its lo tile, 1 KB each,
 * so the loads walk memory in order) against nblk (1-3) widened blocks wb[], into cg[block][group];
 * x, the larger operand, is loaded once for all of them */
AMX_TARGET static void group_tiles(float *cg, const uint16_t *xt, int has_lo, const uint16_t *wb, int G, int nblk) {
    const size_t wstep = (size_t)G * TILE * KSTEP, cstep = (size_t)G * TILE * TILE;
    for (int g = 0; g < G; g++) {
        const size_t wo = (size_t)g * TILE * KSTEP, co = (size_t)g * TILE * TILE;
        _tile_loadd(0, xt + (size_t)(2 * g) * TILE * KSTEP, 64);
        if (has_lo) _tile_loadd(1, xt + (size_t)(2 * g + 1) * TILE * KSTEP, 64);
        _tile_zero(3);
        _tile_loadd(2, wb + wo, 64);
        _tile_dpbf16ps(3, 0, 2);
        if (has_lo) _tile_dpbf16ps(3, 1, 2);
        if (nblk > 1) {
            _tile_zero(5);
            _tile_loadd(4, wb + wstep + wo, 64);
            _tile_dpbf16ps(5, 0, 4);
            if (has_lo) _tile_dpbf16ps(5, 1, 4);
        }
        if (nblk > 2) {
            _tile_zero(7);
            _tile_loadd(6, wb + 2 * wstep + wo, 64);
            _tile_dpbf16ps(7, 0, 6);
            if (has_lo) _tile_dpbf16ps(7, 1, 6);
        }
        _tile_stored(3, cg + co, 64);
        if (nblk > 1) _tile_stored(5, cg + cstep + co, 64);
        if (nblk > 2) _tile_stored(7, cg + 2 * cstep + co, 64);
    }
}

/* y columns [row0, row1) of blocks [b0, b1) for the panel's mp rows (m of them real); xt: the
 * panel's x tiles (split_row_tiles); scratch: BLOCKS_AT_ONCE blocks' G widened groups, then their G
 * result tiles. */
AMX_TARGET static void grouped_blocks(float *y, size_t ldy, const uint16_t *xt, int has_lo, int mp, int m,
                                      const xo_linear *w, int b0, int b1, int row0, int row1, void *scratch) {
    const int G = xo_cpu_groups(w->in);
    const size_t gbytes = xo_cpu_group_bytes(w->dtype);
    const size_t wstep = (size_t)G * TILE * KSTEP, cstep = (size_t)G * TILE * TILE;
    uint16_t *wb = scratch;
    float *cg = (float *)(wb + BLOCKS_AT_ONCE * wstep);
    float v[TILE * TILE] __attribute__((aligned(64)));
    for (int bb = b0; bb < b1; bb += BLOCKS_AT_ONCE) {
        const int nblk = b1 - bb < BLOCKS_AT_ONCE ? b1 - bb : BLOCKS_AT_ONCE;
        for (int k = 0; k < nblk; k++) {
            const uint8_t *blk = (const uint8_t *)w->data + (size_t)(bb + k) * G * gbytes;
            for (int g = 0; g < G; g++) widen_group(wb + k * wstep + (size_t)g * TILE * KSTEP, blk + g * gbytes, w->dtype);
        }
        for (int i0 = 0; i0 < mp; i0 += TILE) {
            group_tiles(cg, xt + (size_t)(i0 / TILE) * 2 * wstep, has_lo, wb, G, nblk);
            for (int k = 0; k < nblk; k++) {
                const int b = bb + k, n0 = b * TILE;
                const int j0 = row0 > n0 ? row0 - n0 : 0, j1 = row1 < n0 + TILE ? row1 - n0 : TILE;
                scale_groups(v, cg + k * cstep, w->scales + (size_t)b * G * TILE, G);
                for (int r = 0; r < TILE && i0 + r < m; r++)   /* columns n0 + j0 .. n0 + j1 of row i0 + r */
                    memcpy(y + (size_t)(i0 + r) * ldy + n0 + j0 - row0, v + TILE * r + j0, (size_t)(j1 - j0) * sizeof(float));
            }
        }
    }
}

/* row i of the panel, split, straight into its A tiles (grouped W): group g's hi tile at
 * xt + 2 (t G + g) 512 for the panel's tile t = i / 16, its lo tile right after (16 rows x 32
 * bfloat16 each, row-major); x NULL for a padding row. Returns nonzero if any lo is nonzero. */
AMX_TARGET static int split_row_tiles(uint16_t *xt, const float *x, int i, int K, int G) {
    const int t = i / TILE, r = i % TILE;
    int any = 0;
    for (int g = 0; g < G; g++) {
        uint16_t *dh = xt + (size_t)(2 * ((size_t)t * G + g)) * TILE * KSTEP + r * KSTEP, *dl = dh + TILE * KSTEP;
        memset(dh, 0, KSTEP * sizeof(uint16_t));
        memset(dl, 0, KSTEP * sizeof(uint16_t));
        if (x) any |= split_row(dh, dl, x + (size_t)g * KSTEP, K - g * KSTEP < KSTEP ? K - g * KSTEP : KSTEP);
    }
    return any;
}

/* ------------------------------------------------------------------ bfloat16: W as A, x as B */

/* x's rows [i0, i0 + 16) of the panel as B tiles: pair p of group g of row i at
 * bx[((t * G + g) * 16 + p) * 16 + i - i0] for the panel's tile t (32-bit pairs). */
AMX_TARGET static void pair_layout(uint32_t *bx, const uint16_t *xh, int Kp, int t, int G) {
    const uint32_t *src = (const uint32_t *)(xh + (size_t)t * TILE * Kp);
    const int pairs = Kp / 2;
    for (int g = 0; g < G; g++) {
        uint32_t *dst = bx + ((size_t)t * G + g) * TILE * TILE;
        for (int p = 0; p < TILE; p++)
            for (int i = 0; i < TILE; i++) dst[p * TILE + i] = src[(size_t)i * pairs + g * TILE + p];
    }
}

/* y^T tile (16 output columns n x 16 rows of x) from W rows [n0, n0 + 16) against x tile t of the
 * panel, transposed into y. W rows or k past the matrix come from a zero-padded copy. */
AMX_TARGET static void bf16_blocks(float *y, size_t ldy, const uint32_t *bh, const uint32_t *bl, int has_lo, int mp,
                                   int m, int G, const xo_linear *w, int b0, int b1, int row0, int row1, uint16_t *pad) {
    const int K = w->in, out = w->out;
    const uint16_t *W = (const uint16_t *)w->data;
    const size_t wstride = (size_t)K * sizeof(uint16_t);
    float c0[TILE * TILE] __attribute__((aligned(64))), c1[TILE * TILE] __attribute__((aligned(64)));
    for (int b = b0; b < b1; b++) {
        const int n0 = b * TILE, nrows = out - n0 < TILE ? out - n0 : TILE;
        /* groups whose tile lies inside W are read in place, the others from the padded copy */
        const int inside = nrows == TILE ? K / KSTEP : 0;
        for (int g = inside; g < G; g++) {
            uint16_t *dst = pad + (size_t)(g - inside) * TILE * KSTEP;
            memset(dst, 0, (size_t)TILE * KSTEP * sizeof(uint16_t));
            const int k0 = g * KSTEP, kn = K - k0 < KSTEP ? K - k0 : KSTEP;
            for (int r = 0; r < nrows; r++)
                memcpy(dst + (size_t)r * KSTEP, W + (size_t)(n0 + r) * K + k0, (size_t)kn * sizeof(uint16_t));
        }
        const int j0 = row0 > n0 ? row0 - n0 : 0, j1 = row1 < n0 + TILE ? row1 - n0 : TILE;
        for (int t = 0; t * TILE < mp; t++) {
            const uint32_t *xh = bh + (size_t)t * G * TILE * TILE, *xl = bl + (size_t)t * G * TILE * TILE;
            _tile_zero(4);
            _tile_zero(5);
            for (int g = 0; g < G; g++) {  /* even groups into tile 4, odd into 5: two chains in flight */
                const uint16_t *a = g < inside ? W + (size_t)n0 * K + (size_t)g * KSTEP : pad + (size_t)(g - inside) * TILE * KSTEP;
                const size_t as = g < inside ? wstride : KSTEP * sizeof(uint16_t);
                if (g & 1) {
                    _tile_loadd(1, a, as);
                    _tile_loadd(3, xh + (size_t)g * TILE * TILE, 64);
                    _tile_dpbf16ps(5, 1, 3);
                    if (has_lo) {
                        _tile_loadd(7, xl + (size_t)g * TILE * TILE, 64);
                        _tile_dpbf16ps(5, 1, 7);
                    }
                } else {
                    _tile_loadd(0, a, as);
                    _tile_loadd(2, xh + (size_t)g * TILE * TILE, 64);
                    _tile_dpbf16ps(4, 0, 2);
                    if (has_lo) {
                        _tile_loadd(6, xl + (size_t)g * TILE * TILE, 64);
                        _tile_dpbf16ps(4, 0, 6);
                    }
                }
            }
            _tile_stored(4, c0, 64);
            _tile_stored(5, c1, 64);
            const int rows = m - t * TILE < TILE ? m - t * TILE : TILE;
            for (int j = j0; j < j1; j++) {   /* c[j][i]: output column n0 + j of row t * 16 + i */
                float *yc = y + (size_t)t * TILE * ldy + n0 + j - row0;
                for (int i = 0; i < rows; i++) yc[(size_t)i * ldy] = c0[j * TILE + i] + c1[j * TILE + i];
            }
        }
    }
}

/* ------------------------------------------------------------------ entry point */

xo_status xo_cpu_amx_matmul(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows) {
    if (!xo_cpu_amx_dtype(w->dtype) || !xo_cpu_amx_available())
        return xo_fail(XO_EUNSUPPORTED, "AMX product of %s weights on a CPU without AMX-BF16", xo_dtype_name(w->dtype));
    if (m <= 0 || rows <= 0) return XO_OK;
    const int K = w->in, G = (K + KSTEP - 1) / KSTEP, Kp = G * KSTEP;
    const int grouped = xo_cpu_grouped(w->dtype);
    const int first = row0 / TILE, last = (row0 + rows + TILE - 1) / TILE, nb = last - first;
    const int panel = m < PANEL_ROWS ? m : PANEL_ROWS, pp = (panel + TILE - 1) / TILE * TILE;
    const size_t xbytes = (size_t)pp * Kp * sizeof(uint16_t);
    /* grouped W: x split (hi, lo) straight into A tiles (xt); bfloat16 W: x split row-major (xh,
     * xl), then laid out as B tiles (bh, bl) */
    char *shared = malloc((grouped ? 2 : 4) * xbytes + 64);
    if (!shared) return xo_fail(XO_ENOMEM, "out of memory for a [%d, %d] AMX product's activations", m, K);
    uint16_t *xt = (uint16_t *)shared, *xh = xt, *xl = xh + (size_t)pp * Kp;
    uint32_t *bh = grouped ? NULL : (uint32_t *)(xl + (size_t)pp * Kp), *bl = grouped ? NULL : bh + (size_t)pp * Kp / 2;
    int failed = 0;
    for (int p0 = 0; p0 < m; p0 += PANEL_ROWS) {
        const int pm = m - p0 < PANEL_ROWS ? m - p0 : PANEL_ROWS, mp = (pm + TILE - 1) / TILE * TILE;
        int has_lo = 0;
        const double work = (double)pm * rows * K;
        #pragma omp parallel if (work > 65536.0)
        {
            int mine = 0;
            #pragma omp for schedule(static) nowait
            for (int i = 0; i < mp; i++) {
                const float *row = i < pm ? x + (size_t)(p0 + i) * K : NULL;
                if (grouped) {
                    mine |= split_row_tiles(xt, row, i, K, G);
                    continue;
                }
                uint16_t *h = xh + (size_t)i * Kp, *l = xl + (size_t)i * Kp;
                memset(h, 0, (size_t)Kp * sizeof(uint16_t));
                memset(l, 0, (size_t)Kp * sizeof(uint16_t));
                if (row) mine |= split_row(h, l, row, K);
            }
            if (mine) {
                #pragma omp atomic write
                has_lo = 1;
            }
            #pragma omp barrier
            if (!grouped) {
                #pragma omp for schedule(static)
                for (int t = 0; t < mp / TILE; t++) {
                    pair_layout(bh, xh, Kp, t, G);
                    pair_layout(bl, xl, Kp, t, G);
                }
            }
            int lo;
            #pragma omp atomic read
            lo = has_lo;
            /* each thread its span of blocks (the barriers above have x laid out) */
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
            const int per = (nb + nt - 1) / nt, b0 = first + id * per, b1 = b0 + per < last ? b0 + per : last;
            if (b0 < b1) {
                /* grouped: a few blocks' G widened groups and G result tiles; bfloat16: G padded W tiles */
                const size_t per_block = (size_t)G * TILE * (KSTEP * sizeof(uint16_t) + TILE * sizeof(float));
                uint16_t *scratch = aligned_alloc(64, grouped ? BLOCKS_AT_ONCE * per_block
                                                              : (size_t)G * TILE * KSTEP * sizeof(uint16_t));
                if (!scratch) {
                    #pragma omp atomic write
                    failed = 1;
                } else {
                    tiles_on();
                    float *yp = y + (size_t)p0 * ldy;
                    if (grouped)
                        grouped_blocks(yp, ldy, xt, lo, mp, pm, w, b0, b1, row0, row0 + rows, scratch);
                    else
                        bf16_blocks(yp, ldy, bh, bl, lo, mp, pm, G, w, b0, b1, row0, row0 + rows, scratch);
                    tiles_off();
                    free(scratch);
                }
            }
        }
        if (failed) break;
    }
    free(shared);
    if (failed) return xo_fail(XO_ENOMEM, "out of memory in a [%d, %d] x [%d, %d]^T AMX product", m, K, rows, K);
    return XO_OK;
}

#else  /* not x86-64 Linux, or a compiler without AMX */

int xo_cpu_amx_available(void) { return 0; }

xo_status xo_cpu_amx_matmul(float *y, size_t ldy, const float *x, int m, const xo_linear *w, int row0, int rows) {
    (void)y, (void)ldy, (void)x, (void)m, (void)row0, (void)rows;
    return xo_fail(XO_EUNSUPPORTED, "AMX product of %s weights: not built for this CPU", xo_dtype_name(w->dtype));
}

#endif
