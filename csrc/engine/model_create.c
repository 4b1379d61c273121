/* The model's lifetime: creation on a backend, weights, release, and the lock of one call. */
#include "engine/model.h"

#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "engine/rope.h"

xo_status xo_model_create(xo_model **out, const xo_config *cfg, xo_backend *be, xo_dtype weight_dtype,
                          const xo_options *opts) {
    xo_config c = *cfg;
    xo_status rc = xo_config_validate(&c);
    if (rc == XO_OK && c.head_dim > 1024) rc = xo_fail(XO_EINVAL, "config: head_dim %d above the supported 1024", c.head_dim);
    /* checked here, not at the first forward: a model its backend cannot run is refused outright */
    if (rc == XO_OK && c.use_moe && be->max_experts > 0 && c.num_experts > be->max_experts)
        rc = xo_fail(XO_EINVAL, "config: moe_config.num_experts = %d is above the %d the %s backend (device %d) supports",
                     c.num_experts, be->max_experts, be->name, be->device_index);
    if (rc != XO_OK) { be->destroy(be); return rc; }
    xo_model *m = calloc(1, sizeof *m);
    if (!m) { be->destroy(be); return xo_fail(XO_ENOMEM, "out of memory"); }
    m->cfg = c;
    m->be = be;
    xo_backend_fill_defaults(be);
    m->weight_dtype = weight_dtype;
    m->prefill_chunk = opts->prefill_chunk ? opts->prefill_chunk : be->prefill_chunk;
    pthread_mutex_init(&m->lock, NULL);
    float host[512];
    xo_yarn_frequencies(&c, host, &m->mscale);
    m->inv_freq = be->mem.alloc(be, (size_t)c.head_dim / 2 * sizeof(float));
    if (!m->inv_freq) { xo_model_free(m); return xo_fail_more(XO_ENOMEM, "out of memory"); }
    rc = be->mem.upload(be, m->inv_freq, host, (size_t)c.head_dim / 2 * sizeof(float));
    if (rc != XO_OK) { xo_model_free(m); return rc; }
    *out = m;
    return XO_OK;
}

xo_status xo_model_load(xo_model *m, const xo_tensor_view *tensors, int n, const char *prefix, int check_finite) {
    return xo_weights_load(&m->w, &m->cfg, m->be, m->weight_dtype, tensors, n, prefix, check_finite);
}

xo_status xo_model_init_random(xo_model *m, uint64_t seed) {
    return xo_weights_random(&m->w, &m->cfg, m->be, m->weight_dtype, seed);
}

void xo_model_free(xo_model *m) {
    if (!m) return;
    xo_weights_free(&m->w, &m->cfg, m->be);
    m->be->mem.release(m->be, m->inv_freq);
    m->be->destroy(m->be);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void xo_model_lock(xo_model *m) {
    pthread_mutex_lock(&m->lock);
    if (m->be->enter) m->be->enter(m->be);
}

xo_status xo_model_lock_interruptible(xo_model *m, const xo_interrupt *interrupt) {
    int e = pthread_mutex_trylock(&m->lock);
    while (e == EBUSY || e == ETIMEDOUT) {
        XO_TRY(xo_interrupt_poll(interrupt));
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 20 * 1000 * 1000;  /* how long an interrupt may wait to be seen */
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        e = pthread_mutex_timedlock(&m->lock, &until);
    }
    if (e != 0) return xo_fail(XO_EDEVICE, "cannot take the model's lock (error %d)", e);
    m->interrupt = interrupt;
    if (m->be->enter) m->be->enter(m->be);
    return XO_OK;
}

void xo_model_unlock(xo_model *m) {
    if (m->be->leave) m->be->leave(m->be);
    m->interrupt = NULL;
    pthread_mutex_unlock(&m->lock);
}
