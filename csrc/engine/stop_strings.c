#include "engine/stop_strings.h"

xo_status xo_stop_strings_check(const xo_stop_strings *s, int V) {
    if (s->num == 0) return XO_OK;
    if (s->vocab < V)
        return xo_fail(XO_EINVAL, "stop_strings: the tokenizer has %d tokens, the model's vocab_size is %d", s->vocab, V);
    for (int i = 0; i < s->num; i++)
        if (s->string_offsets[i + 1] <= s->string_offsets[i]) return xo_fail(XO_EINVAL, "stop_strings[%d] is empty", i);
    return XO_OK;
}

static int64_t token_len(const xo_stop_strings *s, int32_t t) {
    return t < 0 || t >= s->vocab ? 0 : s->token_offsets[t + 1] - s->token_offsets[t];
}

/* Compares str (n bytes) with the last n bytes of seq's text, walking the tokens backwards. */
static int ends_with(const xo_stop_strings *s, const int32_t *seq, int len, const uint8_t *str, int64_t n) {
    int64_t want = n;  /* bytes of str still to match, from its end */
    for (int i = len - 1; i >= 0 && want > 0; i--) {
        const int64_t tl = token_len(s, seq[i]);
        const uint8_t *tb = s->token_bytes + (tl ? s->token_offsets[seq[i]] : 0);
        for (int64_t k = tl - 1; k >= 0 && want > 0; k--, want--)
            if (tb[k] != str[want - 1]) return 0;
    }
    return want == 0;
}

int xo_stop_strings_hit(const xo_stop_strings *s, const int32_t *seq, int len) {
    if (s->num == 0 || len == 0 || token_len(s, seq[len - 1]) == 0) return 0;
    for (int i = 0; i < s->num; i++)
        if (ends_with(s, seq, len, s->strings + s->string_offsets[i], s->string_offsets[i + 1] - s->string_offsets[i]))
            return 1;
    return 0;
}
