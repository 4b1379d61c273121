#include "engine/scratch.h"

#include <string.h>

void xo_scratch_free(xo_backend *be, xo_scratch *s) {
    void *all[] = { s->h, s->xn, s->branch, s->q, s->q_latent, s->latent, s->kv, s->attn, s->gate_up, s->ffn_act,
                    s->router_logits, s->topk_weight, s->topk_idx, s->ids, s->pos, s->argmax, s->logits };
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) be->mem.release(be, all[i]);
    memset(s, 0, sizeof *s); /* a failed xo_scratch_alloc has freed; its caller's free must find nothing */
}

xo_status xo_scratch_alloc(xo_backend *be, const xo_config *c, int n, int logit_rows, int out_rows, xo_scratch *s) {
    const size_t H = c->hidden_size, qw = (size_t)c->num_heads * c->head_dim;
    size_t inter = c->intermediate_size > c->moe_intermediate_size ? c->intermediate_size : c->moe_intermediate_size;
    size_t E = c->use_moe ? c->num_experts : 1, K = c->use_moe ? c->experts_per_tok : 1;
    size_t f = sizeof(float);
    memset(s, 0, sizeof *s);
    s->h = be->mem.alloc(be, n * H * f);
    s->xn = be->mem.alloc(be, n * H * f);
    s->q = be->mem.alloc(be, n * qw * f);
    s->q_latent = be->mem.alloc(be, n * (size_t)(c->q_lora_rank ? c->q_lora_rank : 1) * f);
    s->latent = be->mem.alloc(be, n * (size_t)c->kv_lora_rank * f);
    s->kv = be->mem.alloc(be, n * 2 * (size_t)c->num_kv_heads * c->head_dim * f);
    s->attn = be->mem.alloc(be, n * qw * f);
    s->branch = be->mem.alloc(be, n * H * f);
    s->gate_up = be->mem.alloc(be, n * 2 * inter * f);
    s->ffn_act = be->mem.alloc(be, n * inter * f);
    s->router_logits = be->mem.alloc(be, n * E * f);
    s->topk_weight = be->mem.alloc(be, n * K * f);
    s->ids = be->mem.alloc(be, n * sizeof(int32_t));
    s->pos = be->mem.alloc(be, n * sizeof(int32_t));
    s->topk_idx = be->mem.alloc(be, n * K * sizeof(int32_t));
    s->argmax = be->mem.alloc(be, (size_t)out_rows * sizeof(int32_t));
    s->logits = be->mem.alloc(be, (size_t)logit_rows * c->vocab_size * f);
    if (!s->h || !s->xn || !s->q || !s->q_latent || !s->latent || !s->kv || !s->attn || !s->branch || !s->gate_up ||
        !s->ffn_act || !s->router_logits || !s->topk_weight || !s->ids || !s->pos || !s->topk_idx || !s->argmax) {
        xo_scratch_free(be, s);
        return xo_fail_more(XO_ENOMEM, "out of memory for the activations of %d tokens", n);
    }
    if (!s->logits) { /* the largest buffer by far when every position's logits are asked for */
        xo_scratch_free(be, s);
        return xo_fail_more(XO_ENOMEM,
                            "out of memory for the logits of %d positions (%.1f GiB of float32 over a vocabulary of %d; "
                            "logits_to_keep=1 keeps only the last position's)",
                            logit_rows, (double)logit_rows * c->vocab_size * f / (1024.0 * 1024.0 * 1024.0), c->vocab_size);
    }
    return XO_OK;
}
