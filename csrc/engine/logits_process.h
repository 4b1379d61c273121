/* Token bans applied to a row of scores before sampling (transformers' NoRepeatNGram and
 * NoBadWords processors): banned tokens become -inf. */
#ifndef XO_LOGITS_PROCESS_H
#define XO_LOGITS_PROCESS_H

#include <stdint.h>

#include "engine/status.h"

typedef struct {
    int no_repeat_ngram_size;     /* 0: off */
    const int32_t *bad_words;     /* the bad word sequences back to back */
    const int32_t *bad_offsets;   /* [num_bad + 1]: sequence i is bad_words[bad_offsets[i] .. bad_offsets[i+1]) */
    int num_bad;
} xo_logits_bans;

xo_status xo_logits_bans_check(const xo_logits_bans *b, int V);
/* seq: the row's ids so far (len of them); each token that would repeat an n-gram of seq, or
 * complete a bad word, gets -inf in z [V]. */
void xo_logits_ban(const xo_logits_bans *b, float *z, int V, const int32_t *seq, int len);

#endif
