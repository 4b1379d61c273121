#include "engine/config.h"

#include <math.h>

static xo_status require_positive(const char *name, long v) {
    if (v <= 0) return xo_fail(XO_EINVAL, "config: %s must be positive, got %ld", name, v);
    return XO_OK;
}

xo_status xo_config_validate(xo_config *c) {
    XO_TRY(require_positive("vocab_size", c->vocab_size));
    XO_TRY(require_positive("hidden_size", c->hidden_size));
    XO_TRY(require_positive("intermediate_size", c->intermediate_size));
    XO_TRY(require_positive("num_hidden_layers", c->num_layers));
    XO_TRY(require_positive("num_attention_heads", c->num_heads));
    XO_TRY(require_positive("num_key_value_heads", c->num_kv_heads));
    XO_TRY(require_positive("max_position_embeddings", c->max_position_embeddings));
    XO_TRY(require_positive("kv_lora_rank", c->kv_lora_rank));
    XO_TRY(require_positive("ring_attention_chunk_size", c->ring_chunk_size));
    if (c->hidden_size % c->num_heads != 0)
        return xo_fail(XO_EINVAL, "config: num_attention_heads (%d) must divide hidden_size (%d)",
                       c->num_heads, c->hidden_size);
    c->head_dim = c->hidden_size / c->num_heads;
    if (c->head_dim % 2 != 0)
        return xo_fail(XO_EINVAL, "config: head_dim = hidden_size / num_attention_heads = %d must be even "
                       "for the rotary embedding", c->head_dim);
    if (c->num_heads % c->num_kv_heads != 0)
        return xo_fail(XO_EINVAL, "config: num_key_value_heads (%d) must divide num_attention_heads (%d)",
                       c->num_kv_heads, c->num_heads);
    if (c->q_lora_rank < 0)
        return xo_fail(XO_EINVAL, "config: q_lora_rank must be >= 0, got %d", c->q_lora_rank);
    if (!(c->rms_norm_eps >= 0.0f) || !isfinite(c->rms_norm_eps))
        return xo_fail(XO_EINVAL, "config: rms_norm_eps must be a finite number >= 0");
    if (!(c->rope_theta > 1.0f) || !isfinite(c->rope_theta))
        return xo_fail(XO_EINVAL, "config: rope_theta must be a finite number > 1, got %g", c->rope_theta);
    if (c->use_moe) {
        XO_TRY(require_positive("moe_config.num_experts", c->num_experts));
        XO_TRY(require_positive("moe_config.num_experts_per_tok", c->experts_per_tok));
        XO_TRY(require_positive("moe_config.moe_layer_freq", c->moe_layer_freq));
        XO_TRY(require_positive("moe_config.intermediate_size", c->moe_intermediate_size));
        if (c->experts_per_tok > c->num_experts)
            return xo_fail(XO_EINVAL, "config: num_experts_per_tok (%d) exceeds num_experts (%d)",
                           c->experts_per_tok, c->num_experts);
    }
    /* Keep every element count of one weight inside int32 index arithmetic. */
    long long big = (long long)c->vocab_size * c->hidden_size;
    if (big > 0x7fffffffLL || (long long)c->hidden_size * c->intermediate_size > 0x7fffffffLL)
        return xo_fail(XO_EINVAL, "config: a weight matrix would exceed 2^31 elements");
    return XO_OK;
}

int xo_config_is_moe_layer(const xo_config *c, int layer) {
    return c->use_moe && (layer % c->moe_layer_freq == c->moe_layer_freq - 1);
}
