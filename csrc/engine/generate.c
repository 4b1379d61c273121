#include "engine/generate.h"

#include "engine/decode_session.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int xo_generate_is_eos(const xo_generate_args *a, int32_t t) {
    for (int i = 0; i < a->num_eos; i++)
        if (a->eos_ids[i] == t) return 1;
    return 0;
}

/* min_new_tokens bans every EOS id for the first steps; if those are the whole vocabulary,
 * no step could choose anything, so the request cannot be honoured. */
static xo_status check_a_token_remains(const xo_generate_args *a, int V) {
    uint8_t *banned = calloc((size_t)V, 1);
    if (!banned) return xo_fail(XO_ENOMEM, "out of memory in generate");
    int count = 0;
    for (int i = 0; i < a->num_eos; i++)
        if (!banned[a->eos_ids[i]]) { banned[a->eos_ids[i]] = 1; count++; }
    free(banned);
    if (count == V)
        return xo_fail(XO_EINVAL, "min_new_tokens=%d cannot be honoured: every token of the vocabulary (%d) is an "
                       "eos_token_id, so none may be generated before min_new_tokens", a->min_new_tokens, V);
    return XO_OK;
}

static xo_status check(const xo_model *m, const xo_generate_args *a) {
    const int V = m->cfg.vocab_size, total = a->embeds_len + a->prompt_len;
    if (a->max_new_tokens < 0) return xo_fail(XO_EINVAL, "max_new_tokens must be >= 0 (got %d)", a->max_new_tokens);
    if (a->min_new_tokens < 0) return xo_fail(XO_EINVAL, "min_new_tokens must be >= 0 (got %d)", a->min_new_tokens);
    XO_TRY(xo_sampling_check(&a->sampling));
    if (a->batch <= 0 || total <= 0) return xo_fail(XO_EINVAL, "the prompt is empty; give at least one token");
    if ((long)total + a->max_new_tokens > m->cfg.max_position_embeddings)
        return xo_fail(XO_EINVAL, "prompt (%d tokens) plus max_new_tokens (%d) exceeds max_position_embeddings (%d)",
                       total, a->max_new_tokens, m->cfg.max_position_embeddings);
    for (int i = 0; i < a->num_eos; i++)
        if (a->eos_ids[i] < 0 || a->eos_ids[i] >= V)
            return xo_fail(XO_EINVAL, "eos_token_id %d is outside [0, vocab_size=%d)", a->eos_ids[i], V);
    if (a->pad_id < 0 || a->pad_id >= V)
        return xo_fail(XO_EINVAL, "pad_token_id %d is outside [0, vocab_size=%d)", a->pad_id, V);
    if (a->min_new_tokens > 0 && a->max_new_tokens > 0 && a->num_eos >= V) XO_TRY(check_a_token_remains(a, V));
    if (a->cache) {
        if (a->embeds) return xo_fail(XO_EINVAL, "give past_key_values or inputs_embeds, not both");
        if (a->cache->batch != a->batch)
            return xo_fail(XO_EINVAL, "past_key_values holds %d rows but input_ids has %d", a->cache->batch, a->batch);
        if (a->cache->length >= a->prompt_len)
            return xo_fail(XO_EINVAL, "past_key_values already holds %d tokens; input_ids (%d tokens) must hold them "
                           "and at least one more", a->cache->length, a->prompt_len);
    }
    if (a->num_beams < 1) return xo_fail(XO_EINVAL, "num_beams must be >= 1 (got %d)", a->num_beams);
    if (a->num_return < 1 || a->num_return > a->num_beams)
        return xo_fail(XO_EINVAL, "num_return_sequences must be in [1, num_beams=%d] (got %d)", a->num_beams, a->num_return);
    if (a->num_beams > 1 && a->sampling.do_sample)
        return xo_fail(XO_EINVAL, "beam sampling is not supported: give do_sample=False with num_beams > 1");
    if (!isfinite(a->length_penalty)) return xo_fail(XO_EINVAL, "length_penalty must be finite");
    XO_TRY(xo_logits_bans_check(&a->bans, V));
    return xo_stop_strings_check(&a->stops, V);
}

xo_status xo_generate_prefill(xo_model *m, const xo_generate_args *a, xo_cache *cache, float *logits, int32_t *argmax,
                              const struct xo_device_draw *draw) {
    const int b = a->batch, past = cache->length, te = a->embeds_len, ti = a->prompt_len - past;
    if (te > 0) {
        /* the embeds' own mask columns, contiguous */
        uint8_t *head = a->mask ? malloc((size_t)b * te) : NULL;
        if (a->mask && !head) return xo_fail(XO_ENOMEM, "out of memory in generate");
        for (int r = 0; head && r < b; r++) memcpy(head + (size_t)r * te, a->mask + (size_t)r * (te + ti), (size_t)te);
        xo_forward_args ea = { .batch = b, .tokens = te, .embeds = a->embeds, .mask = head, .mask_len = te,
                               .cache = cache, .logits = ti ? NULL : logits, .logits_to_keep = 1,
                               .argmax = ti ? NULL : argmax, .draw = ti ? NULL : draw };
        xo_status rc = xo_model_forward(m, &ea);
        free(head);
        if (rc != XO_OK || ti == 0) return rc;
    }
    /* the ids the cache does not hold yet, with a mask over everything before them */
    int32_t *ids = malloc((size_t)b * ti * sizeof *ids);
    if (!ids) return xo_fail(XO_ENOMEM, "out of memory in generate");
    for (int r = 0; r < b; r++) memcpy(ids + (size_t)r * ti, a->prompt + (size_t)r * a->prompt_len + past, (size_t)ti * sizeof *ids);
    xo_forward_args fa = { .batch = b, .tokens = ti, .ids = ids, .mask = a->mask, .mask_len = a->mask ? te + a->prompt_len : 0,
                           .cache = cache, .logits = logits, .logits_to_keep = 1, .argmax = argmax, .draw = draw };
    xo_status rc = xo_model_forward(m, &fa);
    free(ids);
    return rc;
}

void xo_generate_process_row(const xo_generate_args *a, int prompt_row, float *z, int V, const int32_t *seq, int len,
                             int step, void *work) {
    if (step < a->min_new_tokens)  /* no EOS before min_new_tokens */
        for (int i = 0; i < a->num_eos; i++) z[a->eos_ids[i]] = -INFINITY;
    if (a->sampling.repetition_penalty != 1.0f) {
        /* this row's ids as history, the masked-out prompt positions left out */
        int32_t *history = (int32_t *)((float *)work + 3 * (size_t)V);
        int n = 0;
        const uint8_t *mask = a->mask ? a->mask + (size_t)prompt_row * (a->embeds_len + a->prompt_len) + a->embeds_len : NULL;
        for (int i = 0; i < len; i++)
            if (i >= a->prompt_len || !mask || mask[i]) history[n++] = seq[i];
        xo_penalize_repetition(z, V, a->sampling.repetition_penalty, history, n, work);
    }
    xo_logits_ban(&a->bans, z, V, seq, len);
}

/* Steps 1 .. max_new_tokens-1 as a decode session; next/finished: after step 0. The host
 * reads the tokens every few steps and stops once every row has finished. */
static xo_status run_session(xo_model *m, const xo_generate_args *a, xo_cache *cache, const int32_t *next,
                             uint8_t *finished, const struct xo_device_draw *draw, int device_draw) {
    const int b = a->batch, t0 = a->prompt_len, width = t0 + a->max_new_tokens;
    /* A streamer on the CPU gets each token as it is made (a read costs nothing there); on a
     * GPU every 8 steps (a read waits for the device). Without EOS ids or a streamer nothing
     * needs the tokens early: read them in long runs. */
    const int ring = 64;
    const int every = a->on_token && m->be->host_memory ? 1 : a->num_eos || a->on_token ? 8 : ring;
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
        for (int i = 0; rc == XO_OK && i < count; i++) {
            rc = xo_interrupt_poll(m->interrupt);
            if (rc == XO_OK) rc = xo_decoder_step(d);
        }
        if (rc == XO_OK) rc = xo_decoder_read(d, tokens, step, count);
        for (int i = 0; rc == XO_OK && i < count && !all_done; i++) {
            const int32_t *row_tokens = tokens + (size_t)i * b;
            all_done = 1;
            for (int r = 0; r < b; r++) {  /* the backend already wrote pads for finished rows */
                if (xo_generate_is_eos(a, row_tokens[r])) finished[r] = 1;
                a->out[(size_t)r * width + t0 + step + i] = row_tokens[r];
                all_done &= finished[r];
            }
            *a->steps_done = *a->steps_run = step + i + 1;
            if (a->on_token) rc = a->on_token(a->ctx, row_tokens, b);
        }
    }
    xo_status free_rc = xo_decoder_free(d);
    free(tokens);
    return rc != XO_OK ? rc : free_rc;
}

/* Marks the rows that the stop strings or the caller's criteria stop after `step`. */
static xo_status apply_stops(const xo_generate_args *a, int step, const float *logits, int V, uint8_t *finished,
                             uint8_t *stop) {
    const int b = a->batch, width = a->prompt_len + a->max_new_tokens, len = a->prompt_len + step + 1;
    for (int r = 0; a->stops.num && r < b; r++)
        if (!finished[r] && xo_stop_strings_hit(&a->stops, a->out + (size_t)r * width, len)) finished[r] = 1;
    if (!a->should_stop) return XO_OK;
    memset(stop, 0, (size_t)b);
    XO_TRY(a->should_stop(a->ctx, a->out, width, len, b, logits, V, stop));
    for (int r = 0; r < b; r++) finished[r] |= stop[r];
    return XO_OK;
}

xo_status xo_generate(xo_model *m, const xo_generate_args *a) {
    XO_TRY(check(m, a));
    if (a->num_beams > 1) return xo_beam_search(m, a);
    *a->steps_run = 0;
    const int b = a->batch, t0 = a->prompt_len, V = m->cfg.vocab_size, width = t0 + a->max_new_tokens;
    const int total = a->embeds_len + t0;
    for (int r = 0; r < b; r++) memcpy(a->out + (size_t)r * width, a->prompt + (size_t)r * t0, (size_t)t0 * sizeof(int32_t));
    *a->steps_done = 0;
    if (a->max_new_tokens == 0) return XO_OK;

    xo_cache *cache = a->cache;
    if (!cache) XO_TRY(xo_cache_create(&cache, &m->cfg, m->be, b, a->cache_format, m->weight_dtype));
    float *logits = malloc((size_t)b * V * sizeof *logits);
    /* 3V floats for the sampler, then room for a repetition-penalty history */
    void *work = calloc((size_t)V * 3 + width, sizeof(float));
    int32_t *next = malloc((size_t)b * sizeof *next);
    uint8_t *finished = calloc((size_t)b, 1), *stop = calloc((size_t)b, 1);
    int32_t *best = malloc((size_t)b * sizeof *best);
    /* Plain greedy needs only each row's argmax, which the backend can compute where the
     * logits live; everything else (sampling, penalties, bans, scores, hooks) needs the logits. */
    const int host_work = a->sampling.repetition_penalty != 1.0f || a->scores || a->raw_logits || a->process_logits ||
                          a->should_stop || a->stops.num || a->bans.num_bad || a->bans.no_repeat_ngram_size;
    const int plain_greedy = !a->sampling.do_sample && !host_work;
    /* Sampling on the device: the same filters, drawn where the logits are (no logits copy). */
    const int device_draw = a->sampling.do_sample && !host_work && m->be->ops.sample_rows && !m->be->host_memory;
    struct xo_device_draw draw = { a->sampling.temperature, a->sampling.top_p, a->sampling.min_p, a->sampling.top_k,
                                   a->seed, 0 };
    const int fast = plain_greedy || device_draw;
    /* the penalty runs before the caller's processors; the sampler does the rest */
    xo_sampling_params filters = a->sampling;
    filters.repetition_penalty = 1.0f;
    xo_rng rng;
    xo_rng_seed(&rng, a->seed);
    xo_status rc = XO_OK;
    if (!logits || !work || !next || !finished || !stop || !best) {
        rc = xo_fail(XO_ENOMEM, "out of memory in generate");
        goto out;
    }
    /* Every step after the prefill's can run as a decode session (bookkeeping on the backend,
     * tokens read every few steps) when the tokens are drawn where the logits are. */
    const int session = fast && m->be->decode.decode_begin && a->max_new_tokens > 1;
    /* room for the first steps; the session grows the cache as it goes (EOS may come early) */
    if (session) rc = xo_cache_reserve(cache, total + (a->max_new_tokens < 512 ? a->max_new_tokens : 512));
    int have_argmax = fast && (a->min_new_tokens == 0 || !a->num_eos);
    if (rc == XO_OK) rc = xo_generate_prefill(m, a, cache, logits, have_argmax ? best : NULL, device_draw ? &draw : NULL);
    for (int step = 0; rc == XO_OK && step < a->max_new_tokens; step++) {
        if (a->raw_logits) memcpy(a->raw_logits + (size_t)step * b * V, logits, (size_t)b * V * sizeof *logits);
        if (!have_argmax) {
            for (int r = 0; r < b; r++)
                xo_generate_process_row(a, r, logits + (size_t)r * V, V, a->out + (size_t)r * width, t0 + step, step, work);
            if (a->process_logits) rc = a->process_logits(a->ctx, a->out, width, t0 + step, b, logits, V);
        }
        int all_done = 1;
        for (int r = 0; rc == XO_OK && r < b; r++) {
            float *z = logits + (size_t)r * V;
            int32_t tok = have_argmax ? best[r] : 0;
            if (!have_argmax && (rc = xo_sample_row(z, V, &filters, NULL, 0, &rng, work, r, &tok)) != XO_OK) break;
            if (a->scores) memcpy(a->scores + ((size_t)step * b + r) * V, z, (size_t)V * sizeof(float));
            if (finished[r]) tok = a->pad_id;
            else if (xo_generate_is_eos(a, tok)) finished[r] = 1;
            next[r] = tok;
            a->out[(size_t)r * width + t0 + step] = tok;
        }
        if (rc == XO_OK) rc = apply_stops(a, step, logits, V, finished, stop);
        for (int r = 0; r < b; r++) all_done &= finished[r];
        if (rc != XO_OK) break;
        *a->steps_done = *a->steps_run = step + 1;
        if (a->on_token) rc = a->on_token(a->ctx, next, b);
        if (rc == XO_OK) rc = xo_interrupt_poll(m->interrupt);
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
    /* a caller's cache keeps exactly the tokens fed back: the prompt and all new tokens but the
     * last (a decode session may have run a few steps past the end) */
    if (rc == XO_OK && cache == a->cache && *a->steps_done > 0) {
        const int extra = cache->length - (total + *a->steps_done - 1);
        for (int r = 0; extra > 0 && r < b; r++) cache->next_position[r] -= extra;
        if (extra > 0) cache->length -= extra;
    }
out:
    if (cache != a->cache) xo_cache_free(cache);
    free(logits);
    free(work);
    free(next);
    free(finished);
    free(stop);
    free(best);
    return rc;
}
