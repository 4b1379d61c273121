/* Causal attention over the cache on the CPU, in key chunks with an online softmax:
 * memory is O(tokens * heads * head_dim) whatever the sequence length, never O(t^2).
 * With the latent cache each key chunk is expanded (c @ Wkvb.T, then K rotated) once and
 * shared by every query and head. For a few new tokens (decode) only K is expanded: since
 * V_j = Wv c_j, the weighted sum of values is Wv (sum_j p_j c_j), so each head accumulates
 * latents (r floats) and applies Wv once at the end -- the V half of the expansion, which
 * grows with the context, is skipped. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

enum { KEY_CHUNK = 256 };
enum { TILE_ROWS = 4 };        /* query rows that share each key load in a prefill tile */
enum { SCORE_BLOCK = 32 };     /* keys per register block of the score product */
enum { PV_COLUMNS = 32 };      /* output columns per register block of the value product */


/* exp(x) for x <= 0 as a loop the compiler vectorises (expf is a call per element): n = rint(x /
 * ln2) by the round-to-nearest of adding 1.5 * 2^23, r = x - n ln2 in two parts, e^r by its
 * degree-6 Taylor polynomial (|r| <= ln2 / 2, error under 2e-7 relative), times 2^n built in the
 * exponent bits. Inputs are clamped to [-87, 0] (below -87 the weight is 0 beside the row's largest,
 * 1); NaN is returned as it came. No branches, so the loop stays vectorised. */
static inline float exp_nonpositive(float x) {
    float y = x < -87.0f ? -87.0f : x;
    y = y > 0.0f ? 0.0f : y;
    y = x != x ? 0.0f : y;
    const float shifted = y * 1.44269504088896341f + 12582912.0f;
    const float n = shifted - 12582912.0f;
    const float r = (y - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float e = 1.0f / 720.0f;
    e = e * r + 1.0f / 120.0f;
    e = e * r + 1.0f / 24.0f;
    e = e * r + 1.0f / 6.0f;
    e = e * r + 0.5f;
    e = e * r + 1.0f;
    e = e * r + 1.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;  /* the low bits of shifted hold n, in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x != x ? x : e * scale;
}


/* One query row against keys [j0, jend) of one chunk: updates (m, l, acc). Key rows are
 * k_stride floats apart; value rows (width floats: V, or the latent c) are v_stride apart. */
XO_CLONES
static void attend_chunk(const float *qv, const float *kbase, size_t k_stride, const float *vbase, size_t v_stride,
                         int width, const uint8_t *mask, int j0, int jend, int hd, float scale,
                         float *m, float *l, float *acc) {
    float s[KEY_CHUNK];
    float mloc = -INFINITY;
    for (int j = j0; j < jend; j++) {
        if (!mask[j]) { s[j - j0] = -INFINITY; continue; }
        const float *kv = kbase + (size_t)(j - j0) * k_stride;
        float d = 0.0f;
        #pragma omp simd reduction(+ : d)
        for (int x = 0; x < hd; x++) d += qv[x] * kv[x];
        s[j - j0] = d * scale;
        mloc = s[j - j0] > mloc ? s[j - j0] : mloc;
    }
    if (mloc == -INFINITY) return;
    float mnew = *m > mloc ? *m : mloc;
    float corr = *m == -INFINITY ? 0.0f : expf(*m - mnew);
    float lsum = *l * corr;
    #pragma omp simd
    for (int x = 0; x < width; x++) acc[x] *= corr;
    for (int j = j0; j < jend; j++) {
        if (s[j - j0] == -INFINITY) continue;
        float p = expf(s[j - j0] - mnew);
        lsum += p;
        const float *vv = vbase + (size_t)(j - j0) * v_stride;
        #pragma omp simd
        for (int x = 0; x < width; x++) acc[x] += p * vv[x];
    }
    *m = mnew;
    *l = lsum;
}

/* p[j] = exp(p[j] - max) for the keys a row sees (j < end, valid[j]), 0 for the others, up to nb;
 * returns their sum. */
XO_CLONES
static float softmax_weights(float *restrict p, const float *restrict valid, int end, int nb, float max) {
    float sum = 0.0f;
    #pragma omp simd reduction(+ : sum)
    for (int j = 0; j < nb; j++) {
        const float e = exp_nonpositive(p[j] - max);
        const float w = (j < end) & (valid[j] != 0.0f) ? e : 0.0f;
        p[j] = w;
        sum += w;
    }
    return sum;
}

/* TILE_ROWS query rows of one head against one chunk's keys, so that each key is loaded once for
 * the whole tile (attend_chunk loads it once per row). kt: the keys of this head's group
 * transposed, kt[x * KEY_CHUNK + j], zero past the chunk's length; valid[j]: key j is in the chunk
 * and not masked out; row r sees keys j < ends[r] (causal). Updates each row's (m, l, acc). */
XO_CLONES
static void attend_tile(const float *const q[TILE_ROWS], const int ends[TILE_ROWS], const float *kt,
                        const float *valid, const float *vbase, size_t v_stride, int hd, float scale,
                        float *const m[TILE_ROWS], float *const l[TILE_ROWS], float *const acc[TILE_ROWS]) {
    float s[TILE_ROWS][KEY_CHUNK];
    int n = 0;
    for (int r = 0; r < TILE_ROWS; r++) n = ends[r] > n ? ends[r] : n;
    const int nb = (n + SCORE_BLOCK - 1) / SCORE_BLOCK * SCORE_BLOCK;
    for (int jb = 0; jb < nb; jb += SCORE_BLOCK) {
        float blk[TILE_ROWS][SCORE_BLOCK] = {{0}};
        for (int x = 0; x < hd; x++) {
            const float *k = kt + (size_t)x * KEY_CHUNK + jb;
            for (int r = 0; r < TILE_ROWS; r++) {
                const float qx = q[r][x];
                #pragma omp simd
                for (int j = 0; j < SCORE_BLOCK; j++) blk[r][j] = __builtin_fmaf(qx, k[j], blk[r][j]);
            }
        }
        for (int r = 0; r < TILE_ROWS; r++)
            for (int j = 0; j < SCORE_BLOCK; j++) s[r][jb + j] = blk[r][j] * scale;
    }
    for (int r = 0; r < TILE_ROWS; r++) {
        const int end = ends[r];
        float mloc = -INFINITY;
        #pragma omp simd reduction(max : mloc)
        for (int j = 0; j < end; j++) {
            const float x = valid[j] != 0.0f ? s[r][j] : -INFINITY;
            mloc = x > mloc ? x : mloc;
        }
        if (mloc == -INFINITY) {  /* no visible key in this chunk: the row's state is unchanged */
            memset(s[r], 0, (size_t)nb * sizeof(float));
            continue;
        }
        const float mnew = *m[r] > mloc ? *m[r] : mloc;
        const float corr = *m[r] == -INFINITY ? 0.0f : expf(*m[r] - mnew);
        const float lsum = softmax_weights(s[r], valid, end, nb, mnew);
        float *o = acc[r];
        #pragma omp simd
        for (int x = 0; x < hd; x++) o[x] *= corr;
        *l[r] = *l[r] * corr + lsum;
        *m[r] = mnew;
    }
    /* acc += P V, PV_COLUMNS output columns of every row at a time held in registers across the
     * keys (TILE_ROWS x PV_COLUMNS accumulators: enough independent chains to hide the FMA latency) */
    for (int x0 = 0; x0 < hd; x0 += PV_COLUMNS) {
        const int w = hd - x0 < PV_COLUMNS ? hd - x0 : PV_COLUMNS;
        float ob[TILE_ROWS][PV_COLUMNS] = {{0}};
        for (int j = 0; j < n; j++) {
            const float *v = vbase + (size_t)j * v_stride + x0;
            float vb[PV_COLUMNS];
            for (int x = 0; x < PV_COLUMNS; x++) vb[x] = x < w ? v[x] : 0.0f;
            for (int r = 0; r < TILE_ROWS; r++) {
                const float p = s[r][j];
                #pragma omp simd
                for (int x = 0; x < PV_COLUMNS; x++) ob[r][x] = __builtin_fmaf(p, vb[x], ob[r][x]);
            }
        }
        for (int r = 0; r < TILE_ROWS; r++)
            for (int x = 0; x < w; x++) acc[r][x0 + x] += ob[r][x];
    }
}

/* kt[g][x][j] = key j's element x of kv group g; zero for j in [len, KEY_CHUNK). */
static void transpose_keys(float *kt, const float *kbase, size_t stride, int len, int nkv, int hd) {
    for (int g = 0; g < nkv; g++) {
        float *dst = kt + (size_t)g * hd * KEY_CHUNK;
        for (int j = 0; j < len; j++) {
            const float *k = kbase + (size_t)j * stride + (size_t)g * hd;
            for (int x = 0; x < hd; x++) dst[(size_t)x * KEY_CHUNK + j] = k[x];
        }
        for (int x = 0; x < hd; x++) memset(dst + (size_t)x * KEY_CHUNK + len, 0, (size_t)(KEY_CHUNK - len) * sizeof(float));
    }
}

/* Whether every value of a chunk is finite. A tile multiplies a weight of 0 into the values of the
 * keys a row does not see (masked, or after it), which is only exact when they are finite: a chunk
 * holding Inf or NaN takes attend_chunk, which skips those keys. */
static int values_finite(const float *vbase, size_t stride, int len, int width) {
    float sum = 0.0f;
    for (int j = 0; j < len; j++) {
        const float *v = vbase + (size_t)j * stride;
        #pragma omp simd reduction(+ : sum)
        for (int x = 0; x < width; x++) sum += v[x] - v[x];  /* 0 for a finite value, else NaN */
    }
    return sum == 0.0f;
}

enum { DECODE_MAX_TOKENS = 8 };

/* out_h = (acc_h / l_h) @ Wv_g.T for every head h of batch row b (acc [h][i][r]; head_out: nh * t
 * * hd floats). Each head's product is too small to split, so the heads are spread over the
 * team, each product on one thread; float32 weights (oneDNN's sgemm) and products of more rows
 * than the matrix-vector kernels take go one head at a time. */
static xo_status latent_values(xo_backend *be, const xo_attention_args *a, int b, float *acc, const float *l,
                               float *head_out) {
    const xo_cpu_ctx *cx = xo_cpu_ctx_of(be);
    const int t = a->new_tokens, nh = a->num_heads, hd = a->head_dim, r = a->rank;
    const int group = nh / a->num_kv_heads, kw = a->num_kv_heads * hd;
    const xo_linear *wv = a->kv_b;
    for (int h = 0; h < nh; h++) {
        for (int i = 0; i < t; i++) {
            const float den = l[i * nh + h] + a->denom_eps;
            const float inv = l[i * nh + h] > 0.0f ? 1.0f / den : 0.0f;
            float *row = &acc[((size_t)h * t + i) * r];
            for (int x = 0; x < r; x++) row[x] *= inv;
        }
    }
    if (wv->dtype == XO_F32 || t > xo_cpu_gemv_limit(cx, wv->dtype)) {
        for (int h = 0; h < nh; h++)
            XO_TRY(xo_cpu_matmul_rows(be, head_out + (size_t)h * t * hd, &acc[(size_t)h * t * r], wv, t,
                                      kw + (h / group) * hd, hd));
    } else {
        const int grouped = xo_cpu_grouped(wv->dtype);
        const size_t qx_bytes = grouped ? xo_cpu_qx_bytes(t, r) : 0;
        char *scratch = grouped ? malloc((size_t)omp_get_max_threads() * qx_bytes) : NULL;
        if (grouped && !scratch) return xo_fail(XO_ENOMEM, "out of memory in attention");
        #pragma omp parallel for schedule(static) if (nh > 1)
        for (int h = 0; h < nh; h++) {
            float *y = head_out + (size_t)h * t * hd;
            const float *x = &acc[(size_t)h * t * r];
            const int row0 = kw + (h / group) * hd;
            if (grouped) {
                xo_cpu_qgemv_serial(y, (size_t)hd, x, t, wv, row0, hd, cx->isa,
                                    scratch + (size_t)omp_get_thread_num() * qx_bytes);
            } else {   /* the float formats' rows are contiguous */
                xo_linear v = *wv;
                v.out = hd;
                v.data = (char *)wv->data + (size_t)row0 * wv->in * xo_dtype_size(wv->dtype);
                xo_cpu_gemv(y, x, t, &v, cx->isa);
            }
        }
        free(scratch);
    }
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < t; i++)
            memcpy(a->out + (((size_t)b * t + i) * nh + h) * hd, head_out + ((size_t)h * t + i) * hd,
                   (size_t)hd * sizeof(float));
    return XO_OK;
}

/* Decode over the latent cache: K expanded per chunk, values through the accumulated latents. */
static xo_status attention_latent_decode(xo_backend *be, const xo_attention_args *a) {
    const int t = a->new_tokens, nh = a->num_heads, nkv = a->num_kv_heads, hd = a->head_dim, r = a->rank;
    const int group = nh / nkv, kv_len = a->past + t, kw = nkv * hd;
    /* Wk: the first nkv*hd rows of Wkvb; Wv of kv group g: rows kw + g*hd .. kw + g*hd + hd */
    xo_linear wk = *a->kv_b;
    wk.out = kw;
    float *m = malloc((size_t)t * nh * sizeof *m);
    float *l = malloc((size_t)t * nh * sizeof *l);
    float *acc = malloc((size_t)nh * t * r * sizeof *acc);   /* [h][i][r] */
    float *kbuf = malloc((size_t)KEY_CHUNK * kw * sizeof *kbuf);
    float *wide = malloc((size_t)KEY_CHUNK * r * sizeof *wide);
    float *head_out = malloc((size_t)nh * t * hd * sizeof *head_out);
    xo_status rc = XO_OK;
    if (!m || !l || !acc || !kbuf || !wide || !head_out) {
        rc = xo_fail(XO_ENOMEM, "out of memory in attention");
        goto out;
    }
    for (int b = 0; b < a->batch && rc == XO_OK; b++) {
        const uint8_t *mask = a->key_mask + (size_t)b * a->capacity;
        for (int i = 0; i < t * nh; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
        memset(acc, 0, (size_t)nh * t * r * sizeof *acc);
        for (int j0 = 0; j0 < kv_len && rc == XO_OK; j0 += KEY_CHUNK) {
            int j1 = j0 + KEY_CHUNK < kv_len ? j0 + KEY_CHUNK : kv_len;
            const size_t first = (size_t)b * a->capacity + j0;
            const float *c;
            if (a->latent_dtype == XO_F32) {
                c = (const float *)a->latent + first * r;
            } else {
                xo_convert_to_f32(wide, (const char *)a->latent + first * r * 2, a->latent_dtype, (size_t)(j1 - j0) * r);
                c = wide;
            }
            rc = xo_cpu_matmul(be, kbuf, c, &wk, j1 - j0);
            if (rc == XO_OK)
                rc = xo_cpu_rope_rows(kbuf, (size_t)kw, a->key_pos + first, j1 - j0, nkv, hd, a->inv_freq, a->mscale);
            if (rc != XO_OK) break;
            int i0 = j0 - a->past > 0 ? j0 - a->past : 0;
            #pragma omp parallel for collapse(2) schedule(static) if ((t - i0) * nh > 1)
            for (int h = 0; h < nh; h++) {
                for (int i = i0; i < t; i++) {
                    if (xo_interrupt_requested(a->interrupt)) continue;  /* the call fails below */
                    int qi = a->past + i;
                    int jend = j1 < qi + 1 ? j1 : qi + 1;
                    attend_chunk(a->q + ((size_t)b * t + i) * nh * hd + (size_t)h * hd,
                                 kbuf + (size_t)(h / group) * hd, (size_t)kw, c, (size_t)r, r, mask, j0, jend, hd,
                                 a->scale, &m[i * nh + h], &l[i * nh + h], &acc[((size_t)h * t + i) * r]);
                }
            }
            rc = xo_interrupt_poll(a->interrupt);
        }
        if (rc == XO_OK) rc = latent_values(be, a, b, acc, l, head_out);
    }
out:
    free(m);
    free(l);
    free(acc);
    free(kbuf);
    free(wide);
    free(head_out);
    return rc;
}

xo_status xo_cpu_attention(xo_backend *be, const xo_attention_args *args) {
    xo_attention_args exact;
    const xo_attention_args *a = args;
    if (args->past_device) {  /* host memory: the true past is known now */
        exact = *args;
        exact.past = *args->past_device;
        exact.past_device = NULL;
        a = &exact;
    }
    if (a->format == XO_CACHE_LATENT && a->new_tokens <= DECODE_MAX_TOKENS)
        return attention_latent_decode(be, a);
    const int t = a->new_tokens, nh = a->num_heads, nkv = a->num_kv_heads, hd = a->head_dim;
    const int group = nh / nkv, kv_len = a->past + t, qw = nh * hd;
    const size_t states = (size_t)a->batch * t * nh;
    float *m = malloc(states * sizeof *m);
    float *l = malloc(states * sizeof *l);
    float *acc = calloc(states * hd, sizeof *acc);
    /* a 16-bit latent, or 16-bit K and V, are widened one chunk at a time */
    const int latent = a->format == XO_CACHE_LATENT, wide_latent = latent && a->latent_dtype != XO_F32;
    const int wide_kv = !latent && a->kv_dtype != XO_F32;
    float *kvbuf = latent || wide_kv ? malloc((size_t)KEY_CHUNK * 2 * nkv * hd * sizeof *kvbuf) : NULL;
    float *wide = wide_latent ? malloc((size_t)KEY_CHUNK * a->rank * sizeof *wide) : NULL;
    const int tiled = t >= TILE_ROWS;  /* decode steps of a few rows keep one row per task */
    float *kt = tiled ? malloc((size_t)nkv * hd * KEY_CHUNK * sizeof *kt) : NULL;
    xo_status rc = XO_OK;
    if (!m || !l || !acc || ((latent || wide_kv) && !kvbuf) || (wide_latent && !wide) || (tiled && !kt)) {
        rc = xo_fail(XO_ENOMEM, "out of memory in attention (%d tokens)", t);
        goto out;
    }
    for (size_t i = 0; i < states; i++) { m[i] = -INFINITY; l[i] = 0.0f; }

    for (int b = 0; b < a->batch && rc == XO_OK; b++) {
        const uint8_t *mask = a->key_mask + (size_t)b * a->capacity;
        for (int j0 = 0; j0 < kv_len && rc == XO_OK; j0 += KEY_CHUNK) {
            int j1 = j0 + KEY_CHUNK < kv_len ? j0 + KEY_CHUNK : kv_len;
            const float *kbase, *vbase;
            size_t stride;
            if (a->format == XO_CACHE_LATENT) {
                const size_t first = (size_t)b * a->capacity + j0;
                const float *c;
                if (a->latent_dtype == XO_F32) {
                    c = (const float *)a->latent + first * a->rank;
                } else {
                    xo_convert_to_f32(wide, (const char *)a->latent + first * a->rank * 2, a->latent_dtype,
                                      (size_t)(j1 - j0) * a->rank);
                    c = wide;
                }
                rc = xo_cpu_matmul(be, kvbuf, c, a->kv_b, j1 - j0);
                if (rc != XO_OK) break;
                stride = (size_t)2 * nkv * hd;
                rc = xo_cpu_rope_rows(kvbuf, stride, a->key_pos + (size_t)b * a->capacity + j0, j1 - j0, nkv, hd,
                                      a->inv_freq, a->mscale);
                if (rc != XO_OK) break;
                kbase = kvbuf;
                vbase = kvbuf + (size_t)nkv * hd;
            } else if (!wide_kv) {
                stride = (size_t)nkv * hd;
                kbase = (const float *)a->k + ((size_t)b * a->capacity + j0) * stride;
                vbase = (const float *)a->v + ((size_t)b * a->capacity + j0) * stride;
            } else {
                stride = (size_t)nkv * hd;
                const size_t first = ((size_t)b * a->capacity + j0) * stride, count = (size_t)(j1 - j0) * stride;
                float *kw = kvbuf, *vw = kvbuf + (size_t)KEY_CHUNK * stride;
                xo_convert_to_f32(kw, (const char *)a->k + first * 2, a->kv_dtype, count);
                xo_convert_to_f32(vw, (const char *)a->v + first * 2, a->kv_dtype, count);
                kbase = kw;
                vbase = vw;
            }
            /* queries whose causal range reaches this chunk: sequence index past+i >= j0; whole
             * tiles of them first, then the rows left over one by one */
            const int i0 = j0 - a->past > 0 ? j0 - a->past : 0;
            const int tiles = tiled && values_finite(vbase, stride, j1 - j0, nkv * hd) ? (t - i0) / TILE_ROWS : 0;
            const int i_rest = i0 + tiles * TILE_ROWS;
            float valid[KEY_CHUNK];  /* 1: key j of the chunk is visible, 0: past its end or masked */
            if (tiles) {
                transpose_keys(kt, kbase, stride, j1 - j0, nkv, hd);
                for (int j = 0; j < KEY_CHUNK; j++) valid[j] = j < j1 - j0 && mask[j0 + j] ? 1.0f : 0.0f;
            }
            #pragma omp parallel for collapse(2) schedule(static) if (tiles * nh > 1)
            for (int h = 0; h < nh; h++) {
                for (int tile = 0; tile < tiles; tile++) {
                    if (xo_interrupt_requested(a->interrupt)) continue;  /* the call fails below */
                    const float *qr[TILE_ROWS];
                    int ends[TILE_ROWS];
                    float *mr[TILE_ROWS], *lr[TILE_ROWS], *ar[TILE_ROWS];
                    for (int r = 0; r < TILE_ROWS; r++) {
                        const int i = i0 + tile * TILE_ROWS + r, qi = a->past + i;
                        const size_t st = ((size_t)b * t + i) * nh + h;
                        qr[r] = a->q + ((size_t)b * t + i) * qw + (size_t)h * hd;
                        ends[r] = (j1 < qi + 1 ? j1 : qi + 1) - j0;
                        mr[r] = &m[st];
                        lr[r] = &l[st];
                        ar[r] = &acc[st * hd];
                    }
                    const int g = h / group;
                    attend_tile(qr, ends, kt + (size_t)g * hd * KEY_CHUNK, valid, vbase + (size_t)g * hd, stride, hd,
                                a->scale, mr, lr, ar);
                }
            }
            const int rest = t - i_rest;
            #pragma omp parallel for collapse(2) schedule(static) if (rest * nh > 4)
            for (int h = 0; h < nh; h++) {
                for (int i = i_rest; i < t; i++) {
                    if (xo_interrupt_requested(a->interrupt)) continue;
                    int qi = a->past + i;
                    int jend = j1 < qi + 1 ? j1 : qi + 1;
                    size_t st = ((size_t)b * t + i) * nh + h;
                    int g = h / group;
                    attend_chunk(a->q + ((size_t)b * t + i) * qw + (size_t)h * hd,
                                 kbase + (size_t)g * hd, stride, vbase + (size_t)g * hd, stride, hd,
                                 mask, j0, jend, hd, a->scale, &m[st], &l[st], &acc[st * hd]);
                }
            }
            rc = xo_interrupt_poll(a->interrupt);
        }
    }
    if (rc == XO_OK) {
        #pragma omp parallel for schedule(static) if (states > 64)
        for (size_t st = 0; st < states; st++) {
            float inv = l[st] > 0.0f ? 1.0f / (l[st] + a->denom_eps) : 0.0f; /* a query with no visible key outputs 0 */
            float *o = a->out + st * hd;
            for (int x = 0; x < hd; x++) o[x] = acc[st * hd + x] * inv;
        }
    }
out:
    free(m);
    free(l);
    free(acc);
    free(kvbuf);
    free(wide);
    free(kt);
    return rc;
}
