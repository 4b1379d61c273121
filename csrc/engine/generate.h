/* The decode loop of generate(): prefill, then one token per step, all in C (SPEC section 7). */
#ifndef XO_GENERATE_H
#define XO_GENERATE_H

#include "engine/model.h"
#include "engine/sampling.h"

/* Called after every step with the new token of each row; a non-OK return stops generation
 * and is passed back (the binding uses it for a streamer that raised). */
typedef xo_status (*xo_token_callback)(void *ctx, const int32_t *tokens, int batch);

typedef struct {
    int batch, prompt_len;
    const int32_t *prompt;       /* host [batch, prompt_len] */
    const uint8_t *mask;         /* host [batch, prompt_len] or NULL */
    int max_new_tokens, min_new_tokens;
    xo_sampling_params sampling;
    const int32_t *eos_ids;      /* num_eos ids; 0 of them: never stop early */
    int num_eos;
    int32_t pad_id;              /* written into rows that have finished */
    uint64_t seed;
    int cache_format;
    int32_t *out;                /* host [batch, prompt_len + max_new_tokens] */
    int *steps_done;             /* new tokens produced per row (all rows the same) */
    float *scores;               /* host [max_new_tokens, batch, V] processed scores, or NULL */
    xo_token_callback on_token;
    void *ctx;
} xo_generate_args;

xo_status xo_generate(xo_model *m, const xo_generate_args *a);

#endif
