/* Model weights: pointers into backend memory, shapes in the comments (SPEC section 2). */
#ifndef XO_WEIGHTS_H
#define XO_WEIGHTS_H

#include "backends/backend.h"
#include "engine/config.h"

typedef struct {
    float *input_norm;      /* [H] */
    xo_linear q;            /* [nh*hd, H]          (q_lora_rank == 0) */
    xo_linear q_a;          /* [q_lora_rank, H]    (q_lora_rank > 0) */
    float *q_a_norm;        /* [q_lora_rank] */
    xo_linear q_b;          /* [nh*hd, q_lora_rank] */
    xo_linear kv_a;         /* kv_a_proj applied as its first r rows ([r, H]); the storage holds all
                             * r + hd rows, the last hd feed nothing but stay the checkpoint's */
    float *kv_a_norm;       /* [r] */
    xo_linear kv_b;         /* [2*nkv*hd, r] */
    xo_linear o;            /* [H, nh*hd] */
    float *post_norm;       /* [H] */
    int is_moe;
    xo_ffn mlp;             /* dense layer: gate_up [2I, H], down [H, I] */
    float *router_norm;     /* [H] */
    xo_linear router;       /* [E, H] */
    xo_ffn *experts;        /* [E]: gate_up [2Ie, H], down [H, Ie] */
    xo_ffn shared;          /* same shapes as an expert */
} xo_layer_weights;

typedef struct {
    xo_linear embed;        /* [V, H] */
    xo_layer_weights *layers; /* [L] */
    float *final_norm;      /* [H] */
    xo_linear lm_head;      /* [V, H]; unused when tied (embed serves) */
    int tied;
} xo_weights;

/* One SPEC tensor and where it lives in xo_weights. */
enum { XO_SLOT_VECTOR, XO_SLOT_LINEAR, XO_SLOT_KV_A };
/* A KV_A slot's rows (r + hd) all live in lin's storage; lin->out (r) is what products use. */
typedef struct {
    char name[96];
    int kind;
    int rows, cols;          /* SPEC shape; cols = 0 for a vector */
    float **vec;             /* VECTOR */
    xo_linear *lin;          /* LINEAR, KV_A: target linear */
    int row_offset;          /* LINEAR: first row inside lin (gate/up halves) */
    int is_norm;             /* initialised to ones */
} xo_weight_slot;

/* Lists every SPEC tensor of cfg. Sets up linear shapes/dtypes in w (storage dtype `t`). */
xo_status xo_weights_layout(const xo_config *cfg, xo_weights *w, xo_dtype t, xo_weight_slot **slots, int *n);

/* Allocates and fills w from named tensors (prefix prepended to every SPEC name). Every
 * tensor is checked against the config before anything is allocated; with check_finite a
 * NaN or infinity in any of them is an error naming the tensor. */
xo_status xo_weights_load(xo_weights *w, const xo_config *cfg, xo_backend *be, xo_dtype t,
                          const xo_tensor_view *tensors, int num_tensors, const char *prefix, int check_finite);
/* Random initialisation as the original: normal(0, 0.02), norms 1. */
xo_status xo_weights_random(xo_weights *w, const xo_config *cfg, xo_backend *be, xo_dtype t, uint64_t seed);
void xo_weights_free(xo_weights *w, const xo_config *cfg, xo_backend *be);

/* Copies one SPEC tensor (float32) into host memory of rows*cols (or rows) floats. */
xo_status xo_weights_get(const xo_weights *w, const xo_config *cfg, xo_backend *be, const xo_weight_slot *slot, float *host);

#endif
