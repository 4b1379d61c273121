/* The model: config, weights and backend (engine/model_create.c), its graph of SPEC sections
 * 3-6 (engine/model.c), one forward call (engine/forward.c) and the loss (engine/loss.c). */
#ifndef XO_MODEL_H
#define XO_MODEL_H

#include <pthread.h>

#include "backends/backend.h"
#include "engine/cache.h"
#include "engine/config.h"
#include "engine/interrupt.h"
#include "engine/scratch.h"
#include "engine/weights.h"

typedef struct {
    xo_config cfg;
    xo_backend *be;          /* owned */
    xo_weights w;
    xo_dtype weight_dtype;
    float *inv_freq;         /* device [hd/2], YaRN frequencies (SPEC section 5) */
    float mscale;
    int prefill_chunk;       /* tokens per pass through the layers (option prefill_chunk) */
    pthread_mutex_t lock;    /* one call at a time: scratch and caches are not shared */
    const xo_interrupt *interrupt; /* polled by forward and generate; set by the lock holder, or NULL */
} xo_model;

/* Creates an empty model on a backend (takes ownership of be); opts: the engine's own options
 * (the backend took its own at creation). Weights are filled by xo_model_load or
 * xo_model_init_random. */
xo_status xo_model_create(xo_model **out, const xo_config *cfg, xo_backend *be, xo_dtype weight_dtype,
                          const xo_options *opts);
xo_status xo_model_load(xo_model *m, const xo_tensor_view *tensors, int n, const char *prefix, int check_finite);
xo_status xo_model_init_random(xo_model *m, uint64_t seed);
void xo_model_free(xo_model *m);
/* Takes the model's lock for one call from this thread and applies the backend's per-call
 * settings (the CPU thread count); xo_model_unlock undoes both. */
void xo_model_lock(xo_model *m);
/* xo_model_lock, but waiting gives up with XO_EINTERRUPTED once `interrupt` is requested;
 * the call that holds the lock then polls `interrupt` (m->interrupt) until xo_model_unlock. */
xo_status xo_model_lock_interruptible(xo_model *m, const xo_interrupt *interrupt);
void xo_model_unlock(xo_model *m);

/* Sampling done by the backend (xo_backend.sample_rows). */
struct xo_device_draw {
    float temperature, top_p, min_p;
    int top_k;
    uint64_t seed, step;
};

typedef struct {
    int batch, tokens;
    const int32_t *ids;        /* host [batch, tokens]; or NULL with embeds or ids_device */
    const void *ids_device;    /* or: [batch, tokens] ids in the backend's memory (a DLPack tensor) */
    int ids_wide;              /* ids_device holds int64 (else int32) */
    const float *embeds;       /* host [batch, tokens, H] used instead of embed[ids], or NULL */
    const int32_t *positions;  /* host [batch, tokens], or NULL for the defaults of SPEC section 7 */
    const uint8_t *mask;       /* host [batch, mask_len] of 1/0, or NULL (all ones) */
    int mask_len;              /* tokens, or cache length + tokens */
    xo_cache *cache;           /* continued and extended; NULL: nothing kept */
    float *logits;             /* host [batch, kept, V] (kept: see logits_to_keep), or NULL */
    float **device_logits;     /* or: receives the logits left on the backend (the caller releases
                                * them with be->mem.release); a GPU's logits then never reach the host */
    int logits_to_keep;        /* logits of the last N positions of each row only; 0: of every position */
    int32_t *argmax;           /* host [batch] or NULL: argmax of each row's last logits, computed by the
                                * backend; `logits` is then not downloaded (a GPU's stay on the GPU) */
    const struct xo_device_draw *draw; /* with argmax: draw with these settings instead of argmax */
    float *hidden;             /* host [L+1, batch, tokens, H], or NULL */
} xo_forward_args;

/* Runs the decoder on `tokens` new tokens per row. Caller holds m->lock. */
xo_status xo_model_forward(xo_model *m, const xo_forward_args *a);

/* ---- pieces shared with the decode session (engine/decode_session.c) ---- */

typedef struct {
    int batch, tokens;
    int past;                   /* tokens already in the cache (with past_device: an upper bound) */
    const int32_t *past_device; /* or NULL: see xo_attention_args */
    /* A pass over part of a longer input (engine/forward.c runs long inputs in chunks): the
     * new tokens of each row are [first, first + tokens) of a call of row_tokens per row, and
     * the caller's embeds and hidden arrays are laid out for the whole call. 0, 0: the call. */
    int first, row_tokens;
    int keys;                   /* the keys of the whole call (past + its tokens): they set the softmax
                                 * epsilon, so every chunk computes what the whole call would; 0: past + tokens */
    const float *embeds;        /* host [batch, row_tokens, H], or NULL: s->ids are embedded */
    float *hidden;              /* host [L+1, batch, row_tokens, H], or NULL */
    float *logits;              /* or NULL: [batch * tokens, V] on the backend <- lm_head of every row of the
                                 * pass, with the final norm as one step (s->xn then holds the normed states
                                 * only with hidden) */
    const xo_interrupt *interrupt; /* polled between layers, or NULL (a recorded step must run whole) */
} xo_layers_args;

/* The decoder layers and the final norm over s->ids (or embeds) at positions s->pos, the
 * new keys written to the cache at slot past; leaves the normed states in s->xn (see logits).
 * The cache's positions and mask for the new slots must already be on the backend. */
xo_status xo_model_layers(xo_model *m, const xo_layers_args *a, xo_cache *cache, xo_scratch *s);
/* logits[rows, V] = x[rows, H] @ lm_head.T */
xo_status xo_model_lm_head(xo_model *m, float *logits, const float *x, int rows);
/* The softmax denominator's epsilon when `keys` keys are visible (SPEC 4.4). */
float xo_model_denom_eps(const xo_config *c, int keys);

/* Shifted cross-entropy of SPEC section 6 on host logits [b, t, V]. */
xo_status xo_cross_entropy(const float *logits, const int64_t *labels, int b, int t, int V, double *loss);

#endif
