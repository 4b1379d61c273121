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
    c->dtype = model_dtype == XO_BF16 || model_dtype == XO_F16 ? model_dtype : XO_F32;
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
        else be->mem.release(be, g[i].fresh);
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
            g[k++] = (growing_array){ &c->k[l], fbytes, 0, NULL };
            g[k++] = (growing_array){ &c->v[l], fbytes, 0, NULL };
        }
    }
    g[k++] = (growing_array){ (void **)&c->positions, sizeof(int32_t), 0, NULL };
    g[k++] = (growing_array){ (void **)&c->mask, sizeof(uint8_t), 0, NULL };
    g[k++] = (growing_array){ (void **)&c->host_positions, sizeof(int32_t), 1, NULL };
    g[k++] = (growing_array){ (void **)&c->host_mask, sizeof(uint8_t), 1, NULL };
    xo_status rc = XO_OK;
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const size_t bytes = (size_t)c->batch * cap * g[i].slot_bytes;
        g[i].fresh = g[i].host ? calloc((size_t)c->batch * cap, g[i].slot_bytes) : be->mem.alloc(be, bytes);
        if (!g[i].fresh) rc = xo_fail_more(XO_ENOMEM, "out of memory growing the cache to %d tokens", cap);
    }
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const size_t row = g[i].slot_bytes;
        for (int b = 0; *g[i].arr && b < c->batch && len > 0 && rc == XO_OK; b++) {
            char *dst = (char *)g[i].fresh + (size_t)b * cap * row;
            const char *src = (const char *)*g[i].arr + (size_t)b * old * row;
            if (g[i].host) memcpy(dst, src, (size_t)len * row);
            else rc = be->mem.copy(be, dst, src, (size_t)len * row);
        }
    }
    if (rc != XO_OK) {
        release_fresh(be, g, n);
        free(g);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        if (g[i].host) free(*g[i].arr);
        else be->mem.release(be, *g[i].arr);
        *g[i].arr = g[i].fresh;
    }
    free(g);
    c->capacity = cap;
    return XO_OK;
}

/* dst row r <- src row rows[r], `len` slots of slot_bytes each, rows `cap` slots apart */
static xo_status gather_rows(xo_backend *be, void **dst, const void *src, const int *rows, int n, int cap, int len,
                             size_t slot_bytes) {
    const size_t row_bytes = (size_t)cap * slot_bytes;
    if (!(*dst = be->mem.alloc(be, (size_t)n * row_bytes)))
        return xo_fail(XO_ENOMEM, "out of memory copying a cache of %d rows", n);
    for (int r = 0; r < n && len > 0; r++)
        XO_TRY(be->mem.copy(be, (char *)*dst + r * row_bytes, (const char *)src + rows[r] * row_bytes, (size_t)len * slot_bytes));
    return XO_OK;
}

xo_status xo_cache_gather(xo_cache **out, const xo_cache *src, const int *rows, int n) {
    if (n <= 0) return xo_fail(XO_EINVAL, "cache batch size must be positive");
    for (int r = 0; r < n; r++)
        if (rows[r] < 0 || rows[r] >= src->batch)
            return xo_fail(XO_EINVAL, "cache row %d is outside [0, %d)", rows[r], src->batch);
    xo_cache *c = calloc(1, sizeof *c);
    if (!c) return xo_fail(XO_ENOMEM, "out of memory");
    /* field by field: a copy shares no memory with src */
    c->be = src->be;
    c->format = src->format;
    c->num_layers = src->num_layers;
    c->batch = n;
    c->width = src->width;
    c->dtype = src->dtype;
    c->capacity = src->capacity;
    c->length = src->length;
    c->max_length = src->max_length;
    c->latent = calloc((size_t)c->num_layers, sizeof *c->latent);
    c->k = calloc((size_t)c->num_layers, sizeof *c->k);
    c->v = calloc((size_t)c->num_layers, sizeof *c->v);
    c->next_position = calloc((size_t)n, sizeof *c->next_position);
    const size_t cells = (size_t)n * c->capacity;
    c->host_positions = cells ? calloc(cells, sizeof *c->host_positions) : NULL;
    c->host_mask = cells ? calloc(cells, 1) : NULL;
    xo_status rc = XO_OK;
    if (!c->latent || !c->k || !c->v || !c->next_position || (cells && (!c->host_positions || !c->host_mask)))
        rc = xo_fail(XO_ENOMEM, "out of memory");
    xo_backend *be = c->be;
    const int cap = c->capacity, len = c->length;
    const size_t fbytes = (size_t)c->width * xo_dtype_size(c->dtype);
    for (int l = 0; rc == XO_OK && cap > 0 && l < c->num_layers; l++) {
        if (c->format == XO_CACHE_LATENT) {
            rc = gather_rows(be, &c->latent[l], src->latent[l], rows, n, cap, len, fbytes);
        } else {
            rc = gather_rows(be, (void **)&c->k[l], src->k[l], rows, n, cap, len, fbytes);
            if (rc == XO_OK) rc = gather_rows(be, (void **)&c->v[l], src->v[l], rows, n, cap, len, fbytes);
        }
    }
    if (rc == XO_OK && cap > 0) rc = gather_rows(be, (void **)&c->positions, src->positions, rows, n, cap, len, sizeof(int32_t));
    if (rc == XO_OK && cap > 0) rc = gather_rows(be, (void **)&c->mask, src->mask, rows, n, cap, len, sizeof(uint8_t));
    for (int r = 0; rc == XO_OK && r < n; r++) {
        c->next_position[r] = src->next_position[rows[r]];
        if (cap == 0) continue;
        memcpy(c->host_positions + (size_t)r * cap, src->host_positions + (size_t)rows[r] * cap, (size_t)cap * sizeof(int32_t));
        memcpy(c->host_mask + (size_t)r * cap, src->host_mask + (size_t)rows[r] * cap, (size_t)cap);
    }
    if (rc != XO_OK) {
        xo_cache_free(c);
        return rc;
    }
    *out = c;
    return XO_OK;
}

void xo_cache_free(xo_cache *c) {
    if (!c) return;
    for (int l = 0; l < c->num_layers; l++) {
        if (c->latent) c->be->mem.release(c->be, c->latent[l]);
        if (c->k) c->be->mem.release(c->be, c->k[l]);
        if (c->v) c->be->mem.release(c->be, c->v[l]);
    }
    free(c->latent);
    free(c->k);
    free(c->v);
    c->be->mem.release(c->be, c->positions);
    c->be->mem.release(c->be, c->mask);
    free(c->host_positions);
    free(c->host_mask);
    free(c->next_position);
    free(c);
}

size_t xo_cache_bytes_per_token(const xo_cache *c) {
    return (size_t)c->num_layers * arrays_per_layer(c) * c->width * xo_dtype_size(c->dtype);
}

size_t xo_cache_bytes(const xo_cache *c) { return xo_cache_bytes_per_token(c) * c->length * c->batch; }
