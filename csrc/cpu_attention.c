/* Causal attention over the cache on the CPU, in key chunks with an online softmax:
 * memory is O(tokens * heads * head_dim) whatever the sequence length, never O(t^2).
 * With the latent cache each key chunk is expanded (c @ Wkvb.T, then K rotated) once and
 * shared by every query and head. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

enum { KEY_CHUNK = 256 };


/* One query row against keys [j0, jend) of one chunk: updates (m, l, acc). */
XO_CLONES
static void attend_chunk(const float *qv, const float *kbase, const float *vbase, size_t kv_stride,
                         const uint8_t *mask, int j0, int jend, int hd, float scale,
                         float *m, float *l, float *acc) {
    float s[KEY_CHUNK];
    float mloc = -INFINITY;
    for (int j = j0; j < jend; j++) {
        if (!mask[j]) { s[j - j0] = -INFINITY; continue; }
        const float *kv = kbase + (size_t)(j - j0) * kv_stride;
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
    for (int x = 0; x < hd; x++) acc[x] *= corr;
    for (int j = j0; j < jend; j++) {
        if (s[j - j0] == -INFINITY) continue;
        float p = expf(s[j - j0] - mnew);
        lsum += p;
        const float *vv = vbase + (size_t)(j - j0) * kv_stride;
        #pragma omp simd
        for (int x = 0; x < hd; x++) acc[x] += p * vv[x];
    }
    *m = mnew;
    *l = lsum;
}

xo_status xo_cpu_attention(xo_backend *be, const xo_attention_args *a) {
    const int t = a->new_tokens, nh = a->num_heads, nkv = a->num_kv_heads, hd = a->head_dim;
    const int group = nh / nkv, kv_len = a->past + t, qw = nh * hd;
    const size_t states = (size_t)a->batch * t * nh;
    float *m = malloc(states * sizeof *m);
    float *l = malloc(states * sizeof *l);
    float *acc = calloc(states * hd, sizeof *acc);
    float *kvbuf = a->format == XO_CACHE_LATENT ? malloc((size_t)KEY_CHUNK * 2 * nkv * hd * sizeof *kvbuf) : NULL;
    /* a 16-bit latent is widened one chunk at a time */
    float *wide = a->format == XO_CACHE_LATENT && a->latent_dtype != XO_F32
                      ? malloc((size_t)KEY_CHUNK * a->rank * sizeof *wide) : NULL;
    xo_status rc = XO_OK;
    if (!m || !l || !acc || (a->format == XO_CACHE_LATENT && !kvbuf) || (a->latent_dtype != XO_F32 && !wide &&
                                                                       a->format == XO_CACHE_LATENT)) {
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
            } else {
                stride = (size_t)nkv * hd;
                kbase = a->k + ((size_t)b * a->capacity + j0) * stride;
                vbase = a->v + ((size_t)b * a->capacity + j0) * stride;
            }
            /* queries whose causal range reaches this chunk: sequence index past+i >= j0 */
            int i0 = j0 - a->past > 0 ? j0 - a->past : 0;
            int nq = t - i0;
            #pragma omp parallel for collapse(2) schedule(static) if (nq * nh > 4)
            for (int h = 0; h < nh; h++) {
                for (int i = i0; i < t; i++) {
                    int qi = a->past + i;
                    int jend = j1 < qi + 1 ? j1 : qi + 1;
                    size_t st = ((size_t)b * t + i) * nh + h;
                    int g = h / group;
                    attend_chunk(a->q + ((size_t)b * t + i) * qw + (size_t)h * hd,
                                 kbase + (size_t)g * hd, vbase + (size_t)g * hd, stride,
                                 mask, j0, jend, hd, a->scale, &m[st], &l[st], &acc[st * hd]);
                }
            }
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
