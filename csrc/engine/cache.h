/* The per-sequence attention cache. By default it keeps the compressed latent c of SPEC
 * section 4 (kv_lora_rank values per token per layer); XO_CACHE_KV keeps rotated K and V
 * instead, trading memory for not re-expanding the latent at every step. */
#ifndef XO_CACHE_H
#define XO_CACHE_H

#include "backends/backend.h"
#include "engine/config.h"

typedef struct {
    xo_backend *be;          /* not owned: the model's */
    int format;              /* XO_CACHE_LATENT or XO_CACHE_KV */
    int num_layers, batch;
    int width;               /* values per token per layer and array: r (latent) or nkv*hd (K, V) */
    xo_dtype dtype;          /* the model's dtype when it is 16-bit, else float32 (int8 weights too) */
    int capacity;            /* token slots allocated per row */
    int length;              /* tokens stored per row */
    int max_length;          /* max_position_embeddings */
    void **latent;           /* [L] device [batch, capacity, r] of dtype */
    void **k, **v;           /* [L] device [batch, capacity, nkv*hd] of dtype */
    int32_t *positions;      /* device [batch, capacity] */
    uint8_t *mask;           /* device [batch, capacity] */
    int32_t *host_positions; /* host mirrors of the two above */
    uint8_t *host_mask;
    int32_t *next_position;  /* host [batch]: position id of each row's next token */
} xo_cache;

/* model_dtype: the weights' storage dtype; the latent or K/V are kept in it when it is 16-bit. */
xo_status xo_cache_create(xo_cache **out, const xo_config *cfg, xo_backend *be, int batch, int format,
                          xo_dtype model_dtype);
/* Makes room for `tokens` slots per row. Grows in 256-token steps by at least half the
 * current size, so appending one token at a time copies the cache O(log n) times. */
xo_status xo_cache_reserve(xo_cache *c, int tokens);
void xo_cache_free(xo_cache *c);
/* A new cache whose row r is a copy of row rows[r] of src (a field added to xo_cache must be
 * copied there too) (n rows, each in [0, src->batch));
 * beam search reorders its rows this way. Copies run where the cache lives (be->mem.copy). */
xo_status xo_cache_gather(xo_cache **out, const xo_cache *src, const int *rows, int n);
/* Bytes of cached state per token (all layers), and in use for the stored tokens. */
size_t xo_cache_bytes_per_token(const xo_cache *c);
size_t xo_cache_bytes(const xo_cache *c);

#endif
