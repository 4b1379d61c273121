/* A C entry point for tests and benchmarks (xoron._testing, through ctypes): one call of the
 * CUDA backend's prefill attention over a K/V cache, with the backend's options, timed on
 * request, with the tensor-core kernels' launch counts. Not part of the engine. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backends/backend.h"

#define XO_EXPORT __attribute__((visibility("default")))

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static xo_status upload_new(xo_backend *be, void **dst, const void *host, size_t bytes) {
    *dst = be->mem.alloc(be, bytes);
    if (!*dst) return XO_ENOMEM;
    return be->mem.upload(be, *dst, host, bytes);
}

/* out[batch * t, nh * hd] = attention of q [batch * t, nh * hd] (float32) over the cache k, v
 * [batch, cap, nkv * hd] of kv_dtype (xo_dtype: F16 or BF16), key_mask [batch, cap]; the queries
 * are sequence indices past .. past + t - 1 (cap >= past + t). The CUDA plugin at `plugin`, on
 * `device`, with n_opts options. reps > 0: *seconds = the mean time of reps more calls.
 * counts (optional): the backend's prefill attention counts {mma.sync, wgmma} after the first
 * call. 0 on success, else -status; the message in err (err_len bytes). */
XO_EXPORT int xo_hook_cuda_attention(const char *plugin, int device, const char *const *opt_names,
                                     const char *const *opt_values, int n_opts, int batch, int t, int past, int nh,
                                     int nkv, int hd, int cap, int kv_dtype, int key_block, const float *q,
                                     const void *k, const void *v, const uint8_t *mask, float scale, float eps,
                                     float *out, int reps, double *seconds, long long *counts, char *err,
                                     int err_len) {
    xo_cuda_set_plugin_path(plugin);
    xo_options o;
    xo_status rc = xo_options_init(&o);
    for (int i = 0; rc == XO_OK && i < n_opts; i++) rc = xo_options_set(&o, opt_names[i], opt_values[i]);
    xo_backend *be = NULL;
    if (rc == XO_OK) rc = xo_cuda_backend_create(&be, device, &o);
    const size_t nq = (size_t)batch * t * nh * hd, nkvel = (size_t)batch * cap * nkv * hd;
    const size_t es = kv_dtype == XO_F32 ? 4 : 2;
    void *dq = NULL, *dout = NULL, *dk = NULL, *dv = NULL, *dmask = NULL;
    if (rc == XO_OK) rc = upload_new(be, &dq, q, nq * sizeof(float));
    if (rc == XO_OK) rc = upload_new(be, &dk, k, nkvel * es);
    if (rc == XO_OK) rc = upload_new(be, &dv, v, nkvel * es);
    if (rc == XO_OK) rc = upload_new(be, &dmask, mask, (size_t)batch * cap);
    if (rc == XO_OK && !(dout = be->mem.alloc(be, nq * sizeof(float)))) rc = XO_ENOMEM;
    xo_attention_args a;
    memset(&a, 0, sizeof a);
    a.batch = batch;
    a.new_tokens = t;
    a.past = past;
    a.num_heads = nh;
    a.num_kv_heads = nkv;
    a.head_dim = hd;
    a.capacity = cap;
    a.format = XO_CACHE_KV;
    a.q = dq;
    a.out = dout;
    a.k = dk;
    a.v = dv;
    a.kv_dtype = (xo_dtype)kv_dtype;
    a.key_mask = dmask;
    a.mscale = 1.0f;
    a.scale = scale;
    a.denom_eps = eps;
    a.key_block = key_block;
    /* the weights' dtype picks the tensor-core kernels (16-bit models); K/V format reads no weight */
    xo_linear kv_b;
    memset(&kv_b, 0, sizeof kv_b);
    kv_b.dtype = (xo_dtype)kv_dtype;
    a.kv_b = &kv_b;
    if (rc == XO_OK) rc = be->ops.attention(be, &a);
    if (rc == XO_OK) rc = be->mem.synchronize(be);
    if (rc == XO_OK && counts) {
        counts[0] = counts[1] = -1;
        if (be->prefill_attention_counts) be->prefill_attention_counts(be, counts);
    }
    if (rc == XO_OK) rc = be->mem.download(be, out, dout, nq * sizeof(float));
    if (rc == XO_OK && reps > 0) {
        const double t0 = now_s();
        for (int i = 0; rc == XO_OK && i < reps; i++) rc = be->ops.attention(be, &a);
        if (rc == XO_OK) rc = be->mem.synchronize(be);
        *seconds = (now_s() - t0) / reps;
    }
    if (rc != XO_OK && err && err_len > 0) {
        const char *msg = xo_last_error();
        strncpy(err, msg ? msg : "", (size_t)err_len - 1);
        err[err_len - 1] = 0;
    }
    if (be) {
        void *bufs[] = { dq, dout, dk, dv, dmask };
        for (int i = 0; i < 5; i++)
            if (bufs[i]) be->mem.release(be, bufs[i]);
        be->destroy(be);
    }
    return rc == XO_OK ? 0 : -(int)rc;
}
