/* The rotary embedding's frequencies (SPEC section 5). */
#ifndef XO_ROPE_H
#define XO_ROPE_H

#include "engine/config.h"

/* The YaRN variant as trained: inv_freq [head_dim / 2] and the magnitude factor mscale. */
void xo_yarn_frequencies(const xo_config *c, float *inv_freq, float *mscale);

#endif
