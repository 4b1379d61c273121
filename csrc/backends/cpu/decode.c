/* The bookkeeping of one decode-session step on the CPU (see xo_decode_state). */
#include <math.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

xo_status xo_cpu_decode_begin(xo_backend *be, const xo_decode_state *st) {
    /* a long decode re-sizes its team each step, as other work comes and goes */
    const int team = xo_cpu_team(xo_cpu_ctx_of(be));
    if (team != omp_get_max_threads()) omp_set_num_threads(team);
    const int32_t past = st->state[0];
    for (int r = 0; r < st->batch; r++) {
        const int32_t p = st->next_pos[r];
        st->ids[r] = st->tokens[r];
        st->pos[r] = p;
        st->next_pos[r] = p + 1;
        st->cache_pos[(size_t)r * st->capacity + past] = p;
        st->cache_mask[(size_t)r * st->capacity + past] = 1;
    }
    return XO_OK;
}

xo_status xo_cpu_decode_end(xo_backend *be, const xo_decode_state *st) {
    (void)be;
    const int32_t step = st->state[1];
    int32_t *out = st->out + (size_t)(step % st->ring) * st->batch;
    for (int r = 0; r < st->batch; r++) {
        int32_t tok = st->tokens[r];
        if (st->finished[r]) {
            tok = st->pad_id;
        } else {
            for (int i = 0; i < st->num_eos; i++)
                if (st->eos[i] == tok) st->finished[r] = 1;
        }
        st->tokens[r] = tok;
        out[r] = tok;
    }
    st->state[0]++;
    st->state[1]++;
    return XO_OK;
}

xo_status xo_cpu_suppress_tokens(xo_backend *be, float *logits, int rows, int cols, const int32_t *ids, int n,
                                 const int32_t *step_device, int below) {
    (void)be;
    if (*step_device >= below) return XO_OK;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) logits[(size_t)r * cols + ids[i]] = -INFINITY;
    return XO_OK;
}
