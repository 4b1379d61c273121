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

/* Reallocates a device array [batch, old_cap, width] to [batch, new_cap, width], keeping `len` slots. */
static xo_status regrow(xo_backend *be, void **arr, int batch, int old_cap, int new_cap, int len, size_t slot_bytes) {
    void *fresh = be->alloc(be, (size_t)batch * new_cap * slot_bytes);
    if (!fresh) return xo_fail(XO_ENOMEM, "out of memory growing the cache to %d tokens", new_cap);
    for (int b = 0; *arr && b < batch && len > 0; b++) {
        xo_status rc = be->copy(be, (char *)fresh + (size_t)b * new_cap * slot_bytes,
                                (char *)*arr + (size_t)b * old_cap * slot_bytes, (size_t)len * slot_bytes);
        if (rc != XO_OK) { be->release(be, fresh); return rc; }
    }
    be->release(be, *arr);
    *arr = fresh;
    return XO_OK;
}

static xo_status regrow_host(void **arr, int batch, int old_cap, int new_cap, int len, size_t slot_bytes) {
    void *fresh = calloc((size_t)batch * new_cap, slot_bytes);
    if (!fresh) return xo_fail(XO_ENOMEM, "out of memory growing the cache");
    for (int b = 0; *arr && b < batch && len > 0; b++)
        memcpy((char *)fresh + (size_t)b * new_cap * slot_bytes, (char *)*arr + (size_t)b * old_cap * slot_bytes,
               (size_t)len * slot_bytes);
    free(*arr);
    *arr = fresh;
    return XO_OK;
}

xo_status xo_cache_reserve(xo_cache *c, int tokens) {
    if (tokens > c->max_length)
        return xo_fail(XO_EINVAL, "sequence of %d tokens exceeds max_position_embeddings (%d)", tokens, c->max_length);
    if (tokens <= c->capacity) return XO_OK;
    long want = (long)c->capacity + c->capacity / 2;
    if (want < tokens) want = tokens;
    want = (want + 255) / 256 * 256;
    if (want > c->max_length) want = c->max_length;
    int cap = (int)want, old = c->capacity, len = c->length;
    xo_backend *be = c->be;
    size_t fbytes = (size_t)c->width * xo_dtype_size(c->dtype);
    for (int l = 0; l < c->num_layers; l++) {
        if (c->format == XO_CACHE_LATENT) {
            XO_TRY(regrow(be, &c->latent[l], c->batch, old, cap, len, fbytes));
        } else {
            XO_TRY(regrow(be, &c->k[l], c->batch, old, cap, len, fbytes));
            XO_TRY(regrow(be, &c->v[l], c->batch, old, cap, len, fbytes));
        }
    }
    XO_TRY(regrow(be, (void **)&c->positions, c->batch, old, cap, len, sizeof(int32_t)));
    XO_TRY(regrow(be, (void **)&c->mask, c->batch, old, cap, len, sizeof(uint8_t)));
    XO_TRY(regrow_host((void **)&c->host_positions, c->batch, old, cap, len, sizeof(int32_t)));
    XO_TRY(regrow_host((void **)&c->host_mask, c->batch, old, cap, len, sizeof(uint8_t)));
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
