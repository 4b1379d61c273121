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
    if (wv->dtype == XO_F32 || t > cx->gemv_max_rows) {
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
    xo_status rc = XO_OK;
    if (!m || !l || !acc || ((latent || wide_kv) && !kvbuf) || (wide_latent && !wide)) {
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
            /* queries whose causal range reaches this chunk: sequence index past+i >= j0 */
            int i0 = j0 - a->past > 0 ? j0 - a->past : 0;
            int nq = t - i0;
            #pragma omp parallel for collapse(2) schedule(static) if (nq * nh > 4)
            for (int h = 0; h < nh; h++) {
                for (int i = i0; i < t; i++) {
                    if (xo_interrupt_requested(a->interrupt)) continue;  /* the call fails below */
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
    return rc;
}
