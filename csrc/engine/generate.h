/* The decode loop of generate(): prefill, then one token per step, all in C (SPEC section 7);
 * beam search in engine/beam_search.c. */
#ifndef XO_GENERATE_H
#define XO_GENERATE_H

#include "engine/logits_process.h"
#include "engine/model.h"
#include "engine/sampling.h"
#include "engine/stop_strings.h"

/* Called after every step with the new token of each row; a non-OK return stops generation
 * and is passed back (the binding uses it for a streamer that raised). */
typedef xo_status (*xo_token_callback)(void *ctx, const int32_t *tokens, int batch);
/* The caller's own processing of one step's scores [batch, V] (changed in place), after the
 * built-in processors and before the sampling filters; seqs [batch, width] hold `len` ids. */
typedef xo_status (*xo_logits_hook)(void *ctx, const int32_t *seqs, int width, int len, int batch, float *scores, int V);
/* The caller's stopping criteria after a step: sets stop[r] = 1 for each row that must stop. */
typedef xo_status (*xo_stop_hook)(void *ctx, const int32_t *seqs, int width, int len, int batch, const float *scores,
                                  int V, uint8_t *stop);

typedef struct {
    int batch, prompt_len;
    const int32_t *prompt;       /* host [batch, prompt_len]: ids (returned, and seen by the penalties) */
    const float *embeds;         /* host [batch, embeds_len, H] run before the prompt's ids, or NULL */
    int embeds_len;
    const uint8_t *mask;         /* host [batch, embeds_len + prompt_len] or NULL */
    xo_cache *cache;             /* NULL, or a cache holding the first cache->length prompt ids: it is
                                  * continued (and extended) instead of prefilling them again */
    int max_new_tokens, min_new_tokens;
    xo_sampling_params sampling;
    xo_logits_bans bans;         /* no-repeat n-grams and bad words */
    xo_stop_strings stops;       /* stop strings (num 0: none) */
    const int32_t *eos_ids;      /* num_eos ids; 0 of them: never stop early */
    int num_eos;
    int32_t pad_id;              /* written into rows that have finished */
    uint64_t seed;
    int cache_format;
    /* beam search (num_beams > 1): out then has batch * num_return rows */
    int num_beams, num_return;
    float length_penalty;
    int early_stopping;          /* XO_EARLY_STOP_* */
    float *sequence_scores;      /* host [batch * num_return] the chosen hypotheses' scores, or NULL */
    int32_t *out;                /* host [rows, prompt_len + max_new_tokens] */
    int *steps_done;             /* new tokens per row of out (all rows the same) */
    int *steps_run;              /* decode steps run: the entries of scores and raw_logits */
    float *scores;               /* host [max_new_tokens, batch * num_beams, V] processed scores, or NULL */
    float *raw_logits;           /* host [max_new_tokens, batch * num_beams, V] the model's logits, or NULL */
    xo_token_callback on_token;
    xo_logits_hook process_logits;
    xo_stop_hook should_stop;
    void *ctx;
} xo_generate_args;

enum { XO_EARLY_STOP_HEURISTIC = 0, XO_EARLY_STOP_TRUE = 1, XO_EARLY_STOP_NEVER = 2 };

xo_status xo_generate(xo_model *m, const xo_generate_args *a);

/* ---- pieces shared with beam search ---- */

/* Runs the prompt (embeds, then the ids the cache does not hold) into `cache`; the logits of
 * each row's last position go to logits [batch, V] (or, as xo_forward_args says, only their
 * argmax or a device draw when those are not NULL). */
xo_status xo_generate_prefill(xo_model *m, const xo_generate_args *a, xo_cache *cache, float *logits, int32_t *argmax,
                              const struct xo_device_draw *draw);
/* EOS suppression below min_new_tokens, the repetition penalty and the bans, on the scores z
 * of a row whose ids are seq[0 .. len) and whose prompt is row prompt_row; work: 3V + len floats. */
void xo_generate_process_row(const xo_generate_args *a, int prompt_row, float *z, int V, const int32_t *seq, int len,
                             int step, void *work);
int xo_generate_is_eos(const xo_generate_args *a, int32_t token);
xo_status xo_beam_search(xo_model *m, const xo_generate_args *a);

#endif
