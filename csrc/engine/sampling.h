/* Next-token choice (SPEC section 7): repetition penalty, temperature, top-k, nucleus, min-p, draw. */
#ifndef XO_SAMPLING_H
#define XO_SAMPLING_H

#include <stdint.h>

#include "engine/status.h"

typedef struct {
    int do_sample;
    float temperature;
    int top_k;                 /* 0: off */
    float top_p;               /* 1: off */
    float min_p;               /* 0: off; else drop tokens below min_p times the top probability */
    float repetition_penalty;  /* 1: off */
} xo_sampling_params;

/* xoshiro256** state: one stream per generate() call, seeded explicitly. */
typedef struct { uint64_t s[4]; } xo_rng;
void xo_rng_seed(xo_rng *r, uint64_t seed);
double xo_rng_uniform(xo_rng *r); /* [0, 1) */

xo_status xo_sampling_check(const xo_sampling_params *p);

/* transformers' repetition penalty on one row: each token of `history` (n ids) once. `work`
 * holds 2*V floats of scratch, zero on entry and on return. A penalty so far from 1 that a
 * value would leave the float range shifts the row by its maximum instead (same choice). */
void xo_penalize_repetition(float *logits, int V, float penalty, const int32_t *history, int n, void *work);

/* XO_EINVAL naming `row` and the token if the row holds a NaN (no order, so no choice). */
xo_status xo_logits_check(const float *logits, int V, int row);

/* Processes one row of logits in place (as transformers' warpers do: removed tokens become
 * -inf) and sets *token to the chosen one. `history` (n ids) feeds the repetition penalty.
 * `work` holds 2*V floats + V ints of scratch, zeroed before the first call. A row holding a
 * NaN, or with every logit -inf, is an error naming `row`. */
xo_status xo_sample_row(float *logits, int V, const xo_sampling_params *p, const int32_t *history, int n,
                        xo_rng *rng, void *work, int row, int32_t *token);

#endif
