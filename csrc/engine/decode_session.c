#include "engine/decode_session.h"

#include <stdlib.h>
#include <string.h>

/* Keys a recorded step is sized for, in steps of this many: a step is recorded again once
 * every KEY_BUCKET tokens (the latent cache's expansion work grows with the bound). */
enum { KEY_BUCKET = 64 };

struct xo_decoder {
    xo_model *m;
    xo_cache *cache;
    xo_scratch s;
    xo_decode_state st;
    void *block;                 /* backend memory behind st's own arrays */
    int32_t *eos_dev;
    xo_decoder_params p;
    struct xo_device_draw draw;
    int past;                    /* host mirror of st.state[0] */
    int steps;                   /* steps queued so far */
    void *graph;                 /* the recorded step, or NULL */
    int graph_bound;             /* the key bound it was recorded for */
    int warm_bound;              /* the bound of the last eager step (one runs before each recording) */
    int no_graph;                /* recording failed once: run eagerly from then on */
};

static int key_bound(const xo_decoder *d, int keys) {
    const xo_config *c = &d->m->cfg;
    int bound = (keys + KEY_BUCKET - 1) / KEY_BUCKET * KEY_BUCKET;
    if (bound > d->cache->capacity) bound = d->cache->capacity;
    /* the softmax epsilon must not change within one recording (SPEC 4.4) */
    if (xo_model_denom_eps(c, keys) != xo_model_denom_eps(c, bound)) bound = c->ring_chunk_size;
    return bound;
}

/* One step's work, queued: bookkeeping, layers over `bound` keys at most, lm_head, draw. */
static xo_status queue_step(xo_decoder *d, int bound) {
    xo_model *m = d->m;
    xo_backend *be = m->be;
    const xo_config *c = &m->cfg;
    const int b = d->st.batch, V = c->vocab_size;
    XO_TRY(be->decode.decode_begin(be, &d->st));
    xo_layers_args la = { .batch = b, .tokens = 1, .past = bound - 1, .past_device = &d->st.state[0],
                          .logits = d->s.logits };
    XO_TRY(xo_model_layers(m, &la, d->cache, &d->s));
    if (d->p.min_new_tokens > d->p.first_step && d->p.num_eos > 0)
        XO_TRY(be->decode.suppress_tokens(be, d->s.logits, b, V, d->eos_dev, d->p.num_eos, &d->st.state[1], d->p.min_new_tokens));
    if (d->p.draw)
        XO_TRY(be->ops.sample_rows(be, d->st.tokens, d->s.logits, b, V, d->draw.temperature, d->draw.top_k, d->draw.top_p,
                               d->draw.min_p, d->draw.seed, 0, &d->st.state[1]));
    else
        XO_TRY(be->ops.argmax_rows(be, d->st.tokens, d->s.logits, b, V));
    return be->decode.decode_end(be, &d->st);
}

xo_status xo_decoder_create(xo_decoder **out, xo_model *m, xo_cache *cache, const xo_decoder_params *p) {
    xo_backend *be = m->be;
    const int b = cache->batch;
    if (!be->decode.decode_begin || !be->decode.decode_end || !be->decode.suppress_tokens)
        return xo_fail(XO_EUNSUPPORTED, "backend %s has no decode sessions", be->name);
    if (p->draw && !be->ops.sample_rows) return xo_fail(XO_EUNSUPPORTED, "backend %s cannot sample", be->name);
    if (p->ring <= 0) return xo_fail(XO_EINVAL, "decode session ring must be positive");
    xo_decoder *d = calloc(1, sizeof *d);
    if (!d) return xo_fail(XO_ENOMEM, "out of memory");
    d->m = m;
    d->cache = cache;
    d->p = *p;
    if (p->draw) d->draw = *p->draw;
    d->past = cache->length;
    /* st's arrays in one block: state[2], tokens, next_pos, out[ring*b], eos, finished */
    const size_t ints = 2 + 2 * (size_t)b + (size_t)p->ring * b + (size_t)(p->num_eos > 0 ? p->num_eos : 1);
    xo_status rc = xo_scratch_alloc(be, &m->cfg, b, b, b, &d->s);
    if (rc == XO_OK && !(d->block = be->mem.alloc(be, ints * sizeof(int32_t) + (size_t)b)))
        rc = xo_fail_more(XO_ENOMEM, "out of memory for a decode session of %d rows", b);
    if (rc != XO_OK) {
        xo_scratch_free(be, &d->s);
        free(d);
        return rc;
    }
    int32_t *ib = d->block;
    xo_decode_state *st = &d->st;
    st->batch = b;
    st->capacity = cache->capacity;
    st->ring = p->ring;
    st->state = ib;
    st->tokens = ib + 2;
    st->next_pos = st->tokens + b;
    st->out = st->next_pos + b;
    d->eos_dev = st->out + (size_t)p->ring * b;
    st->finished = (uint8_t *)(d->eos_dev + (p->num_eos > 0 ? p->num_eos : 1));
    st->ids = d->s.ids;
    st->pos = d->s.pos;
    st->cache_pos = cache->positions;
    st->cache_mask = cache->mask;
    st->eos = d->eos_dev;
    st->num_eos = p->num_eos;
    st->pad_id = p->pad_id;
    const int32_t state[2] = { cache->length, p->first_step };
    rc = be->mem.upload(be, st->state, state, sizeof state);
    if (rc == XO_OK) rc = be->mem.upload(be, st->tokens, p->tokens, (size_t)b * sizeof(int32_t));
    if (rc == XO_OK) rc = be->mem.upload(be, st->next_pos, cache->next_position, (size_t)b * sizeof(int32_t));
    if (rc == XO_OK) rc = be->mem.upload(be, st->finished, p->finished, (size_t)b);
    if (rc == XO_OK && p->num_eos > 0) rc = be->mem.upload(be, d->eos_dev, p->eos, (size_t)p->num_eos * sizeof(int32_t));
    if (rc != XO_OK) {
        xo_decoder_free(d);
        return rc;
    }
    *out = d;
    return XO_OK;
}

/* The cache is full: let it grow (its arrays move, so the recorded step is dropped). */
static xo_status grow_cache(xo_decoder *d) {
    xo_backend *be = d->m->be;
    xo_cache *c = d->cache;
    XO_TRY(be->mem.synchronize(be));
    c->length = d->past;  /* the slots the regrow keeps; the host mirrors are refreshed at the end */
    XO_TRY(xo_cache_reserve(c, d->past + 1));
    d->st.capacity = c->capacity;
    d->st.cache_pos = c->positions;
    d->st.cache_mask = c->mask;
    if (d->graph) be->graphs.graph_free(be, d->graph);
    d->graph = NULL;
    d->warm_bound = 0;
    return XO_OK;
}

xo_status xo_decoder_step(xo_decoder *d) {
    xo_backend *be = d->m->be;
    if (d->past + 1 > d->cache->capacity) XO_TRY(grow_cache(d));
    const int bound = key_bound(d, d->past + 1);
    xo_status rc = XO_OK;
    const int can_record = be->graphs.capture_begin && !d->no_graph;
    if (can_record && d->graph && d->graph_bound == bound) {
        rc = be->graphs.graph_launch(be, d->graph);
    } else if (can_record && d->warm_bound == bound) {
        /* record this bound's step (its first step ran eagerly, so every buffer it grows is grown) */
        if (d->graph) be->graphs.graph_free(be, d->graph);
        d->graph = NULL;
        void *g = NULL;
        rc = be->graphs.capture_begin(be);
        if (rc == XO_OK) {
            xo_status step_rc = queue_step(d, bound);
            rc = be->graphs.capture_end(be, &g);
            if (step_rc != XO_OK) rc = step_rc;
        }
        if (rc == XO_OK) {
            d->graph = g;
            d->graph_bound = bound;
            rc = be->graphs.graph_launch(be, g);
        } else {  /* the backend could not record this step: run every step eagerly instead */
            if (g) be->graphs.graph_free(be, g);
            d->no_graph = 1;
            rc = be->mem.synchronize(be);
            if (rc == XO_OK) rc = queue_step(d, bound);
        }
    } else {
        rc = queue_step(d, bound);
        d->warm_bound = bound;
    }
    if (rc == XO_OK) {
        d->past++;
        d->steps++;
    }
    return rc;
}

xo_status xo_decoder_read(xo_decoder *d, int32_t *host, int first, int count) {
    const int b = d->st.batch, ring = d->st.ring;
    if (count > ring) return xo_fail(XO_EINVAL, "decode session: %d steps read at once, the ring holds %d", count, ring);
    for (int i = 0; i < count;) {
        const int slot = (first + i) % ring;
        const int run = count - i < ring - slot ? count - i : ring - slot;
        XO_TRY(d->m->be->mem.download(d->m->be, host + (size_t)i * b, d->st.out + (size_t)slot * b, (size_t)run * b * sizeof(int32_t)));
        i += run;
    }
    return XO_OK;
}

xo_status xo_decoder_free(xo_decoder *d) {
    if (!d) return XO_OK;
    xo_backend *be = d->m->be;
    xo_cache *c = d->cache;
    xo_status rc = be->mem.synchronize(be);
    if (d->graph) be->graphs.graph_free(be, d->graph);
    /* the cache now holds the session's tokens: bring its host mirrors up to date */
    if (rc == XO_OK && d->steps > 0) {
        const size_t cells = (size_t)c->batch * c->capacity;
        rc = be->mem.download(be, c->next_position, d->st.next_pos, (size_t)c->batch * sizeof(int32_t));
        if (rc == XO_OK) rc = be->mem.download(be, c->host_positions, c->positions, cells * sizeof(int32_t));
        if (rc == XO_OK) rc = be->mem.download(be, c->host_mask, c->mask, cells);
        if (rc == XO_OK) c->length = d->past;
    }
    xo_scratch_free(be, &d->s);
    be->mem.release(be, d->block);
    free(d);
    return rc;
}
