/* C entry point for tests (xoron._testing, reached through ctypes, like testing/hooks.c): grows a
 * cache on the CPU backend while the backend's allocator fails at its k-th call, and checks
 * that the cache is left exactly as it was. Not used by the engine. */
#include <stdlib.h>
#include <string.h>

#include "engine/cache.h"
#include "engine/options.h"

#define XO_EXPORT __attribute__((visibility("default")))

/* the CPU backend's own allocator, and how many of its calls succeed before one fails */
static _Thread_local void *(*real_alloc)(xo_backend *be, size_t bytes);
static _Thread_local int allocs_left;

static void *failing_alloc(xo_backend *be, size_t bytes) {
    if (allocs_left > 0 && --allocs_left == 0) return NULL;
    return real_alloc(be, bytes);
}

static void fill(xo_cache *c) {
    const size_t slot = (size_t)c->width * xo_dtype_size(c->dtype);
    for (int l = 0; l < c->num_layers; l++) {
        void *arrays[2] = { c->format == XO_CACHE_KV ? (void *)c->k[l] : c->latent[l],
                            c->format == XO_CACHE_KV ? (void *)c->v[l] : NULL };
        for (int a = 0; a < 2; a++)
            for (size_t i = 0; arrays[a] && i < (size_t)c->batch * c->capacity * slot; i++)
                ((unsigned char *)arrays[a])[i] = (unsigned char)(i * 7 + (size_t)l * 13 + (size_t)a);
    }
    for (size_t i = 0; i < (size_t)c->batch * c->capacity; i++) {
        c->host_positions[i] = c->positions[i] = (int32_t)i;
        c->host_mask[i] = c->mask[i] = (uint8_t)(i & 1);
    }
}

/* 1 when slot s of row b holds what fill() wrote there at capacity `cap` */
static int slot_intact(const xo_cache *c, int cap, int b, int s) {
    const size_t slot = (size_t)c->width * xo_dtype_size(c->dtype);
    const size_t cell = (size_t)b * cap + s, now = (size_t)b * c->capacity + s;
    for (int l = 0; l < c->num_layers; l++) {
        const void *arrays[2] = { c->format == XO_CACHE_KV ? (void *)c->k[l] : c->latent[l],
                                  c->format == XO_CACHE_KV ? (void *)c->v[l] : NULL };
        for (int a = 0; a < 2; a++)
            for (size_t j = 0; arrays[a] && j < slot; j++)
                if (((const unsigned char *)arrays[a])[now * slot + j] !=
                    (unsigned char)((cell * slot + j) * 7 + (size_t)l * 13 + (size_t)a))
                    return 0;
    }
    return c->positions[now] == (int32_t)cell && c->host_positions[now] == (int32_t)cell &&
           c->mask[now] == (uint8_t)(cell & 1) && c->host_mask[now] == (uint8_t)(cell & 1);
}

/* Returns 0 when the growth failed with XO_ENOMEM and left the cache unchanged, 1 when it
 * succeeded (fail_at is past the growth's allocations) with the stored tokens kept, and a
 * negative number naming the first check that failed. */
XO_EXPORT int xo_hook_cache_failed_growth(int format, int fail_at) {
    xo_backend *be = NULL;
    xo_options opts;
    if (xo_options_init(&opts) != XO_OK || xo_cpu_backend_create(&be, &opts) != XO_OK) return -1;
    xo_config cfg = { .num_layers = 3, .kv_lora_rank = 4, .num_kv_heads = 1, .head_dim = 2,
                      .max_position_embeddings = 4096 };
    xo_cache *c = NULL;
    int result = -2;
    if (xo_cache_create(&c, &cfg, be, 2, format, XO_F32) != XO_OK || xo_cache_reserve(c, 10) != XO_OK) goto out;
    fill(c);
    c->length = 10;
    const int cap = c->capacity;
    void *before[8] = { c->latent[0], c->latent[2], c->k[0], c->v[2], c->positions, c->mask, c->host_positions,
                        c->host_mask };
    real_alloc = be->mem.alloc;
    be->mem.alloc = failing_alloc;
    allocs_left = fail_at;
    xo_status rc = xo_cache_reserve(c, cap + 1);
    allocs_left = 0;
    if (rc == XO_OK) {
        result = c->capacity > cap ? 1 : -3;
    } else {
        void *after[8] = { c->latent[0], c->latent[2], c->k[0], c->v[2], c->positions, c->mask, c->host_positions,
                           c->host_mask };
        result = rc != XO_ENOMEM ? -4 : c->capacity != cap || c->length != 10 ? -5 : memcmp(before, after, sizeof before) ? -6 : 0;
    }
    for (int b = 0; result >= 0 && b < c->batch; b++)
        for (int s = 0; s < 10; s++)
            if (!slot_intact(c, cap, b, s)) { result = -7; break; }
out:
    if (c) xo_cache_free(c);
    be->destroy(be);
    return result;
}
