#include "engine/sampling.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void xo_rng_seed(xo_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) { /* splitmix64 expansion */
        uint64_t z = (seed += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        r->s[i] = z ^ (z >> 31);
    }
}

double xo_rng_uniform(xo_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

xo_status xo_sampling_check(const xo_sampling_params *p) {
    if (p->do_sample && !(p->temperature > 0.0f))
        return xo_fail(XO_EINVAL, "temperature must be > 0 when sampling (got %g)", p->temperature);
    if (!isfinite(p->temperature)) return xo_fail(XO_EINVAL, "temperature must be finite");
    if (p->top_k < 0) return xo_fail(XO_EINVAL, "top_k must be >= 0 (got %d)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) return xo_fail(XO_EINVAL, "top_p must be in (0, 1] (got %g)", p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) return xo_fail(XO_EINVAL, "min_p must be in [0, 1] (got %g)", p->min_p);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return xo_fail(XO_EINVAL, "repetition_penalty must be > 0 (got %g)", p->repetition_penalty);
    return XO_OK;
}

/* Nucleus order: indices by descending logit, lower index first on ties. */
static int by_logit_desc(const void *a, const void *b, void *keys) {
    const float *sort_keys = keys;
    int i = *(const int *)a, j = *(const int *)b;
    if (sort_keys[i] > sort_keys[j]) return -1;
    if (sort_keys[i] < sort_keys[j]) return 1;
    return (i > j) - (i < j);
}

static int argmax(const float *x, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (x[v] > x[best]) best = v;
    return best;
}

/* k-th largest value (1-based k <= V) by quickselect on a copy. */
static float kth_largest(const float *x, int V, int k, float *tmp) {
    memcpy(tmp, x, (size_t)V * sizeof *tmp);
    int lo = 0, hi = V - 1, want = k - 1;
    while (lo < hi) {
        float pivot = tmp[(lo + hi) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > pivot) i++;
            while (tmp[j] < pivot) j--;
            if (i <= j) { float t = tmp[i]; tmp[i] = tmp[j]; tmp[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return tmp[want];
}

/* A float row of values computed in double (y(v)), stored so that it cannot overflow: as the
 * float operations would round them whenever the largest fits a float (double rounding of
 * one multiply or divide is exact), else minus the row's maximum, which leaves the choice
 * and the distribution as they are, so the limit of a tiny temperature or penalty is the
 * greedy token and not whichever comes first or last. A +inf maximum leaves its ties. */
static void store_row(float *z, int V, double mx, double (*y)(const float *z, int v, const void *ctx), const void *ctx) {
    const double shift = mx > FLT_MAX || mx < -FLT_MAX ? mx : 0.0;
    for (int v = 0; v < V; v++) {
        double x = y(z, v, ctx);
        if (shift == INFINITY) x = x == INFINITY ? 0.0 : -INFINITY;
        else x -= shift;
        z[v] = x < -FLT_MAX ? -INFINITY : x > FLT_MAX ? INFINITY : (float)x;
    }
}

typedef struct { double penalty; const float *seen; } penalty_ctx;

static double penalized(const float *z, int v, const void *p) {
    const penalty_ctx *c = p;
    if (c->seen[v] != 1.0f) return z[v];
    return z[v] < 0 ? z[v] * c->penalty : z[v] / c->penalty;
}

void xo_penalize_repetition(float *z, int V, float penalty, const int32_t *history, int n, void *work) {
    float *seen = (float *)work + V;
    const penalty_ctx ctx = { penalty, seen };
    int overflow = 0;
    for (int i = 0; i < n; i++) {
        int32_t t = history[i];
        if (t < 0 || t >= V || seen[t] == 1.0f) continue;
        seen[t] = 1.0f;
        double y = penalized(z, t, &ctx);
        overflow |= y > FLT_MAX || y < -FLT_MAX;
    }
    if (!overflow) {
        for (int i = 0; i < n; i++) /* each seen token once: the marks go as they are used */
            if (history[i] >= 0 && history[i] < V && seen[history[i]] == 1.0f) {
                z[history[i]] = (float)penalized(z, history[i], &ctx);
                seen[history[i]] = 0.0f;
            }
        return;
    }
    double mx = -INFINITY;
    for (int v = 0; v < V; v++) {
        double y = penalized(z, v, &ctx);
        mx = y > mx ? y : mx;
    }
    store_row(z, V, mx, penalized, &ctx);
    for (int i = 0; i < n; i++)
        if (history[i] >= 0 && history[i] < V) seen[history[i]] = 0.0f;
}

static double tempered(const float *z, int v, const void *temperature) {
    return z[v] / *(const double *)temperature;
}

xo_status xo_logits_check(const float *z, int V, int row) {
    for (int v = 0; v < V; v++)
        if (z[v] != z[v]) return xo_fail(XO_EINVAL, "logits contain NaN at row %d (token %d)", row, v);
    return XO_OK;
}

xo_status xo_sample_row(float *z, int V, const xo_sampling_params *p, const int32_t *history, int n,
                        xo_rng *rng, void *work, int row, int32_t *token) {
    float *tmp = work;
    int *order = (int *)(tmp + 2 * (size_t)V);
    XO_TRY(xo_logits_check(z, V, row));
    int live = 0;
    for (int v = 0; v < V; v++) live |= z[v] != -INFINITY;
    if (!live) return xo_fail(XO_EINVAL, "no token is left to choose at row %d: every logit is -inf", row);
    if (p->repetition_penalty != 1.0f) xo_penalize_repetition(z, V, p->repetition_penalty, history, n, work);
    if (!p->do_sample) {
        *token = argmax(z, V);
        return XO_OK;
    }
    const double temperature = p->temperature;
    double top = z[argmax(z, V)];
    if (p->temperature != 1.0f || top == INFINITY) store_row(z, V, top / temperature, tempered, &temperature);
    if (p->top_k > 0 && p->top_k < V) { /* keep the top_k largest (and ties of the k-th) */
        float kth = kth_largest(z, V, p->top_k, tmp);
        for (int v = 0; v < V; v++)
            if (z[v] < kth) z[v] = -INFINITY;
    }
    if (p->top_p < 1.0f) { /* nucleus over the survivors */
        int m = 0;
        for (int v = 0; v < V; v++)
            if (z[v] != -INFINITY) order[m++] = v;
        qsort_r(order, (size_t)m, sizeof *order, by_logit_desc, z);
        double mx = z[order[0]], total = 0.0;
        for (int i = 0; i < m; i++) total += exp((double)z[order[i]] - mx);
        double cum = 0.0;
        for (int i = 0; i < m; i++) {
            /* drop a token once the probability before it already exceeds top_p; the top-1 and
             * the token that crosses top_p stay */
            if (i > 0 && cum > p->top_p) z[order[i]] = -INFINITY;
            cum += exp((double)z[order[i]] - mx) / total;
        }
    }
    float mx = z[argmax(z, V)];
    if (p->min_p > 0.0f) { /* after the other filters, as transformers' MinPLogitsWarper; the top token stays */
        const float floor = mx + logf(p->min_p);
        for (int v = 0; v < V; v++)
            if (z[v] < floor) z[v] = -INFINITY;
    }
    double total = 0.0;
    for (int v = 0; v < V; v++) total += z[v] == -INFINITY ? 0.0 : exp((double)z[v] - mx);
    double u = xo_rng_uniform(rng) * total, cum = 0.0;
    int last = 0;
    for (int v = 0; v < V; v++) {
        if (z[v] == -INFINITY) continue;
        cum += exp((double)z[v] - mx);
        last = v;
        if (u < cum) {
            *token = v;
            return XO_OK;
        }
    }
    *token = last;
    return XO_OK;
}
