/* The forward pass. Each block quotes the SPEC line it implements. */
#include "engine/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* SPEC section 5: YaRN frequencies, in float32, with the trained (reversed) ramp direction. */
static void yarn_frequencies(const xo_config *c, float *inv_freq, float *mscale) {
    const int d = c->head_dim;
    const float base = c->rope_theta, L0 = 8192.0f, beta_fast = 32.0f, beta_slow = 1.0f;
    const float s = (float)c->max_position_embeddings / L0;
    const float two_pi = 2.0f * (float)M_PI;
    float low = floorf((float)d * logf(L0 / (beta_fast * two_pi)) / (2.0f * logf(base)));
    float high = ceilf((float)d * logf(L0 / (beta_slow * two_pi)) / (2.0f * logf(base)));
    if (low < 0.0f) low = 0.0f;
    if (high > (float)(d - 1)) high = (float)(d - 1);
    for (int i = 0; i < d / 2; i++) {
        float f = powf(base, (float)(2 * i) / (float)d);
        float extra = 1.0f / f, inter = 1.0f / (s * f);
        if ((float)i < low) {
            inv_freq[i] = inter;
        } else if ((float)i > high) {
            inv_freq[i] = extra;
        } else {
            float span = high - low > 1.0f ? high - low : 1.0f;
            float u = ((float)i - low) / span;
            inv_freq[i] = (1.0f - u) * inter + u * extra;
        }
    }
    *mscale = s <= 1.0f ? 1.0f : 0.1f * logf(s) + 1.0f;
}

xo_status xo_model_create(xo_model **out, const xo_config *cfg, xo_backend *be, xo_dtype weight_dtype) {
    xo_config c = *cfg;
    xo_status rc = xo_config_validate(&c);
    if (rc == XO_OK && c.head_dim > 1024) rc = xo_fail(XO_EINVAL, "config: head_dim %d above the supported 1024", c.head_dim);
    if (rc != XO_OK) { be->destroy(be); return rc; }
    xo_model *m = calloc(1, sizeof *m);
    if (!m) { be->destroy(be); return xo_fail(XO_ENOMEM, "out of memory"); }
    m->cfg = c;
    m->be = be;
    m->weight_dtype = weight_dtype;
    pthread_mutex_init(&m->lock, NULL);
    float host[512];
    yarn_frequencies(&c, host, &m->mscale);
    m->inv_freq = be->alloc(be, (size_t)c.head_dim / 2 * sizeof(float));
    if (!m->inv_freq) { xo_model_free(m); return xo_fail(XO_ENOMEM, "out of memory"); }
    rc = be->upload(be, m->inv_freq, host, (size_t)c.head_dim / 2 * sizeof(float));
    if (rc != XO_OK) { xo_model_free(m); return rc; }
    *out = m;
    return XO_OK;
}

xo_status xo_model_load(xo_model *m, const xo_tensor_view *tensors, int n, const char *prefix) {
    return xo_weights_load(&m->w, &m->cfg, m->be, m->weight_dtype, tensors, n, prefix);
}

xo_status xo_model_init_random(xo_model *m, uint64_t seed) {
    return xo_weights_random(&m->w, &m->cfg, m->be, m->weight_dtype, seed);
}

void xo_model_free(xo_model *m) {
    if (!m) return;
    xo_weights_free(&m->w, &m->cfg, m->be);
    m->be->release(m->be, m->inv_freq);
    m->be->destroy(m->be);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void xo_scratch_free(xo_backend *be, xo_scratch *s) {
    void *all[] = { s->h, s->xn, s->q, s->qa, s->c, s->kv, s->att, s->tmp, s->gu, s->act, s->router, s->rw,
                    s->ids, s->pos, s->ridx, s->argmax, s->logits };
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) be->release(be, all[i]);
}

/* logit_rows: rows of logits staged on the backend (0 when they go straight to the caller);
 * out_rows: rows of the output (argmax) */
xo_status xo_scratch_alloc(xo_backend *be, const xo_config *c, int n, int logit_rows, int out_rows, xo_scratch *s) {
    const size_t H = c->hidden_size, qw = (size_t)c->num_heads * c->head_dim;
    size_t inter = c->intermediate_size > c->moe_intermediate_size ? c->intermediate_size : c->moe_intermediate_size;
    size_t E = c->use_moe ? c->num_experts : 1, K = c->use_moe ? c->experts_per_tok : 1;
    size_t f = sizeof(float);
    memset(s, 0, sizeof *s);
    s->h = be->alloc(be, n * H * f);
    s->xn = be->alloc(be, n * H * f);
    s->q = be->alloc(be, n * qw * f);
    s->qa = be->alloc(be, n * (size_t)(c->q_lora_rank ? c->q_lora_rank : 1) * f);
    s->c = be->alloc(be, n * (size_t)c->kv_lora_rank * f);
    s->kv = be->alloc(be, n * 2 * (size_t)c->num_kv_heads * c->head_dim * f);
    s->att = be->alloc(be, n * qw * f);
    s->tmp = be->alloc(be, n * H * f);
    s->gu = be->alloc(be, n * 2 * inter * f);
    s->act = be->alloc(be, n * inter * f);
    s->router = be->alloc(be, n * E * f);
    s->rw = be->alloc(be, n * K * f);
    s->ids = be->alloc(be, n * sizeof(int32_t));
    s->pos = be->alloc(be, n * sizeof(int32_t));
    s->ridx = be->alloc(be, n * K * sizeof(int32_t));
    s->argmax = be->alloc(be, (size_t)out_rows * sizeof(int32_t));
    s->logits = be->alloc(be, (size_t)logit_rows * c->vocab_size * f);
    if (!s->h || !s->xn || !s->q || !s->qa || !s->c || !s->kv || !s->att || !s->tmp || !s->gu || !s->act ||
        !s->router || !s->rw || !s->ids || !s->pos || !s->ridx || !s->argmax || !s->logits) {
        xo_scratch_free(be, s);
        return xo_fail(XO_ENOMEM, "out of memory for the activations of %d tokens", n);
    }
    return XO_OK;
}

/* SwiGLU FFN(x) = down(silu(gate(x)) * up(x)); out = result. */
static xo_status ffn(xo_backend *be, const xo_ffn *f, const float *x, float *out, int n, xo_scratch *s) {
    if (be->gate_up_swiglu) {
        XO_TRY(be->gate_up_swiglu(be, s->act, x, s->gu, &f->gate_up, n));
    } else {
        XO_TRY(be->matmul(be, s->gu, x, &f->gate_up, n));
        XO_TRY(be->swiglu(be, s->act, s->gu, n, f->down.in));
    }
    return be->matmul(be, out, s->act, &f->down, n);
}

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
    XO_TRY(m->be->upload(m->be, cache->positions, cache->host_positions, (size_t)b * cache->capacity * sizeof(int32_t)));
    return m->be->upload(m->be, cache->mask, cache->host_mask, (size_t)b * cache->capacity);
}

static xo_status check_args(const xo_model *m, const xo_forward_args *a, const xo_cache *cache) {
    if (a->batch <= 0 || a->tokens <= 0)
        return xo_fail(XO_EINVAL, "input_ids must have at least one row and one token (got [%d, %d])", a->batch, a->tokens);
    if (!a->ids && !a->embeds && !a->ids_device) return xo_fail(XO_EINVAL, "give input_ids or inputs_embeds");
    if (a->logits_to_keep < 0)
        return xo_fail(XO_EINVAL, "logits_to_keep must be >= 0 (0 keeps every position), got %d", a->logits_to_keep);
    if (a->ids_device && !m->be->load_ids)
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

xo_status xo_model_layers(xo_model *m, const xo_layers_args *a, xo_cache *cache, xo_scratch *s) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int b = a->batch, t = a->tokens, n = b * t, past = a->past;
    const int H = c->hidden_size, hd = c->head_dim, r = c->kv_lora_rank, nkv = c->num_kv_heads;
    const size_t hsize = (size_t)n * H;
    const int kvw = nkv * hd;
    const int32_t *past_dev = a->past_device;

    /* h = embed[ids] */
    if (a->embeds)
        XO_TRY(be->upload(be, s->h, a->embeds, hsize * sizeof(float)));
    else
        XO_TRY(be->embed(be, s->h, &m->w.embed, s->ids, n));
    if (a->hidden) XO_TRY(be->download(be, a->hidden, s->h, hsize * sizeof(float)));

    /* A residual branch left in s->tmp is added to h by the next norm (one pass over h). */
    int pending = 0;
#define NORM_H(weight)                                                                                   \
    (pending ? (pending = 0, be->add_rmsnorm(be, s->h, s->tmp, s->xn, (weight), n, H, c->rms_norm_eps)) \
             : be->rmsnorm(be, s->xn, s->h, H, (weight), n, H, c->rms_norm_eps))
    for (int l = 0; l < c->num_layers; l++) {
        const xo_layer_weights *lw = &m->w.layers[l];
        /* h = h + Attn(RMSNorm_in(h)) */
        XO_TRY(NORM_H(lw->input_norm));
        if (c->q_lora_rank == 0) {
            XO_TRY(be->matmul(be, s->q, s->xn, &lw->q, n));                       /* q = x @ Wq.T */
        } else {
            XO_TRY(be->matmul(be, s->qa, s->xn, &lw->q_a, n));                    /* RMSNorm(x @ Wqa.T) @ Wqb.T */
            XO_TRY(be->rmsnorm(be, s->qa, s->qa, c->q_lora_rank, lw->q_a_norm, n, c->q_lora_rank, 1e-6f));
            XO_TRY(be->matmul(be, s->q, s->qa, &lw->q_b, n));
        }
        XO_TRY(be->matmul(be, s->c, s->xn, &lw->kv_a, n));                         /* c = (x @ Wkva.T)[:, :r] */
        XO_TRY(be->rmsnorm(be, s->c, s->c, r, lw->kv_a_norm, n, r, 1e-6f));        /* c = RMSNorm(c, 1e-6) */
        if (cache->format == XO_CACHE_LATENT) {
            XO_TRY(be->cache_write(be, cache->latent[l], cache->dtype, cache->capacity, r, past, past_dev, s->c, b, t, r));
        } else {
            XO_TRY(be->matmul(be, s->kv, s->c, &lw->kv_b, n));                     /* [K | V] = c @ Wkvb.T */
            XO_TRY(be->rope(be, s->kv, 2 * (size_t)kvw, s->pos, n, nkv, hd, m->inv_freq, m->mscale));
            XO_TRY(be->cache_write(be, cache->k[l], cache->dtype, cache->capacity, kvw, past, past_dev, s->kv, b, t, 2 * kvw));
            XO_TRY(be->cache_write(be, cache->v[l], cache->dtype, cache->capacity, kvw, past, past_dev, s->kv + kvw, b, t, 2 * kvw));
        }
        XO_TRY(be->rope(be, s->q, (size_t)c->num_heads * hd, s->pos, n, c->num_heads, hd, m->inv_freq, m->mscale));
        xo_attention_args at = {
            .batch = b, .new_tokens = t, .past = past, .past_device = past_dev,
            .num_heads = c->num_heads, .num_kv_heads = nkv, .head_dim = hd, .rank = r,
            .capacity = cache->capacity, .format = cache->format,
            .q = s->q, .out = s->att,
            .latent = cache->latent[l], .latent_dtype = cache->dtype, .kv_b = &lw->kv_b, .k = cache->k[l], .v = cache->v[l],
            .kv_dtype = cache->dtype,
            .key_pos = cache->positions, .key_mask = cache->mask,
            .inv_freq = m->inv_freq, .mscale = m->mscale, .scale = 1.0f / sqrtf((float)hd),
            .denom_eps = xo_model_denom_eps(c, past + t),
        };
        XO_TRY(be->attention(be, &at));
        XO_TRY(be->matmul(be, s->tmp, s->att, &lw->o, n));                         /* @ Wo.T */
        pending = 1;

        /* h = h + MLP(RMSNorm_post(h)) */
        XO_TRY(NORM_H(lw->post_norm));
        if (!lw->is_moe) {
            XO_TRY(ffn(be, &lw->mlp, s->xn, s->tmp, n, s));
        } else {
            /* z = RMSNorm(x; w_router_norm, 1e-6) @ Wgate.T; top-k of softmax(z), renormalised */
            if (be->moe_router) {
                XO_TRY(be->moe_router(be, s->ridx, s->rw, s->xn, lw->router_norm, &lw->router, n, c->experts_per_tok));
            } else {
                XO_TRY(be->rmsnorm(be, s->tmp, s->xn, H, lw->router_norm, n, H, 1e-6f));
                XO_TRY(be->matmul(be, s->router, s->tmp, &lw->router, n));
                XO_TRY(be->moe_route(be, s->ridx, s->rw, s->router, n, c->num_experts, c->experts_per_tok));
            }
            /* out = SharedExpert(x) + sum_k pk[k] * Expert_ik[k](x) */
            XO_TRY(ffn(be, &lw->shared, s->xn, s->tmp, n, s));
            xo_moe_args ma = { .tokens = n, .hidden = H, .num_experts = c->num_experts, .top_k = c->experts_per_tok,
                               .x = s->xn, .out = s->tmp, .topk_idx = s->ridx, .topk_weight = s->rw,
                               .experts = lw->experts };
            XO_TRY(be->moe_experts(be, &ma));
        }
        pending = 1;
        if (a->hidden && l + 1 < c->num_layers) {
            XO_TRY(be->add(be, s->h, s->tmp, hsize));
            pending = 0;
            XO_TRY(be->download(be, a->hidden + (size_t)(l + 1) * hsize, s->h, hsize * sizeof(float)));
        }
    }
    /* h = RMSNorm(h; model.norm) */
    XO_TRY(NORM_H(m->w.final_norm));
#undef NORM_H
    if (a->hidden)
        XO_TRY(be->download(be, a->hidden + (size_t)c->num_layers * hsize, s->xn, hsize * sizeof(float)));
    return XO_OK;
}

/* SPEC 4.4: the original's ring path divides by (sum + 1e-5) once keys outnumber a chunk */
float xo_model_denom_eps(const xo_config *c, int keys) {
    return c->use_ring_attention && keys > c->ring_chunk_size ? 1e-5f : 0.0f;
}

/* Positions per row whose logits are computed: the last logits_to_keep, or all (0 or more than t). */
static int kept_positions(const xo_forward_args *a) {
    return a->logits_to_keep > 0 && a->logits_to_keep < a->tokens ? a->logits_to_keep : a->tokens;
}

static xo_status forward_layers(xo_model *m, const xo_forward_args *a, xo_cache *cache, xo_scratch *s) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int b = a->batch, t = a->tokens, n = b * t, H = c->hidden_size;
    xo_layers_args la = { .batch = b, .tokens = t, .past = cache->length, .embeds = a->embeds, .hidden = a->hidden };
    XO_TRY(xo_model_layers(m, &la, cache, s));
    /* logits = h @ lm_head.T */
    if (!a->logits && !a->argmax && !a->device_logits) return XO_OK;
    /* logits[:, -keep:]: only the kept rows go through the lm_head */
    const int keep = kept_positions(a);
    const float *rows = s->xn;
    int nrows = n;
    if (keep < t) {
        for (int row = 0; row < b; row++)
            XO_TRY(be->copy(be, s->tmp + (size_t)row * keep * H, s->xn + ((size_t)row * t + t - keep) * H,
                            (size_t)keep * H * sizeof(float)));
        rows = s->tmp;
        nrows = b * keep;
    }
    /* A backend working in host memory writes the logits straight into the caller's array. */
    float *dst = be->host_memory && a->logits ? a->logits : s->logits;
    XO_TRY(be->matmul(be, dst, rows, m->w.tied ? &m->w.embed : &m->w.lm_head, nrows));
    if (a->argmax) {  /* a few bytes back instead of the whole logits */
        const struct xo_device_draw *d = a->draw;
        if (d)
            XO_TRY(be->sample_rows(be, s->argmax, dst, nrows, c->vocab_size, d->temperature, d->top_k, d->top_p,
                                   d->seed, d->step, NULL));
        else
            XO_TRY(be->argmax_rows(be, s->argmax, dst, nrows, c->vocab_size));
        return be->download(be, a->argmax, s->argmax, (size_t)nrows * sizeof(int32_t));
    }
    if (a->device_logits) {  /* hand the buffer over instead of copying it */
        *a->device_logits = s->logits;
        s->logits = NULL;
        return XO_OK;
    }
    if (dst != a->logits) XO_TRY(be->download(be, a->logits, dst, (size_t)nrows * c->vocab_size * sizeof(float)));
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
    if (rc == XO_OK) rc = prepare_positions(m, a, cache, pos);
    const int out_rows = a->batch * kept_positions(a);
    const int logit_rows = m->be->host_memory && a->logits ? 0 : out_rows;
    if (rc == XO_OK) rc = xo_scratch_alloc(m->be, &m->cfg, n, logit_rows, out_rows, &s);
    if (rc == XO_OK && a->ids) rc = m->be->upload(m->be, s.ids, a->ids, (size_t)n * sizeof(int32_t));
    /* ids already on the device are checked there; a bad one is reported after the pass */
    uint64_t *bad = NULL;
    if (rc == XO_OK && a->ids_device) {
        if (!(bad = m->be->alloc(m->be, 2 * sizeof(uint64_t)))) rc = xo_fail(XO_ENOMEM, "out of memory");
        if (rc == XO_OK)
            rc = m->be->load_ids(m->be, s.ids, a->ids_device, a->ids_wide, (size_t)n, m->cfg.vocab_size, bad);
    }
    if (rc == XO_OK) rc = m->be->upload(m->be, s.pos, pos, (size_t)n * sizeof(int32_t));
    if (rc == XO_OK) rc = forward_layers(m, a, cache, &s);
    if (rc == XO_OK) rc = m->be->synchronize(m->be);
    if (rc == XO_OK && bad) {
        uint64_t hb[2];
        rc = m->be->download(m->be, hb, bad, sizeof hb);
        if (rc == XO_OK && hb[0] != UINT64_MAX)
            rc = xo_fail(XO_EINVAL, "token id %lld at flat index %llu is outside [0, vocab_size=%d)", (long long)hb[1],
                         (unsigned long long)hb[0], m->cfg.vocab_size);
    }
    m->be->release(m->be, bad);
    if (rc == XO_OK) {
        cache->length += a->tokens;
    } else if (saved_next) {  /* a failed call leaves the cache as it was */
        cache->length = saved_len;
        memcpy(cache->next_position, saved_next, (size_t)a->batch * sizeof *saved_next);
    }
    xo_scratch_free(m->be, &s);
    free(pos);
    free(saved_next);
    xo_cache_free(own);
    return rc;
}

xo_status xo_cross_entropy(const float *logits, const int64_t *labels, int b, int t, int V, double *loss) {
    double total = 0.0;
    long count = 0;
    for (int r = 0; r < b; r++) {
        for (int i = 0; i + 1 < t; i++) {
            int64_t y = labels[(size_t)r * t + i + 1];
            if (y == -100) continue;
            if (y < 0 || y >= V)
                return xo_fail(XO_EINVAL, "label %lld at [%d, %d] is outside [0, vocab_size=%d) and is not -100",
                               (long long)y, r, i + 1, V);
            const float *z = logits + ((size_t)r * t + i) * V;
            float mx = z[0];
            for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
            double se = 0.0;
            for (int v = 0; v < V; v++) se += exp((double)z[v] - mx);
            total += log(se) + mx - z[y];
            count++;
        }
    }
    double l = count ? total / count : 0.0;
    *loss = l < 0.0 ? 0.0 : l > 100.0 ? 100.0 : l;
    return XO_OK;
}
