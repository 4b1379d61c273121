#include "engine/cache.h"

#include <stdlib.h>
#include <string.h>

static int arrays_per_layer(const xo_cache *c) { return c->format == XO_CACHE_KV ? 2 : 1; }

xo_status xo_cache_create(xo_cache **out, const xo_config *cfg, xo_backend *be, int batch, int format,
                          xo_dtype model_dtype) {
    if (batch <= 0) return xo_fail(XO_EINVAL, "cache batch size must be positive");
    if (format != XO_CACHE_LATENT && format != XO_CACHE_KV) return xo_fail(XO_EINVAL, "unknown cache format %d", format);
    xo_cache *c = calloc(1, sizeof *c);
    if (!c) return xo_fail(XO_ENOMEM, "out of memory");
    c->be = be;
    c->format = format;
    c->num_layers = cfg->num_layers;
    c->batch = batch;
    c->max_length = cfg->max_position_embeddings;
    c->width = format == XO_CACHE_LATENT ? cfg->kv_lora_rank : cfg->num_kv_heads * cfg->head_dim;
    c->dtype = format == XO_CACHE_LATENT && (model_dtype == XO_BF16 || model_dtype == XO_F16) ? model_dtype : XO_F32;
    c->latent = calloc((size_t)c->num_layers, sizeof *c->latent);
    c->k = calloc((size_t)c->num_layers, sizeof *c->k);
    c->v = calloc((size_t)c->num_layers, sizeof *c->v);
    c->next_position = calloc((size_t)batch, sizeof *c->next_position);
    if (!c->latent || !c->k || !c->v || !c->next_position) {
        xo_cache_free(c);
        return xo_fail(XO_ENOMEM, "out of memory");
    }
    *out = c;
    return XO_OK;
}

/* One array of the cache while it grows: where it is, its slot size, its replacement. */
typedef struct {
    void **arr;
    size_t slot_bytes;
    int host;
    void *fresh;
} growing_array;

static void release_fresh(xo_backend *be, growing_array *g, int n) {
    for (int i = 0; i < n; i++) {
        if (g[i].host) free(g[i].fresh);
        else be->release(be, g[i].fresh);
        g[i].fresh = NULL;
    }
}

xo_status xo_cache_reserve(xo_cache *c, int tokens) {
    if (tokens > c->max_length)
        return xo_fail(XO_EINVAL, "sequence of %d tokens exceeds max_position_embeddings (%d)", tokens, c->max_length);
    if (tokens <= c->capacity) return XO_OK;
    long want = (long)c->capacity + c->capacity / 2;
    if (want < tokens) want = tokens;
    want = (want + 255) / 256 * 256;
    if (want > c->max_length) want = c->max_length;
    const int cap = (int)want, old = c->capacity, len = c->length;
    xo_backend *be = c->be;
    const size_t fbytes = (size_t)c->width * xo_dtype_size(c->dtype);
    /* All or nothing: every new array is allocated and filled before any old one is released,
     * so a growth that runs out of memory leaves the cache exactly as it was. */
    const int n = c->num_layers * arrays_per_layer(c) + 4;
    growing_array *g = calloc((size_t)n, sizeof *g);
    if (!g) return xo_fail(XO_ENOMEM, "out of memory growing the cache");
    int k = 0;
    for (int l = 0; l < c->num_layers; l++) {
        if (c->format == XO_CACHE_LATENT) {
            g[k++] = (growing_array){ &c->latent[l], fbytes, 0, NULL };
        } else {
            g[k++] = (growing_array){ (void **)&c->k[l], fbytes, 0, NULL };
            g[k++] = (growing_array){ (void **)&c->v[l], fbytes, 0, NULL };
        }
    }
    g[k++] = (growing_array){ (void **)&c->positions, sizeof(int32_t), 0, NULL };
    g[k++] = (growing_array){ (void **)&c->mask, sizeof(uint8_t), 0, NULL };
    g[k++] = (growing_array){ (void **)&c->host_positions, sizeof(int32_t), 1, NULL };
    g[k++] = (growing_array){ (void **)&c->host_mask, sizeof(uint8_t), 1, NULL };
    xo_status rc = XO_OK;
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const size_t bytes = (size_t)c->batch * cap * g[i].slot_bytes;
        g[i].fresh = g[i].host ? calloc((size_t)c->batch * cap, g[i].slot_bytes) : be->alloc(be, bytes);
        if (!g[i].fresh) rc = xo_fail(XO_ENOMEM, "out of memory growing the cache to %d tokens", cap);
    }
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const size_t row = g[i].slot_bytes;
        for (int b = 0; *g[i].arr && b < c->batch && len > 0 && rc == XO_OK; b++) {
            char *dst = (char *)g[i].fresh + (size_t)b * cap * row;
            const char *src = (const char *)*g[i].arr + (size_t)b * old * row;
            if (g[i].host) memcpy(dst, src, (size_t)len * row);
            else rc = be->copy(be, dst, src, (size_t)len * row);
        }
    }
    if (rc != XO_OK) {
        release_fresh(be, g, n);
        free(g);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        if (g[i].host) free(*g[i].arr);
        else be->release(be, *g[i].arr);
        *g[i].arr = g[i].fresh;
    }
    free(g);
    c->capacity = cap;
    return XO_OK;
}

void xo_cache_free(xo_cache *c) {
    if (!c) return;
    for (int l = 0; l < c->num_layers; l++) {
        if (c->latent) c->be->release(c->be, c->latent[l]);
        if (c->k) c->be->release(c->be, c->k[l]);
        if (c->v) c->be->release(c->be, c->v[l]);
    }
    free(c->latent);
    free(c->k);
    free(c->v);
    c->be->release(c->be, c->positions);
    c->be->release(c->be, c->mask);
    free(c->host_positions);
    free(c->host_mask);
    free(c->next_position);
    free(c);
}

size_t xo_cache_bytes_per_token(const xo_cache *c) {
    return (size_t)c->num_layers * arrays_per_layer(c) * c->width * xo_dtype_size(c->dtype);
}

size_t xo_cache_bytes(const xo_cache *c) { return xo_cache_bytes_per_token(c) * c->length * c->batch; }
