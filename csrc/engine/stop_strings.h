/* Stop strings: a row stops once its text ends with one of them (transformers'
 * StopStringCriteria), matched on the bytes of the tokens. */
#ifndef XO_STOP_STRINGS_H
#define XO_STOP_STRINGS_H

#include <stdint.h>

#include "engine/status.h"

typedef struct {
    const uint8_t *token_bytes;    /* every token's bytes back to back (the tokenizer's) */
    const int64_t *token_offsets;  /* [vocab + 1]: token v is token_bytes[off[v] .. off[v+1]) */
    int vocab;                     /* tokens in that table */
    const uint8_t *strings;        /* the stop strings' UTF-8 bytes back to back */
    const int32_t *string_offsets; /* [num + 1] */
    int num;                       /* 0: no stop strings */
} xo_stop_strings;

xo_status xo_stop_strings_check(const xo_stop_strings *s, int V);
/* 1 when the bytes of seq[0 .. len) end with a stop string that overlaps seq's last token. */
int xo_stop_strings_hit(const xo_stop_strings *s, const int32_t *seq, int len);

#endif
