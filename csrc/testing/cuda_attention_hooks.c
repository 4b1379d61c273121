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
 * call. 0 on success, else -status; the message in err (err_len bytes). With o_w ([o_out, nh * hd]
 * float32 stored as o_dtype) instead: y [batch * t, o_out] = that output @ o.T through attention_o_proj,
 * the backend's own (fused) or the default composition, and out is not read back. */
static int attention_hook(const char *plugin, int device, const char *const *opt_names, const char *const *opt_values,
                          int n_opts, int batch, int t, int past, int nh, int nkv, int hd, int cap, int kv_dtype,
                          int key_block, const float *q, const void *k, const void *v, const uint8_t *mask,
                          float scale, float eps, float *out, int reps, double *seconds, long long *counts,
                          const float *o_w, int o_out, int o_dtype, int fused, float *y, char *err, int err_len) {
    xo_cuda_set_plugin_path(plugin);
    xo_options o;
    xo_status rc = xo_options_init(&o);
    for (int i = 0; rc == XO_OK && i < n_opts; i++) rc = xo_options_set(&o, opt_names[i], opt_values[i]);
    xo_backend *be = NULL;
    if (rc == XO_OK) rc = xo_cuda_backend_create(&be, device, &o);
    if (rc == XO_OK) {
        xo_backend_fill_defaults(be);
        if (!fused) {
            be->ops.attention_o_proj = NULL;
            xo_backend_fill_defaults(be);
        }
    }
    xo_linear ow;
    memset(&ow, 0, sizeof ow);
    ow.out = o_out;
    ow.in = nh * hd;
    ow.dtype = (xo_dtype)o_dtype;
    const size_t ny = (size_t)batch * t * o_out;
    void *dy = NULL;
    if (rc == XO_OK && o_w) rc = be->weights.linear_init(be, &ow, o_w, XO_F32, 0, o_out);
    if (rc == XO_OK && o_w && !(dy = be->mem.alloc(be, ny * sizeof(float)))) rc = XO_ENOMEM;
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
    if (rc == XO_OK) rc = o_w ? be->ops.attention_o_proj(be, dy, &a, &ow) : be->ops.attention(be, &a);
    if (rc == XO_OK) rc = be->mem.synchronize(be);
    if (rc == XO_OK && counts) {
        counts[0] = counts[1] = -1;
        if (be->prefill_attention_counts) be->prefill_attention_counts(be, counts);
    }
    if (rc == XO_OK) rc = o_w ? be->mem.download(be, y, dy, ny * sizeof(float))
                              : be->mem.download(be, out, dout, nq * sizeof(float));
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
        void *bufs[] = { dq, dout, dk, dv, dmask, dy };
        for (int i = 0; i < 6; i++)
            if (bufs[i]) be->mem.release(be, bufs[i]);
        if (ow.data) be->weights.linear_free(be, &ow);
        be->destroy(be);
    }
    return rc == XO_OK ? 0 : -(int)rc;
}

XO_EXPORT int xo_hook_cuda_attention(const char *plugin, int device, const char *const *opt_names,
                                     const char *const *opt_values, int n_opts, int batch, int t, int past, int nh,
                                     int nkv, int hd, int cap, int kv_dtype, int key_block, const float *q,
                                     const void *k, const void *v, const uint8_t *mask, float scale, float eps,
                                     float *out, int reps, double *seconds, long long *counts, char *err,
                                     int err_len) {
    return attention_hook(plugin, device, opt_names, opt_values, n_opts, batch, t, past, nh, nkv, hd, cap, kv_dtype,
                          key_block, q, k, v, mask, scale, eps, out, reps, seconds, counts, NULL, 0, XO_F32, 1, NULL,
                          err, err_len);
}

/* y [batch * t, o_out] = attention (as xo_hook_cuda_attention) @ o.T through attention_o_proj, o_w
 * [o_out, nh * hd] float32 stored as o_dtype; fused == 0: the default composition (attention, then
 * matmul) on the same backend */
XO_EXPORT int xo_hook_cuda_attention_o_proj(const char *plugin, int device, const char *const *opt_names,
                                            const char *const *opt_values, int n_opts, int fused, int batch, int t,
                                            int past, int nh, int nkv, int hd, int cap, int kv_dtype, int key_block,
                                            const float *q, const void *k, const void *v, const uint8_t *mask,
                                            float scale, float eps, const float *o_w, int o_out, int o_dtype,
                                            float *y, long long *counts, char *err, int err_len) {
    return attention_hook(plugin, device, opt_names, opt_values, n_opts, batch, t, past, nh, nkv, hd, cap, kv_dtype,
                          key_block, q, k, v, mask, scale, eps, NULL, 0, NULL, counts, o_w, o_out, o_dtype, fused, y,
                          err, err_len);
}
