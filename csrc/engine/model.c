/* The model graph (SPEC sections 3-6), read top to bottom:
 *     h = embed[ids]
 *     for each layer:  h = h + Attn(RMSNorm_in(h));  h = h + MLP(RMSNorm_post(h))
 *     h = RMSNorm(h; model.norm);  logits = h @ lm_head.T
 * Each residual add is fused with the norm that reads h next, and each norm with the product
 * that reads its output (the rmsnorm_* entries: a backend may hand the product a narrower copy
 * of the normed rows). Every step is one call into the kernel table (engine/scratch.h names
 * the buffers). */
#include "engine/model.h"

#include <math.h>

static const xo_linear *lm_head_weights(const xo_model *m) { return m->w.tied ? &m->w.embed : &m->w.lm_head; }

/* Attn(x), x = the norm nm: -> s->branch (SPEC 4), the new keys written to the cache at slot a->past */
static xo_status attention(xo_model *m, const xo_layer_weights *lw, int l, const xo_layers_args *a, xo_cache *cache,
                           xo_scratch *s, const xo_rmsnorm_in *nm) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int b = a->batch, t = a->tokens, n = b * t, past = a->past;
    const int nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim, r = c->kv_lora_rank;
    const xo_rotary rot_q = { .pos = s->pos, .heads = nh, .head_dim = hd, .inv_freq = m->inv_freq, .mscale = m->mscale };
    const xo_rotary rot_k = { .pos = s->pos, .heads = nkv, .head_dim = hd, .inv_freq = m->inv_freq, .mscale = m->mscale };
    if (c->q_lora_rank == 0) {                                  /* q = RoPE(x @ Wq.T), c = (x @ Wkva.T)[:, :r] */
        XO_TRY(be->ops.rmsnorm_matmul_pair(be, s->q, &lw->q, s->latent, &lw->kv_a, nm, n, &rot_q));
    } else {                                                    /* q = RoPE(RMSNorm(x @ Wqa.T) @ Wqb.T), c as above */
        XO_TRY(be->ops.rmsnorm_matmul_pair(be, s->q_latent, &lw->q_a, s->latent, &lw->kv_a, nm, n, NULL));
        XO_TRY(be->ops.rmsnorm(be, s->q_latent, s->q_latent, c->q_lora_rank, lw->q_a_norm, n, c->q_lora_rank,
                               XO_LATENT_NORM_EPS));
        XO_TRY(be->ops.matmul(be, s->q, s->q_latent, &lw->q_b, n));
        XO_TRY(be->ops.rope(be, s->q, (size_t)nh * hd, s->pos, n, nh, hd, m->inv_freq, m->mscale));
    }
    if (cache->format == XO_CACHE_LATENT) {                     /* the cache's slots <- RMSNorm(c) */
        XO_TRY(be->ops.rmsnorm_cache_write(be, cache->latent[l], cache->dtype, cache->capacity, past, a->past_device,
                                           s->latent, s->latent, lw->kv_a_norm, b, t, r, XO_LATENT_NORM_EPS));
    } else {
        XO_TRY(be->ops.rmsnorm(be, s->latent, s->latent, r, lw->kv_a_norm, n, r, XO_LATENT_NORM_EPS)); /* c = RMSNorm(c) */
        XO_TRY(be->ops.matmul(be, s->kv, s->latent, &lw->kv_b, n));                      /* [K | V] = c @ Wkvb.T */
        XO_TRY(be->ops.rope_kv_cache_write(be, cache->k[l], cache->v[l], cache->dtype, cache->capacity, past,
                                           a->past_device, s->kv, b, t, &rot_k));         /* the slots <- RoPE(K), V */
    }
    xo_attention_args at = {
        .batch = b, .new_tokens = t, .past = past, .past_device = a->past_device,
        .num_heads = nh, .num_kv_heads = nkv, .head_dim = hd, .rank = r,
        .capacity = cache->capacity, .format = cache->format,
        .q = s->q, .out = s->attn,
        .latent = cache->latent[l], .latent_dtype = cache->dtype, .kv_b = &lw->kv_b, .k = cache->k[l], .v = cache->v[l],
        .kv_dtype = cache->dtype,
        .key_pos = cache->positions, .key_mask = cache->mask,
        .inv_freq = m->inv_freq, .mscale = m->mscale, .scale = 1.0f / sqrtf((float)hd),
        .denom_eps = xo_model_denom_eps(c, a->keys ? a->keys : past + t),
        .key_block = m->prefill_chunk,
        .interrupt = a->interrupt,
    };
    return be->ops.attention_o_proj(be, s->branch, &at, &lw->o);           /* softmax(q.K / sqrt(hd)) V, @ Wo.T */
}

/* MLP(x), x = the norm nm (into s->xn): -> s->branch, a dense FFN or the MoE of SPEC 6; a SwiGLU FFN
 * is out = down(silu(gate(x)) * up(x)) */
static xo_status mlp(xo_model *m, const xo_layer_weights *lw, int n, xo_scratch *s, const xo_rmsnorm_in *nm) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    if (!lw->is_moe) return be->ops.rmsnorm_ffn(be, s->branch, nm, &lw->mlp, n, s->gate_up, s->ffn_act);
    /* out = SharedExpert(x) + sum_k pk[k] * Expert_ik[k](x); the shared expert first, with x kept in
     * s->xn for the router and the routed experts */
    xo_rmsnorm_in kept = *nm;
    kept.keep = 1;
    XO_TRY(be->ops.rmsnorm_ffn(be, s->branch, &kept, &lw->shared, n, s->gate_up, s->ffn_act));
    /* top-k of softmax(RMSNorm(x; w_router_norm) @ Wgate.T), renormalised; s->attn ([n, nh*hd] = [n, H])
     * is free until the next layer's attention */
    XO_TRY(be->ops.moe_router(be, s->topk_idx, s->topk_weight, s->xn, lw->router_norm, &lw->router, n, c->experts_per_tok,
                          s->attn, s->router_logits));
    xo_moe_args ma = { .tokens = n, .hidden = c->hidden_size, .num_experts = c->num_experts, .top_k = c->experts_per_tok,
                       .x = s->xn, .out = s->branch, .topk_idx = s->topk_idx, .topk_weight = s->topk_weight,
                       .experts = lw->experts };
    return be->ops.moe_experts(be, &ma);
}

/* The caller's [batch, row_tokens, H] arrays hold the whole call; a pass's rows [batch, tokens,
 * H] are the slice [first, first + tokens) of each row. */
static size_t pass_row_offset(const xo_layers_args *a, int r, int H) {
    const int rt = a->row_tokens ? a->row_tokens : a->tokens;
    return ((size_t)r * rt + a->first) * H;
}

static xo_status upload_pass_rows(xo_backend *be, const xo_layers_args *a, int H, float *dev, const float *host) {
    const size_t row = (size_t)a->tokens * H;
    if (!a->row_tokens || a->row_tokens == a->tokens) return be->mem.upload(be, dev, host, a->batch * row * sizeof(float));
    for (int r = 0; r < a->batch; r++)
        XO_TRY(be->mem.upload(be, dev + r * row, host + pass_row_offset(a, r, H), row * sizeof(float)));
    return XO_OK;
}

static xo_status download_pass_rows(xo_backend *be, const xo_layers_args *a, int H, float *host, const float *dev) {
    const size_t row = (size_t)a->tokens * H;
    if (!a->row_tokens || a->row_tokens == a->tokens) return be->mem.download(be, host, dev, a->batch * row * sizeof(float));
    for (int r = 0; r < a->batch; r++)
        XO_TRY(be->mem.download(be, host + pass_row_offset(a, r, H), dev + r * row, row * sizeof(float)));
    return XO_OK;
}

xo_status xo_model_layers(xo_model *m, const xo_layers_args *a, xo_cache *cache, xo_scratch *s) {
    const xo_config *c = &m->cfg;
    xo_backend *be = m->be;
    const int n = a->batch * a->tokens, H = c->hidden_size, L = c->num_layers;
    const float eps = c->rms_norm_eps;
    const size_t hsize = (size_t)n * H;
    /* hidden_states[l] of the whole call: [batch, row_tokens, H] each */
    const size_t hidden_stride = (size_t)a->batch * (a->row_tokens ? a->row_tokens : a->tokens) * H;

    /* h = embed[ids] */
    if (a->embeds)
        XO_TRY(upload_pass_rows(be, a, H, s->h, a->embeds));
    else
        XO_TRY(be->ops.embed(be, s->h, &m->w.embed, s->ids, n));
    if (a->hidden) XO_TRY(download_pass_rows(be, a, H, a->hidden, s->h));

    const float *owed = NULL; /* the last MLP's output, still to be added to h (by the next norm) */
    for (int l = 0; l < L; l++) {
        const xo_layer_weights *lw = &m->w.layers[l];
        XO_TRY(xo_interrupt_poll(a->interrupt));
        /* h += the last MLP (when owed); x = RMSNorm_in(h) */
        const xo_rmsnorm_in in = { .h = s->h, .add = owed, .x = s->xn, .w = lw->input_norm, .d = H, .eps = eps };
        XO_TRY(attention(m, lw, l, a, cache, s, &in));
        XO_TRY(xo_interrupt_poll(a->interrupt));
        /* h += Attn; x = RMSNorm_post(h) */
        const xo_rmsnorm_in post = { .h = s->h, .add = s->branch, .x = s->xn, .w = lw->post_norm, .d = H, .eps = eps };
        XO_TRY(mlp(m, lw, n, s, &post));
        owed = s->branch;
        if (a->hidden && l + 1 < L) {  /* hidden_states[l + 1] is h between the add and the norm */
            XO_TRY(be->ops.add(be, s->h, s->branch, hsize));
            XO_TRY(download_pass_rows(be, a, H, a->hidden + (size_t)(l + 1) * hidden_stride, s->h));
            owed = NULL;
        }
    }
    /* h += the last MLP; x = RMSNorm(h; model.norm), kept where it is read after (hidden_states, the
     * caller's own lm_head) */
    const xo_rmsnorm_in fin = { .h = s->h, .add = s->branch, .x = s->xn, .w = m->w.final_norm, .d = H, .eps = eps,
                                .keep = !a->logits || a->hidden };
    if (a->logits) XO_TRY(be->ops.rmsnorm_matmul(be, a->logits, &fin, lm_head_weights(m), n));
    else XO_TRY(be->ops.add_rmsnorm(be, s->h, s->branch, s->xn, fin.w, n, H, eps));
    /* the last of hidden_states is the normed h, as the original returns it */
    if (a->hidden) XO_TRY(download_pass_rows(be, a, H, a->hidden + (size_t)L * hidden_stride, s->xn));
    return XO_OK;
}

/* logits[rows, V] = x[rows, H] @ lm_head.T (the embedding when tied) */
xo_status xo_model_lm_head(xo_model *m, float *logits, const float *x, int rows) {
    return m->be->ops.matmul(m->be, logits, x, lm_head_weights(m), rows);
}

/* SPEC 4.4: the original's ring path adds this to the softmax sum once keys outnumber a chunk */
static const float RING_DENOM_EPS = 1e-5f;

float xo_model_denom_eps(const xo_config *c, int keys) {
    return c->use_ring_attention && keys > c->ring_chunk_size ? RING_DENOM_EPS : 0.0f;
}
