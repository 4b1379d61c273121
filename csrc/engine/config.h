/* Model hyperparameters (SPEC section 1). Filled by the binding, checked by xo_config_validate. */
#ifndef XO_CONFIG_H
#define XO_CONFIG_H

#include "engine/status.h"

typedef struct {
    int vocab_size;
    int hidden_size;             /* H */
    int intermediate_size;       /* I, dense FFN width */
    int num_layers;              /* L */
    int num_heads;               /* nh */
    int num_kv_heads;            /* nkv, divides nh */
    int max_position_embeddings; /* also sets the YaRN factor */
    float rms_norm_eps;
    float rope_theta;
    int tie_word_embeddings;
    int use_ring_attention;
    int ring_chunk_size;
    int kv_lora_rank;            /* r */
    int q_lora_rank;             /* 0: plain q_proj */
    int use_moe;
    int num_experts;             /* E */
    int experts_per_tok;         /* K */
    int moe_layer_freq;
    int moe_intermediate_size;   /* Ie, routed and shared experts */
    /* derived by xo_config_validate */
    int head_dim;                /* hd = H / nh */
} xo_config;

/* The largest values the engine supports (xo_config_validate also bounds every weight's
 * element count and every product of fields that indexes memory). */
enum { XO_MAX_EXPERTS = 1024, XO_MAX_POSITIONS = 1 << 30 };

xo_status xo_config_validate(xo_config *cfg);

/* SPEC section 2: layer i has a MoE FFN iff this returns 1. */
int xo_config_is_moe_layer(const xo_config *cfg, int layer);

#endif
