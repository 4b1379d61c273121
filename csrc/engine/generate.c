#include "engine/generate.h"

#include "engine/decode_session.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int is_eos(const xo_generate_args *a, int32_t t) {
    for (int i = 0; i < a->num_eos; i++)
        if (a->eos_ids[i] == t) return 1;
    return 0;
}

static xo_status check(const xo_model *m, const xo_generate_args *a) {
    if (a->max_new_tokens < 0) return xo_fail(XO_EINVAL, "max_new_tokens must be >= 0 (got %d)", a->max_new_tokens);
    if (a->min_new_tokens < 0) return xo_fail(XO_EINVAL, "min_new_tokens must be >= 0 (got %d)", a->min_new_tokens);
    if ((long)a->prompt_len + a->max_new_tokens > m->cfg.max_position_embeddings)
        return xo_fail(XO_EINVAL, "prompt (%d tokens) plus max_new_tokens (%d) exceeds max_position_embeddings (%d)",
                       a->prompt_len, a->max_new_tokens, m->cfg.max_position_embeddings);
    for (int i = 0; i < a->num_eos; i++)
        if (a->eos_ids[i] < 0 || a->eos_ids[i] >= m->cfg.vocab_size)
            return xo_fail(XO_EINVAL, "eos_token_id %d is outside [0, vocab_size=%d)", a->eos_ids[i], m->cfg.vocab_size);
    if (a->pad_id < 0 || a->pad_id >= m->cfg.vocab_size)
        return xo_fail(XO_EINVAL, "pad_token_id %d is outside [0, vocab_size=%d)", a->pad_id, m->cfg.vocab_size);
    return xo_sampling_check(&a->sampling);
}

/* Steps 1 .. max_new_tokens-1 as a decode session; next/finished: after step 0. The host
 * reads the tokens every few steps and stops once every row has finished. */
static xo_status run_session(xo_model *m, const xo_generate_args *a, xo_cache *cache, const int32_t *next,
                             uint8_t *finished, const struct xo_device_draw *draw, int device_draw) {
    const int b = a->batch, t0 = a->prompt_len, width = t0 + a->max_new_tokens;
    /* Without EOS ids or a streamer nothing needs the tokens early: read them in long runs. */
    const int ring = 64, every = a->num_eos || a->on_token ? 8 : ring;
    xo_decoder_params p = { .tokens = next, .finished = finished, .first_step = 1, .ring = ring,
                            .eos = a->eos_ids, .num_eos = a->num_eos, .pad_id = a->pad_id,
                            .min_new_tokens = a->min_new_tokens, .draw = device_draw ? draw : NULL };
    xo_decoder *d = NULL;
    XO_TRY(xo_decoder_create(&d, m, cache, &p));
    int32_t *tokens = malloc((size_t)every * b * sizeof *tokens);
    xo_status rc = tokens ? XO_OK : xo_fail(XO_ENOMEM, "out of memory in generate");
    int all_done = 0;
    for (int step = 1; rc == XO_OK && !all_done && step < a->max_new_tokens; step += every) {
        const int count = a->max_new_tokens - step < every ? a->max_new_tokens - step : every;
        for (int i = 0; rc == XO_OK && i < count; i++) rc = xo_decoder_step(d);
        if (rc == XO_OK) rc = xo_decoder_read(d, tokens, step, count);
        for (int i = 0; rc == XO_OK && i < count && !all_done; i++) {
            const int32_t *row_tokens = tokens + (size_t)i * b;
            all_done = 1;
            for (int r = 0; r < b; r++) {  /* the backend already wrote pads for finished rows */
                if (is_eos(a, row_tokens[r])) finished[r] = 1;
                a->out[(size_t)r * width + t0 + step + i] = row_tokens[r];
                all_done &= finished[r];
            }
            *a->steps_done = step + i + 1;
            if (a->on_token) rc = a->on_token(a->ctx, row_tokens, b);
        }
    }
    xo_status free_rc = xo_decoder_free(d);
    free(tokens);
    return rc != XO_OK ? rc : free_rc;
}

xo_status xo_generate(xo_model *m, const xo_generate_args *a) {
    XO_TRY(check(m, a));
    const int b = a->batch, t0 = a->prompt_len, V = m->cfg.vocab_size, width = t0 + a->max_new_tokens;
    for (int r = 0; r < b; r++) memcpy(a->out + (size_t)r * width, a->prompt + (size_t)r * t0, (size_t)t0 * sizeof(int32_t));
    *a->steps_done = 0;
    if (a->max_new_tokens == 0) return XO_OK;

    xo_cache *cache = NULL;
    XO_TRY(xo_cache_create(&cache, &m->cfg, m->be, b, a->cache_format, m->weight_dtype));
    float *logits = malloc((size_t)b * V * sizeof *logits);
    void *work = calloc((size_t)V * 3, sizeof(float));
    int32_t *next = malloc((size_t)b * sizeof *next);
    int32_t *history = malloc((size_t)width * sizeof *history);
    uint8_t *finished = calloc((size_t)b, 1);
    /* Plain greedy needs only each row's argmax, which the backend can compute where the
     * logits live; everything else (sampling, penalties, scores, EOS masking) needs the logits. */
    const int plain_greedy = !a->sampling.do_sample && a->sampling.repetition_penalty == 1.0f && !a->scores;
    /* Sampling on the device: the same filters, drawn where the logits are (no logits copy). */
    const int device_draw = a->sampling.do_sample && m->be->sample_rows && !m->be->host_memory &&
                            a->sampling.repetition_penalty == 1.0f && !a->scores && a->sampling.top_k >= 1 &&
                            a->sampling.top_k <= XO_DEVICE_TOP_K_MAX;
    struct xo_device_draw draw = { a->sampling.temperature, a->sampling.top_p, a->sampling.top_k, a->seed, 0 };
    const int fast = plain_greedy || device_draw;
    int32_t *best = malloc((size_t)b * sizeof *best);
    xo_rng rng;
    xo_rng_seed(&rng, a->seed);
    xo_status rc = XO_OK;
    if (!logits || !work || !next || !history || !finished || !best) {
        rc = xo_fail(XO_ENOMEM, "out of memory in generate");
        goto out;
    }
    /* Every step after the prefill's can run as a decode session (bookkeeping on the backend,
     * tokens read every few steps) when the tokens are drawn where the logits are. */
    const int session = fast && m->be->decode_begin && a->max_new_tokens > 1;
    /* room for the first steps; the session grows the cache as it goes (EOS may come early) */
    if (session) rc = xo_cache_reserve(cache, t0 + (a->max_new_tokens < 512 ? a->max_new_tokens : 512));
    /* Prefill the whole prompt; logits of the last position only. */
    xo_forward_args fa = { .batch = b, .tokens = t0, .ids = a->prompt, .mask = a->mask, .mask_len = a->mask ? t0 : 0,
                           .cache = cache, .logits = logits, .logits_to_keep = 1,
                           .argmax = fast && (a->min_new_tokens == 0 || !a->num_eos) ? best : NULL,
                           .draw = device_draw ? &draw : NULL };
    if (rc == XO_OK) rc = xo_model_forward(m, &fa);
    int have_argmax = fa.argmax != NULL;
    for (int step = 0; rc == XO_OK && step < a->max_new_tokens; step++) {
        int all_done = 1;
        for (int r = 0; r < b; r++) {
            float *z = logits + (size_t)r * V;
            if (step < a->min_new_tokens)  /* no EOS before min_new_tokens */
                for (int i = 0; i < a->num_eos; i++) z[a->eos_ids[i]] = -INFINITY;
            /* history for the repetition penalty: this row's prompt (unmasked) and output */
            int n = 0;
            const int32_t *row = a->out + (size_t)r * width;
            for (int i = 0; a->sampling.repetition_penalty != 1.0f && i < t0 + step; i++)
                if (i >= t0 || !a->mask || a->mask[(size_t)r * t0 + i]) history[n++] = row[i];
            int32_t tok = have_argmax ? best[r] : xo_sample_row(z, V, &a->sampling, history, n, &rng, work);
            if (a->scores) memcpy(a->scores + ((size_t)step * b + r) * V, z, (size_t)V * sizeof(float));
            if (finished[r]) tok = a->pad_id;
            else if (is_eos(a, tok)) finished[r] = 1;
            next[r] = tok;
            a->out[(size_t)r * width + t0 + step] = tok;
            all_done &= finished[r];
        }
        *a->steps_done = step + 1;
        if (a->on_token) rc = a->on_token(a->ctx, next, b);
        if (rc != XO_OK || all_done || step + 1 == a->max_new_tokens) break;
        if (session) {
            rc = run_session(m, a, cache, next, finished, &draw, device_draw);
            break;
        }
        have_argmax = fast && (step + 1 >= a->min_new_tokens || !a->num_eos);
        draw.step = (uint64_t)step + 1;
        xo_forward_args sa = { .batch = b, .tokens = 1, .ids = next, .cache = cache, .logits = logits, .logits_to_keep = 1,
                               .argmax = have_argmax ? best : NULL, .draw = device_draw ? &draw : NULL };
        rc = xo_model_forward(m, &sa);
    }
out:
    xo_cache_free(cache);
    free(logits);
    free(work);
    free(next);
    free(history);
    free(finished);
    free(best);
    return rc;
}
