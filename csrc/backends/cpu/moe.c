/* MoE on the CPU: routing, then tokens grouped by expert so each expert runs once. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cpu/kernels.h"

xo_status xo_cpu_moe_route(xo_backend *be, int32_t *idx, float *weight, const float *logits, int n, int experts, int k) {
    (void)be;
    if (experts > 1024) return xo_fail(XO_EINVAL, "at most 1024 experts are supported");
    #pragma omp parallel for schedule(static) if (n > 64)
    for (int i = 0; i < n; i++) {
        const float *z = logits + (size_t)i * experts;
        float p[1024];
        float mx = z[0];
        for (int e = 1; e < experts; e++) mx = z[e] > mx ? z[e] : mx;
        float sum = 0.0f;
        for (int e = 0; e < experts; e++) { p[e] = expf(z[e] - mx); sum += p[e]; }
        for (int e = 0; e < experts; e++) p[e] /= sum;
        /* top-k by repeated selection: strict '>' keeps the lower index on ties */
        float picked_sum = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < experts; e++) {
                int taken = 0;
                for (int q = 0; q < j; q++) taken |= idx[(size_t)i * k + q] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            idx[(size_t)i * k + j] = best;
            weight[(size_t)i * k + j] = p[best];
            picked_sum += p[best];
        }
        for (int j = 0; j < k; j++) weight[(size_t)i * k + j] /= picked_sum + XO_TOPK_RENORM_EPS;
    }
    return XO_OK;
}

xo_status xo_cpu_moe_experts(xo_backend *be, const xo_moe_args *a) {
    const int n = a->tokens, K = a->top_k, E = a->num_experts, H = a->hidden;
    const size_t slots = (size_t)n * K;
    int max_inter = 0;
    for (int e = 0; e < E; e++) max_inter = a->experts[e].down.in > max_inter ? a->experts[e].down.in : max_inter;
    int *count = calloc((size_t)E + 1, sizeof *count);
    int *offset = calloc((size_t)E + 1, sizeof *offset);
    int32_t *slot_token = malloc(slots * sizeof *slot_token);   /* grouped slot -> token */
    int32_t *slot_of = malloc(slots * sizeof *slot_of);         /* (token, k) -> grouped slot */
    float *xg = malloc(slots * H * sizeof *xg);                  /* grouped inputs */
    float *yg = malloc(slots * H * sizeof *yg);                  /* grouped outputs */
    float *gu = malloc(slots * 2 * (size_t)max_inter * sizeof *gu);
    float *act = malloc(slots * (size_t)max_inter * sizeof *act);
    xo_status rc = XO_OK;
    if (!count || !offset || !slot_token || !slot_of || !xg || !yg || !gu || !act) {
        rc = xo_fail(XO_ENOMEM, "out of memory in the MoE layer (%d tokens)", n);
        goto out;
    }
    for (size_t s = 0; s < slots; s++) {
        int e = a->topk_idx[s];
        if (e < 0 || e >= E) { rc = xo_fail(XO_EINVAL, "router picked expert %d of %d", e, E); goto out; }
        count[e]++;
    }
    for (int e = 0; e < E; e++) offset[e + 1] = offset[e] + count[e];
    {
        int *fill = calloc((size_t)E, sizeof *fill);
        if (!fill) { rc = xo_fail(XO_ENOMEM, "out of memory"); goto out; }
        for (size_t s = 0; s < slots; s++) {
            int e = a->topk_idx[s];
            int g = offset[e] + fill[e]++;
            slot_token[g] = (int32_t)(s / K);
            slot_of[s] = g;
        }
        free(fill);
    }
    #pragma omp parallel for schedule(static) if (slots > 64)
    for (size_t g = 0; g < slots; g++)
        memcpy(xg + g * H, a->x + (size_t)slot_token[g] * H, (size_t)H * sizeof(float));
    for (int e = 0; e < E && rc == XO_OK; e++) {
        int m = count[e];
        if (!m) continue;
        const xo_ffn *f = &a->experts[e];
        int inter = f->down.in;
        rc = xo_cpu_matmul(be, gu, xg + (size_t)offset[e] * H, &f->gate_up, m);
        if (rc == XO_OK) rc = xo_cpu_swiglu(be, act, gu, m, inter);
        if (rc == XO_OK) rc = xo_cpu_matmul(be, yg + (size_t)offset[e] * H, act, &f->down, m);
    }
    if (rc == XO_OK) {
        #pragma omp parallel for schedule(static) if (n > 16)
        for (int i = 0; i < n; i++) {
            float *o = a->out + (size_t)i * H;
            for (int k = 0; k < K; k++) {
                float w = a->topk_weight[(size_t)i * K + k];
                const float *y = yg + (size_t)slot_of[(size_t)i * K + k] * H;
                #pragma omp simd
                for (int j = 0; j < H; j++) o[j] += w * y[j];
            }
        }
    }
out:
    free(count);
    free(offset);
    free(slot_token);
    free(slot_of);
    free(xg);
    free(yg);
    free(gu);
    free(act);
    return rc;
}
