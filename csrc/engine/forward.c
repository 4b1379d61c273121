/* One forward call: checks the inputs, lays out positions and mask in the cache, runs the
 * graph (engine/model.c) and hands the logits, or the chosen tokens, back. */
#include "engine/model.h"

#include <stdlib.h>
#include <string.h>

/* Fills host positions for the new tokens and records them, with the mask, in the cache. */
static xo_status prepare_positions(xo_model *m, const xo_forward_args *a, xo_cache *cache, int32_t *pos) {
    const int b = a->batch, t = a->tokens, past = cache->length;
    for (int r = 0; r < b; r++) {
        int32_t next = cache->next_position[r];
        for (int i = 0; i < t; i++) {
            size_t k = (size_t)r * t + i;
            uint8_t keep = 1;
            if (a->mask) keep = a->mask[(size_t)r * a->mask_len + (a->mask_len - t) + i] != 0;
            int32_t p;
            if (a->positions) {
                p = a->positions[k];
            } else if (keep) {
                p = next;  /* = cumsum(mask) - 1 over the whole sequence */
            } else {
                p = 1;     /* pads get 1, as prepare_inputs_for_generation does */
            }
            if (p < 0 || p >= m->cfg.max_position_embeddings)
                return xo_fail(XO_EINVAL, "position id %d at [%d, %d] is outside [0, max_position_embeddings=%d)",
                               p, r, i, m->cfg.max_position_embeddings);
            if (keep && p + 1 > next) next = p + 1;
            pos[k] = p;
            cache->host_positions[(size_t)r * cache->capacity + past + i] = p;
            cache->host_mask[(size_t)r * cache->capacity + past + i] = keep;
        }
        if (a->mask && a->mask_len == past + t)   /* a full-length mask may also mask cached keys */
            for (int j = 0; j < past; j++)
                cache->host_mask[(size_t)r * cache->capacity + j] = a->mask[(size_t)r * a->mask_len + j] != 0;
        cache->next_position[r] = next;
    }
    XO_TRY(m->be->mem.upload(m->be, cache->positions, cache->host_positions, (size_t)b * cache->capacity * sizeof(int32_t)));
    return m->be->mem.upload(m->be, cache->mask, cache->host_mask, (size_t)b * cache->capacity);
}

static xo_status check_args(const xo_model *m, const xo_forward_args *a, const xo_cache *cache) {
    if (a->batch <= 0 || a->tokens <= 0)
        return xo_fail(XO_EINVAL, "input_ids must have at least one row and one token (got [%d, %d])", a->batch, a->tokens);
    if (!a->ids && !a->embeds && !a->ids_device) return xo_fail(XO_EINVAL, "give input_ids or inputs_embeds");
    if (a->logits_to_keep < 0)
        return xo_fail(XO_EINVAL, "logits_to_keep must be >= 0 (0 keeps every position), got %d", a->logits_to_keep);
    if (a->ids_device && !m->be->ops.load_ids)
        return xo_fail(XO_EUNSUPPORTED, "backend %s cannot read input_ids from device memory", m->be->name);
    for (size_t i = 0; a->ids && i < (size_t)a->batch * a->tokens; i++)
        if (a->ids[i] < 0 || a->ids[i] >= m->cfg.vocab_size)
            return xo_fail(XO_EINVAL, "token id %d at flat index %zu is outside [0, vocab_size=%d)",
                           a->ids[i], i, m->cfg.vocab_size);
    if (cache && cache->batch != a->batch)
        return xo_fail(XO_EINVAL, "past_key_values holds %d rows but input_ids has %d", cache->batch, a->batch);
    int past = cache ? cache->length : 0;
    if (a->mask && a->mask_len != a->tokens && a->mask_len != past + a->tokens)
        return xo_fail(XO_EINVAL, "attention_mask has %d columns; expected %d (new tokens) or %d (cached + new)",
                       a->mask_len, a->tokens, past + a->tokens);
    if ((long)past + a->tokens > m->cfg.max_position_embeddings)
        return xo_fail(XO_EINVAL, "sequence of %ld tokens exceeds max_position_embeddings (%d)",
                       (long)past + a->tokens, m->cfg.max_position_embeddings);
    return XO_OK;
}

/* Positions per row whose logits are computed: the last logits_to_keep, or all (0 or more than t). */
static int kept_positions(const xo_forward_args *a) {
    return a->logits_to_keep > 0 && a->logits_to_keep < a->tokens ? a->logits_to_keep : a->tokens;
}

/* Tokens per row of one pass through the layers: the whole call when it fits the prefill
 * chunk (prefill_chunk tokens over all rows), else near-equal passes of at most that (no
 * short tail pass). */
static int pass_tokens(const xo_model *m, int batch, int tokens) {
    const int per_row = m->prefill_chunk / batch > 0 ? m->prefill_chunk / batch : 1;
    if (tokens <= per_row) return tokens;
    const int passes = (tokens + per_row - 1) / per_row;
    return (tokens + passes - 1) / passes;
}

/* 1 when the pass's tokens [first, first + nt) are exactly the kept positions of each row: the layers
 * then end in the lm_head of all their rows (xo_layers_args.logits) */
static int pass_is_kept(const xo_forward_args *a, int first, int nt) {
    const int keep = kept_positions(a);
    return first == a->tokens - keep && nt == keep;
}

/* The logits of the kept positions among this pass's tokens [first, first + nt), when the pass holds
 * other tokens too: dst[b, keep, V] <- lm_head(s->xn). */
static xo_status pass_logits(xo_model *m, const xo_forward_args *a, int first, int nt, float *dst, xo_scratch *s) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int b = a->batch, t = a->tokens, keep = kept_positions(a), H = c->hidden_size;
    const size_t V = (size_t)c->vocab_size;
    const int k0 = first > t - keep ? first : t - keep, nk = first + nt - k0; /* kept tokens [k0, first + nt) */
    if (nk <= 0) return XO_OK;
    const size_t out_row = (size_t)(k0 - (t - keep)), in_row = (size_t)(k0 - first);
    if (nk == keep && b > 1) {  /* each row's kept tokens, gathered: one product */
        for (int r = 0; r < b; r++)
            XO_TRY(be->mem.copy(be, s->branch + (size_t)r * keep * H, s->xn + ((size_t)r * nt + in_row) * H,
                                (size_t)keep * H * sizeof(float)));
        return xo_model_lm_head(m, dst, s->branch, b * keep);
    }
    for (int r = 0; r < b; r++)
        XO_TRY(xo_model_lm_head(m, dst + ((size_t)r * keep + out_row) * V, s->xn + ((size_t)r * nt + in_row) * H, nk));
    return XO_OK;
}

/* The graph over the call's tokens in passes of `per` tokens per row (each pass writes its cache
 * slots; later passes attend to them as past keys), then the kept rows' logits handed back.
 * ids_all: the call's ids on the backend, or NULL when they come from a->ids per pass. */
static xo_status forward_passes(xo_model *m, const xo_forward_args *a, xo_cache *cache, xo_scratch *s, int per,
                                const int32_t *pos, const int32_t *ids_all) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int b = a->batch, t = a->tokens, past = cache->length;
    const int want_logits = a->logits || a->argmax || a->device_logits;
    /* A backend working in host memory writes the logits straight into the caller's array. */
    float *dst = be->host_memory && a->logits ? a->logits : s->logits;
    for (int first = 0; first < t; first += per) {
        const int nt = first + per < t ? per : t - first;
        const size_t bytes = (size_t)nt * sizeof(int32_t);
        for (int r = 0; r < b; r++) {
            const size_t from = (size_t)r * t + first, to = (size_t)r * nt;
            XO_TRY(be->mem.upload(be, s->pos + to, pos + from, bytes));
            if (a->ids) XO_TRY(be->mem.upload(be, s->ids + to, a->ids + from, bytes));
            else if (ids_all && ids_all != s->ids) XO_TRY(be->mem.copy(be, s->ids + to, ids_all + from, bytes));
        }
        const int kept = want_logits && pass_is_kept(a, first, nt);
        xo_layers_args la = { .batch = b, .tokens = nt, .past = past + first, .first = first, .row_tokens = t,
                              .keys = past + t, .embeds = a->embeds, .hidden = a->hidden,
                              .logits = kept ? dst : NULL, .interrupt = m->interrupt };
        XO_TRY(xo_model_layers(m, &la, cache, s));
        if (want_logits && !kept) XO_TRY(pass_logits(m, a, first, nt, dst, s));
    }
    if (!want_logits) return XO_OK;
    const int nrows = b * kept_positions(a);
    if (a->argmax) {  /* a few bytes back instead of the whole logits */
        const struct xo_device_draw *d = a->draw;
        if (d)
            XO_TRY(be->ops.sample_rows(be, s->argmax, dst, nrows, c->vocab_size, d->temperature, d->top_k, d->top_p,
                                   d->min_p, d->seed, d->step, NULL));
        else
            XO_TRY(be->ops.argmax_rows(be, s->argmax, dst, nrows, c->vocab_size));
        return be->mem.download(be, a->argmax, s->argmax, (size_t)nrows * sizeof(int32_t));
    }
    if (a->device_logits) {  /* hand the buffer over instead of copying it */
        *a->device_logits = s->logits;
        s->logits = NULL;
        return XO_OK;
    }
    if (dst != a->logits) XO_TRY(be->mem.download(be, a->logits, dst, (size_t)nrows * c->vocab_size * sizeof(float)));
    return XO_OK;
}

xo_status xo_model_forward(xo_model *m, const xo_forward_args *a) {
    xo_cache *cache = a->cache;
    XO_TRY(check_args(m, a, cache));
    xo_cache *own = NULL;
    if (!cache) {
        XO_TRY(xo_cache_create(&own, &m->cfg, m->be, a->batch, XO_CACHE_LATENT, m->weight_dtype));
        cache = own;
    }
    const int n = a->batch * a->tokens;
    xo_scratch s = {0};
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    xo_status rc = pos ? XO_OK : xo_fail(XO_ENOMEM, "out of memory");
    int saved_len = cache->length;
    int32_t *saved_next = NULL;
    if (rc == XO_OK) rc = xo_cache_reserve(cache, cache->length + a->tokens);
    if (rc == XO_OK && !(saved_next = malloc((size_t)a->batch * sizeof *saved_next))) rc = xo_fail(XO_ENOMEM, "out of memory");
    if (rc == XO_OK) memcpy(saved_next, cache->next_position, (size_t)a->batch * sizeof *saved_next);
    /* a mask over cached + new tokens rewrites the cached keys' mask too: kept to undo a failure */
    const size_t mask_cells = (size_t)a->batch * cache->capacity;
    uint8_t *saved_mask = NULL;
    if (rc == XO_OK && a->mask && a->mask_len > a->tokens) {
        if ((saved_mask = malloc(mask_cells))) memcpy(saved_mask, cache->host_mask, mask_cells);
        else rc = xo_fail(XO_ENOMEM, "out of memory");
    }
    if (rc == XO_OK) rc = prepare_positions(m, a, cache, pos);
    const int out_rows = a->batch * kept_positions(a);
    const int logit_rows = m->be->host_memory && a->logits ? 0 : out_rows;
    const int per = pass_tokens(m, a->batch, a->tokens);
    if (rc == XO_OK) rc = xo_scratch_alloc(m->be, &m->cfg, a->batch * per, logit_rows, out_rows, &s);
    /* ids already on the device are checked there; a bad one is reported after the pass. With
     * several passes they are loaded whole (4 bytes a token) and sliced per pass. */
    uint64_t *bad = NULL;
    int32_t *ids_all = NULL;
    if (rc == XO_OK && a->ids_device) {
        if (!(bad = m->be->mem.alloc(m->be, 2 * sizeof(uint64_t)))) rc = xo_fail_more(XO_ENOMEM, "out of memory");
        ids_all = per < a->tokens ? m->be->mem.alloc(m->be, (size_t)n * sizeof(int32_t)) : s.ids;
        if (rc == XO_OK && !ids_all) rc = xo_fail_more(XO_ENOMEM, "out of memory for %d token ids", n);
        if (rc == XO_OK)
            rc = m->be->ops.load_ids(m->be, ids_all, a->ids_device, a->ids_wide, (size_t)n, m->cfg.vocab_size, bad);
    }
    if (rc == XO_OK) rc = forward_passes(m, a, cache, &s, per, pos, ids_all);
    if (rc == XO_OK) rc = m->be->mem.synchronize(m->be);
    if (rc == XO_OK && bad) {
        uint64_t hb[2];
        rc = m->be->mem.download(m->be, hb, bad, sizeof hb);
        if (rc == XO_OK && hb[0] != UINT64_MAX)
            rc = xo_fail(XO_EINVAL, "token id %lld at flat index %llu is outside [0, vocab_size=%d)", (long long)hb[1],
                         (unsigned long long)hb[0], m->cfg.vocab_size);
    }
    if (ids_all != s.ids) m->be->mem.release(m->be, ids_all);
    m->be->mem.release(m->be, bad);
    if (rc == XO_OK) {
        cache->length += a->tokens;
    } else if (saved_next) {  /* a failed call leaves the cache as it was */
        cache->length = saved_len;
        memcpy(cache->next_position, saved_next, (size_t)a->batch * sizeof *saved_next);
        if (saved_mask) memcpy(cache->host_mask, saved_mask, mask_cells);
    }
    free(saved_mask);
    xo_scratch_free(m->be, &s);
    free(pos);
    free(saved_next);
    xo_cache_free(own);
    return rc;
}
