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
 * holds 2*V floats of scratch, zero on entry and on return. */
void xo_penalize_repetition(float *logits, int V, float penalty, const int32_t *history, int n, void *work);

/* Processes one row of logits in place (as transformers' warpers do: removed tokens become
 * -inf) and returns the chosen token. `history` (n ids) feeds the repetition penalty.
 * `work` holds 2*V floats + V ints of scratch. */
int32_t xo_sample_row(float *logits, int V, const xo_sampling_params *p, const int32_t *history, int n,
                      xo_rng *rng, void *work);

#endif
