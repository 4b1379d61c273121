/* The activation buffers of one pass through the layers, all in the backend's memory. n = tokens
 * of the pass (batch * new tokens, at most about the prefill chunk: engine/forward.c runs a longer
 * input in several passes); shapes are [rows, columns] of float32 unless marked. */
#ifndef XO_SCRATCH_H
#define XO_SCRATCH_H

#include <stdint.h>

#include "backends/backend.h"
#include "engine/config.h"

typedef struct {
    float *h;             /* [n, H] the residual stream */
    float *xn;            /* [n, H] a norm's output: the input of the next block (at the end, of lm_head) */
    float *branch;        /* [n, H] the attention or MLP output before it is added to h */
    float *q;             /* [n, nh*hd] queries */
    float *q_latent;      /* [n, q_lora_rank] (q_lora_rank > 0) */
    float *latent;        /* [n, r] the normed KV latent c */
    float *kv;            /* [n, 2*nkv*hd] [K | V] expanded from c (KV cache format) */
    float *attn;          /* [n, nh*hd] the attention heads, concatenated */
    float *gate_up;       /* [n, 2*I] the FFN's gate and up products (I: the wider FFN) */
    float *ffn_act;       /* [n, I] silu(gate) * up */
    float *router_logits; /* [n, E] */
    float *topk_weight;   /* [n, K] the routed experts' weights */
    int32_t *topk_idx;    /* [n, K] the routed experts */
    int32_t *ids;         /* [n] token ids */
    int32_t *pos;         /* [n] position ids */
    int32_t *argmax;      /* [out_rows] the chosen token of each output row */
    float *logits;        /* [logit_rows, V], or NULL when the logits go straight to the caller */
} xo_scratch;

/* logit_rows: rows of logits staged on the backend (0 when they go straight to the caller);
 * out_rows: rows of argmax */
xo_status xo_scratch_alloc(xo_backend *be, const xo_config *c, int n, int logit_rows, int out_rows, xo_scratch *s);
void xo_scratch_free(xo_backend *be, xo_scratch *s);

#endif
