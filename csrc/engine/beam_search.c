/* Beam search as transformers' BeamSearchScorer does it: each step keeps the num_beams best
 * continuations per prompt from the 2 * num_beams best candidates; a candidate ending in EOS
 * becomes a finished hypothesis scored sum_logprobs / generated_len ** length_penalty. The
 * cache rows follow their beams (xo_cache_gather). */
#include "engine/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float score;
    int len;            /* generated tokens, EOS excluded */
    int32_t *tokens;    /* [max_new_tokens] */
    int taken;          /* 1 + its rank among the returned sequences, or 0 */
} hypothesis;

typedef struct {
    hypothesis *h;      /* num_beams + 1 slots: one spare for the insertion before the worst is dropped */
    int count;
    float worst;
    int done;
} hypotheses;

typedef struct { float score; int index; } candidate;  /* index: beam * V + token */

/* The k best of n scores (k <= n), best first; among equal scores the lower index first.
 * Insertion into a short sorted list: most candidates fail the first comparison. */
static void top_candidates(candidate *top, int k, const float *logits, const float *beam_scores, int nb, int V) {
    int count = 0;
    for (int j = 0; j < nb; j++)
        for (int v = 0; v < V; v++) {
            const float score = logits[(size_t)j * V + v] + beam_scores[j];
            /* indices rise, so an equal score never beats one already kept */
            if (count == k && !(score > top[k - 1].score)) continue;
            int at = count < k ? count++ : k - 1;
            while (at > 0 && score > top[at - 1].score) {
                top[at] = top[at - 1];
                at--;
            }
            top[at] = (candidate){ score, j * V + v };
        }
}

static void add_hypothesis(hypotheses *hs, int num_beams, const int32_t *tokens, int len, float sum_logprobs,
                           float length_penalty, int gen_len) {
    const float score = sum_logprobs / powf((float)gen_len, length_penalty);
    if (hs->count >= num_beams && !(score > hs->worst)) return;
    hypothesis *slot = &hs->h[hs->count++];
    slot->score = score;
    slot->len = len;
    memcpy(slot->tokens, tokens, (size_t)len * sizeof *tokens);
    if (hs->count > num_beams) {  /* drop the worst (the earliest of equals), keep the next worst */
        int worst = 0;
        for (int i = 1; i < hs->count; i++)
            if (hs->h[i].score < hs->h[worst].score) worst = i;
        hypothesis dropped = hs->h[worst];
        memmove(&hs->h[worst], &hs->h[worst + 1], (size_t)(hs->count - worst - 1) * sizeof *hs->h);
        hs->h[--hs->count] = dropped;  /* its token buffer is reused */
        hs->worst = hs->h[0].score;
        for (int i = 1; i < hs->count; i++)
            if (hs->h[i].score < hs->worst) hs->worst = hs->h[i].score;
    } else if (score < hs->worst) {
        hs->worst = score;
    }
}

static int is_done(const hypotheses *hs, const xo_generate_args *a, float best_sum, int gen_len) {
    if (hs->count < a->num_beams) return 0;
    if (a->early_stopping == XO_EARLY_STOP_TRUE) return 1;
    int len = gen_len;
    if (a->early_stopping == XO_EARLY_STOP_NEVER && a->length_penalty > 0.0f) len = a->max_new_tokens;
    return hs->worst >= best_sum / powf((float)len, a->length_penalty);
}

static void log_softmax(float *z, int V) {
    float mx = -INFINITY;
    for (int v = 0; v < V; v++) mx = z[v] > mx ? z[v] : mx;
    double total = 0.0;
    for (int v = 0; v < V; v++) total += exp((double)z[v] - mx);
    const float lse = mx + (float)log(total);
    for (int v = 0; v < V; v++) z[v] -= lse;
}

xo_status xo_beam_search(xo_model *m, const xo_generate_args *a) {
    const int B = a->batch, nb = a->num_beams, R = B * nb, V = m->cfg.vocab_size, t0 = a->prompt_len;
    const int max_new = a->max_new_tokens, width = t0 + max_new;
    int num_cand = (a->num_eos + 1 > 2 ? a->num_eos + 1 : 2) * nb;  /* transformers' count */
    if (num_cand > nb * V) num_cand = nb * V;
    *a->steps_done = *a->steps_run = 0;
    if (max_new == 0) {  /* the prompts, num_return times each */
        for (int r = 0; r < B * a->num_return; r++)
            memcpy(a->out + (size_t)r * width, a->prompt + (size_t)(r / a->num_return) * t0, (size_t)t0 * sizeof(int32_t));
        return XO_OK;
    }
    if (a->stops.num || a->should_stop || a->on_token)
        return xo_fail(XO_EINVAL, "num_beams > 1 takes no stop_strings, stopping_criteria or streamer");
    xo_cache *cache = NULL, *moved = NULL;
    float *logits = malloc((size_t)R * V * sizeof *logits);
    void *work = calloc((size_t)V * 3 + width, sizeof(float));
    int32_t *seqs = malloc((size_t)R * width * sizeof *seqs), *fresh = malloc((size_t)R * width * sizeof *fresh);
    int32_t *next = malloc((size_t)R * sizeof *next);
    int *src = malloc((size_t)R * sizeof *src);
    float *beam_scores = malloc((size_t)R * sizeof *beam_scores), *new_scores = malloc((size_t)R * sizeof *new_scores);
    candidate *cand = malloc((size_t)num_cand * sizeof *cand);
    hypotheses *hyps = calloc((size_t)B, sizeof *hyps);
    int32_t *hyp_tokens = malloc((size_t)B * (nb + 1) * max_new * sizeof *hyp_tokens);
    hypothesis *hyp_slots = calloc((size_t)B * (nb + 1), sizeof *hyp_slots);
    xo_status rc = XO_OK;
    if (!logits || !work || !seqs || !fresh || !next || !src || !beam_scores || !new_scores || !cand || !hyps ||
        !hyp_tokens || !hyp_slots) {
        rc = xo_fail(XO_ENOMEM, "out of memory in beam search");
        goto out;
    }
    for (int i = 0; i < B; i++) {
        hyps[i].h = hyp_slots + (size_t)i * (nb + 1);
        hyps[i].worst = 1e9f;
        for (int k = 0; k <= nb; k++) hyps[i].h[k].tokens = hyp_tokens + ((size_t)i * (nb + 1) + k) * max_new;
    }
    for (int r = 0; r < R; r++) {
        memcpy(seqs + (size_t)r * width, a->prompt + (size_t)(r / nb) * t0, (size_t)t0 * sizeof *seqs);
        beam_scores[r] = r % nb == 0 ? 0.0f : -1e9f;  /* the first step expands beam 0 only */
        src[r] = r / nb;
    }
    int steps = 0;
    /* prefill once per prompt, then one cache row per beam */
    xo_cache *prompt_cache = a->cache;
    if (!prompt_cache) rc = xo_cache_create(&prompt_cache, &m->cfg, m->be, B, a->cache_format, m->weight_dtype);
    if (rc == XO_OK) rc = xo_generate_prefill(m, a, prompt_cache, logits, NULL, NULL);
    if (rc == XO_OK) rc = xo_cache_gather(&cache, prompt_cache, src, R);
    if (prompt_cache != a->cache) xo_cache_free(prompt_cache);
    for (int r = R - 1; rc == XO_OK && r >= 0; r--)
        memmove(logits + (size_t)r * V, logits + (size_t)(r / nb) * V, (size_t)V * sizeof *logits);
    int all_done = 0;
    for (int step = 0; rc == XO_OK && step < max_new && !all_done; step++) {
        if (a->raw_logits) memcpy(a->raw_logits + (size_t)step * R * V, logits, (size_t)R * V * sizeof *logits);
        for (int r = 0; r < R; r++) {
            float *z = logits + (size_t)r * V;
            log_softmax(z, V);
            xo_generate_process_row(a, r / nb, z, V, seqs + (size_t)r * width, t0 + step, step, work);
        }
        if (a->process_logits) rc = a->process_logits(a->ctx, seqs, width, t0 + step, R, logits, V);
        for (int r = 0; rc == XO_OK && r < R; r++) rc = xo_logits_check(logits + (size_t)r * V, V, r);
        if (rc != XO_OK) break;
        if (a->scores) memcpy(a->scores + (size_t)step * R * V, logits, (size_t)R * V * sizeof *logits);
        all_done = 1;
        for (int i = 0; i < B; i++) {
            const int base = i * nb;
            if (hyps[i].done) {  /* finished prompts keep padding */
                for (int j = 0; j < nb; j++) {
                    next[base + j] = a->pad_id;
                    new_scores[base + j] = 0.0f;
                    src[base + j] = base + j;
                }
                continue;
            }
            top_candidates(cand, num_cand, logits + (size_t)base * V, beam_scores + base, nb, V);
            int kept = 0;
            for (int rank = 0; rank < num_cand && kept < nb; rank++) {
                const int beam = cand[rank].index / V;
                const int32_t tok = cand[rank].index % V;
                if (xo_generate_is_eos(a, tok)) {
                    if (rank < nb)
                        add_hypothesis(&hyps[i], nb, seqs + (size_t)(base + beam) * width + t0, step, cand[rank].score,
                                       a->length_penalty, step + 1);
                    continue;
                }
                next[base + kept] = tok;
                new_scores[base + kept] = cand[rank].score;
                src[base + kept] = base + beam;
                kept++;
            }
            hyps[i].done = is_done(&hyps[i], a, cand[0].score, step + 1);
            all_done &= hyps[i].done;
        }
        /* the beams' sequences and cache rows follow their sources */
        for (int r = 0; r < R; r++) {
            memcpy(fresh + (size_t)r * width, seqs + (size_t)src[r] * width, (size_t)(t0 + step) * sizeof *seqs);
            fresh[(size_t)r * width + t0 + step] = next[r];
        }
        int32_t *swap = seqs;
        seqs = fresh;
        fresh = swap;
        memcpy(beam_scores, new_scores, (size_t)R * sizeof *beam_scores);
        steps = *a->steps_run = step + 1;
        if (all_done || steps == max_new) break;
        rc = xo_interrupt_poll(m->interrupt);
        if (rc != XO_OK) break;
        int identity = 1;
        for (int r = 0; r < R; r++) identity &= src[r] == r;
        if (!identity) {
            rc = xo_cache_gather(&moved, cache, src, R);
            if (rc != XO_OK) break;
            xo_cache_free(cache);
            cache = moved;
            moved = NULL;
        }
        xo_forward_args sa = { .batch = R, .tokens = 1, .ids = next, .cache = cache, .logits = logits, .logits_to_keep = 1 };
        rc = xo_model_forward(m, &sa);
    }
    if (rc != XO_OK) goto out;
    /* prompts still running at the end: their beams become hypotheses as they stand */
    for (int i = 0; i < B; i++)
        for (int j = 0; !hyps[i].done && j < nb; j++)
            add_hypothesis(&hyps[i], nb, seqs + (size_t)(i * nb + j) * width + t0, steps, beam_scores[i * nb + j],
                           a->length_penalty, steps);
    /* the num_return best of each prompt (among equal scores the one added last); the output
     * is as wide as the longest of them plus its EOS */
    int longest = 0;
    for (int i = 0; i < B; i++) {
        hypotheses *hs = &hyps[i];
        for (int k = 0; k < a->num_return; k++) {
            int best = -1;
            for (int c = 0; c < hs->count; c++)
                if (!hs->h[c].taken && (best < 0 || hs->h[c].score >= hs->h[best].score)) best = c;
            hs->h[best].taken = k + 1;
            longest = hs->h[best].len > longest ? hs->h[best].len : longest;
        }
    }
    const int out_new = longest + 1 < max_new ? longest + 1 : max_new;
    for (int i = 0; i < B; i++)
        for (int c = 0; c < hyps[i].count; c++) {
            const hypothesis *h = &hyps[i].h[c];
            if (!h->taken) continue;
            const int k = i * a->num_return + h->taken - 1;
            int32_t *row = a->out + (size_t)k * width;
            memcpy(row, a->prompt + (size_t)i * t0, (size_t)t0 * sizeof *row);
            memcpy(row + t0, h->tokens, (size_t)h->len * sizeof *row);
            for (int p = h->len; p < out_new; p++) row[t0 + p] = a->pad_id;
            if (h->len < out_new && a->num_eos) row[t0 + h->len] = a->eos_ids[0];
            if (a->sequence_scores) a->sequence_scores[k] = h->score;
        }
    *a->steps_done = out_new;
out:
    xo_cache_free(cache);
    free(logits);
    free(work);
    free(seqs);
    free(fresh);
    free(next);
    free(src);
    free(beam_scores);
    free(new_scores);
    free(cand);
    free(hyps);
    free(hyp_tokens);
    free(hyp_slots);
    return rc;
}
