/* The loss of SPEC section 6. */
#include "engine/model.h"

#include <math.h>

xo_status xo_cross_entropy(const float *logits, const int64_t *labels, int b, int t, int V, double *loss) {
    double total = 0.0;
    long count = 0;
    for (int r = 0; r < b; r++) {
        for (int i = 0; i + 1 < t; i++) {
            int64_t y = labels[(size_t)r * t + i + 1];
            if (y == -100) continue;
            if (y < 0 || y >= V)
                return xo_fail(XO_EINVAL, "label %lld at [%d, %d] is outside [0, vocab_size=%d) and is not -100",
                               (long long)y, r, i + 1, V);
            const float *z = logits + ((size_t)r * t + i) * V;
            float mx = z[0];
            for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
            double se = 0.0;
            for (int v = 0; v < V; v++) se += exp((double)z[v] - mx);
            total += log(se) + mx - z[y];
            count++;
        }
    }
    double l = count ? total / count : 0.0;
    *loss = l < 0.0 ? 0.0 : l > 100.0 ? 100.0 : l;
    return XO_OK;
}
