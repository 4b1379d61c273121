#include "engine/logits_process.h"

#include <math.h>

xo_status xo_logits_bans_check(const xo_logits_bans *b, int V) {
    if (b->no_repeat_ngram_size < 0)
        return xo_fail(XO_EINVAL, "no_repeat_ngram_size must be >= 0 (got %d)", b->no_repeat_ngram_size);
    for (int i = 0; i < b->num_bad; i++) {
        if (b->bad_offsets[i + 1] <= b->bad_offsets[i])
            return xo_fail(XO_EINVAL, "bad_words_ids[%d] is empty", i);
        for (int j = b->bad_offsets[i]; j < b->bad_offsets[i + 1]; j++)
            if (b->bad_words[j] < 0 || b->bad_words[j] >= V)
                return xo_fail(XO_EINVAL, "bad_words_ids[%d] holds %d, outside [0, vocab_size=%d)", i, b->bad_words[j], V);
    }
    return XO_OK;
}

/* Every earlier n-gram whose first n-1 ids equal the last n-1 ids of seq bans its last id. */
static void ban_ngrams(int n, float *z, int V, const int32_t *seq, int len) {
    if (n <= 0 || len + 1 < n) return;
    const int32_t *tail = seq + len - (n - 1);
    for (int start = 0; start + n <= len; start++) {
        int same = 1;
        for (int k = 0; same && k < n - 1; k++) same = seq[start + k] == tail[k];
        const int32_t banned = seq[start + n - 1];
        if (same && banned >= 0 && banned < V) z[banned] = -INFINITY;
    }
}

/* A bad word of one id is always banned; a longer one bans its last id when seq ends with
 * the rest of it. */
static void ban_bad_words(const xo_logits_bans *b, float *z, const int32_t *seq, int len) {
    for (int i = 0; i < b->num_bad; i++) {
        const int32_t *w = b->bad_words + b->bad_offsets[i];
        const int prefix = b->bad_offsets[i + 1] - b->bad_offsets[i] - 1;
        if (prefix > len) continue;
        int match = 1;
        for (int k = 0; match && k < prefix; k++) match = seq[len - prefix + k] == w[k];
        if (match) z[w[prefix]] = -INFINITY;
    }
}

void xo_logits_ban(const xo_logits_bans *b, float *z, int V, const int32_t *seq, int len) {
    ban_ngrams(b->no_repeat_ngram_size, z, V, seq, len);
    ban_bad_words(b, z, seq, len);
}
