#include "engine/rope.h"

#include <math.h>

/* The YaRN constants the model was trained with (SPEC section 5). */
static const float YARN_ORIGINAL_CONTEXT = 8192.0f; /* L0: the context the base frequencies were trained for */
static const float YARN_BETA_FAST = 32.0f;
static const float YARN_BETA_SLOW = 1.0f;

/* In float32, with the trained ramp direction: the low indices (high frequencies) are
 * interpolated, the reverse of the published YaRN; checkpoints depend on it. */
void xo_yarn_frequencies(const xo_config *c, float *inv_freq, float *mscale) {
    const int d = c->head_dim;
    const float base = c->rope_theta, L0 = YARN_ORIGINAL_CONTEXT;
    const float s = (float)c->max_position_embeddings / L0;
    const float two_pi = 2.0f * (float)M_PI;
    float low = floorf((float)d * logf(L0 / (YARN_BETA_FAST * two_pi)) / (2.0f * logf(base)));
    float high = ceilf((float)d * logf(L0 / (YARN_BETA_SLOW * two_pi)) / (2.0f * logf(base)));
    if (low < 0.0f) low = 0.0f;
    if (high > (float)(d - 1)) high = (float)(d - 1);
    for (int i = 0; i < d / 2; i++) {
        /* base ** (2i / d) rounded once to float32 (powf can be an ulp off, and an ulp of a
         * frequency is ~1e-3 rad of angle at positions near 1e5) */
        float f = (float)pow((double)base, (double)((float)(2 * i) / (float)d));
        float extra = 1.0f / f, inter = 1.0f / (s * f);
        if ((float)i < low) {
            inv_freq[i] = inter;
        } else if ((float)i > high) {
            inv_freq[i] = extra;
        } else {
            float span = high - low > 1.0f ? high - low : 1.0f;
            float u = ((float)i - low) / span;
            inv_freq[i] = (1.0f - u) * inter + u * extra;
        }
    }
    *mscale = s <= 1.0f ? 1.0f : 0.1f * logf(s) + 1.0f;
}
