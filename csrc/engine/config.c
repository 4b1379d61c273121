#include "engine/config.h"

#include <math.h>

/* Every weight matrix and every per-row index product stays inside int32 arithmetic. */
#define MAX_ELEMENTS 0x7fffffffLL

static xo_status require_positive(const char *name, long v) {
    if (v <= 0) return xo_fail(XO_EINVAL, "config: %s must be positive, got %ld", name, v);
    return XO_OK;
}

static xo_status require_at_most(const char *name, long long v, long long max) {
    if (v > max) return xo_fail(XO_EINVAL, "config: %s = %lld is above the supported %lld", name, v, max);
    return XO_OK;
}

/* rows x cols of one weight (computed in 64 bits, so it cannot overflow here). */
static xo_status require_matrix(const char *what, long long rows, long long cols) {
    if (rows * cols > MAX_ELEMENTS)
        return xo_fail(XO_EINVAL, "config: %s would be [%lld, %lld] = %lld elements, above the supported 2^31 - 1",
                       what, rows, cols, rows * cols);
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
    /* positions, cache slots and chunk bounds are int32 and are added to each other */
    XO_TRY(require_at_most("max_position_embeddings", c->max_position_embeddings, XO_MAX_POSITIONS));
    XO_TRY(require_at_most("ring_attention_chunk_size", c->ring_chunk_size, XO_MAX_POSITIONS));
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
        XO_TRY(require_at_most("moe_config.num_experts", c->num_experts, XO_MAX_EXPERTS));
        XO_TRY(require_positive("moe_config.num_experts_per_tok", c->experts_per_tok));
        XO_TRY(require_positive("moe_config.moe_layer_freq", c->moe_layer_freq));
        XO_TRY(require_positive("moe_config.intermediate_size", c->moe_intermediate_size));
        if (c->experts_per_tok > c->num_experts)
            return xo_fail(XO_EINVAL, "config: num_experts_per_tok (%d) exceeds num_experts (%d)",
                           c->experts_per_tok, c->num_experts);
    }
    const long long H = c->hidden_size, hd = c->head_dim, r = c->kv_lora_rank;
    XO_TRY(require_matrix("embed_tokens / lm_head (vocab_size x hidden_size)", c->vocab_size, H));
    XO_TRY(require_matrix("q_proj / o_proj (hidden_size x hidden_size)", H, H));
    XO_TRY(require_matrix("kv_a_proj ((kv_lora_rank + head_dim) x hidden_size)", r + hd, H));
    XO_TRY(require_matrix("kv_b_proj ((2 * num_key_value_heads * head_dim) x kv_lora_rank)",
                          2LL * c->num_kv_heads * hd, r));
    if (c->q_lora_rank > 0) {
        XO_TRY(require_matrix("q_a_proj (q_lora_rank x hidden_size)", c->q_lora_rank, H));
        XO_TRY(require_matrix("q_b_proj (hidden_size x q_lora_rank)", H, c->q_lora_rank));
    }
    XO_TRY(require_matrix("the dense gate/up projection ((2 * intermediate_size) x hidden_size)",
                          2LL * c->intermediate_size, H));
    long long tensors_per_layer = 11;
    if (c->use_moe) {
        XO_TRY(require_matrix("an expert's gate/up projection ((2 * moe_config.intermediate_size) x hidden_size)",
                              2LL * c->moe_intermediate_size, H));
        tensors_per_layer += 3LL * (c->num_experts + 1) + 2;
    }
    if (tensors_per_layer * c->num_layers + 3 > MAX_ELEMENTS)
        return xo_fail(XO_EINVAL, "config: num_hidden_layers = %d gives more than 2^31 - 1 tensors", c->num_layers);
    return XO_OK;
}

int xo_config_is_moe_layer(const xo_config *c, int layer) {
    return c->use_moe && (layer % c->moe_layer_freq == c->moe_layer_freq - 1);
}
