/* C entry points for tests (xoron._testing, reached through ctypes, like testing/hooks.c): the
 * steps the kernel table fuses (matmul_pair, rmsnorm_cache_write, rope_kv_cache_write, ffn, the
 * rmsnorm_* products) on the CPU (device < 0) or a CUDA device, either through the backend's own
 * entry or through the default composed from its plain entries (backends/defaults.c), so a test
 * can hold the fused kernel to both the composition and an oracle; and a whole forward pass either
 * way. Host arrays in and out; caches as their raw bytes; rmsnorm_cache_write's scratch aliases x,
 * as in the graph. Each returns 0, or -status. Not used by the engine. */
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"
#include "engine/model.h"

#define XO_EXPORT __attribute__((visibility("default")))

/* a backend for `device`; fused == 0: the fused entries replaced by their defaults */
static xo_status make_backend(xo_backend **be, const char *plugin, int device, int fused) {
    xo_options o;
    XO_TRY(xo_options_init(&o));
    if (device < 0) {
        XO_TRY(xo_cpu_backend_create(be, &o));
    } else {
        xo_cuda_set_plugin_path(plugin);
        XO_TRY(xo_cuda_backend_create(be, device, &o));
    }
    xo_backend_fill_defaults(*be);
    if (!fused) {
        (*be)->ops.matmul_pair = NULL;
        (*be)->ops.rmsnorm_cache_write = NULL;
        (*be)->ops.rope_kv_cache_write = NULL;
        (*be)->ops.ffn = NULL;
        (*be)->ops.rmsnorm_matmul = NULL;
        (*be)->ops.rmsnorm_matmul_pair = NULL;
        (*be)->ops.rmsnorm_ffn = NULL;
        xo_backend_fill_defaults(*be);
    }
    return XO_OK;
}

/* device copies of host arrays, released together */
typedef struct {
    xo_backend *be;
    void *p[12];
    int n;
} dev_arrays;

static void *put(dev_arrays *d, const void *host, size_t bytes, xo_status *rc) {
    if (*rc != XO_OK) return NULL;
    void *p = d->n < (int)(sizeof d->p / sizeof d->p[0]) ? d->be->mem.alloc(d->be, bytes) : NULL;
    if (!p) {
        *rc = XO_ENOMEM;
        return NULL;
    }
    d->p[d->n++] = p;
    if (host) *rc = d->be->mem.upload(d->be, p, host, bytes);
    return p;
}

static void release(dev_arrays *d) {
    for (int i = 0; i < d->n; i++) d->be->mem.release(d->be, d->p[i]);
    d->be->destroy(d->be);
}

static xo_status load_linear(xo_backend *be, xo_linear *L, int dtype, int out, int in, const float *w) {
    memset(L, 0, sizeof *L);
    L->out = out;
    L->in = in;
    L->dtype = (xo_dtype)dtype;
    return be->weights.linear_init(be, L, w, XO_F32, 0, out);
}

/* y1[m, out1] = x @ w1.T (rotated when rotate: heads * hd == out1, pos [m], inv_freq [hd/2]),
 * y2[m, out2] = x @ w2.T, weights float32 stored as `dtype` */
XO_EXPORT int xo_hook_matmul_pair(const char *plugin, int device, int fused, int dtype, int out1, int out2, int in,
                                  int m, const float *w1, const float *w2, const float *x, int rotate, int heads, int hd,
                                  const int32_t *pos, const float *inv_freq, float mscale, float *y1, float *y2) {
    dev_arrays d = { 0 };
    xo_status rc = make_backend(&d.be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    xo_linear L1, L2;
    memset(&L1, 0, sizeof L1);
    memset(&L2, 0, sizeof L2);
    rc = load_linear(d.be, &L1, dtype, out1, in, w1);
    if (rc == XO_OK) rc = load_linear(d.be, &L2, dtype, out2, in, w2);
    const float *dx = put(&d, x, (size_t)m * in * sizeof(float), &rc);
    float *dy1 = put(&d, NULL, (size_t)m * out1 * sizeof(float), &rc);
    float *dy2 = put(&d, NULL, (size_t)m * out2 * sizeof(float), &rc);
    const int32_t *dpos = put(&d, pos, (size_t)m * sizeof(int32_t), &rc);
    const float *dfreq = put(&d, inv_freq, (size_t)(hd / 2 > 0 ? hd / 2 : 1) * sizeof(float), &rc);
    const xo_rotary rot = { .pos = dpos, .heads = heads, .head_dim = hd, .inv_freq = dfreq, .mscale = mscale };
    if (rc == XO_OK) rc = d.be->ops.matmul_pair(d.be, dy1, &L1, dy2, &L2, dx, m, rotate ? &rot : NULL);
    if (rc == XO_OK) rc = d.be->mem.download(d.be, y1, dy1, (size_t)m * out1 * sizeof(float));
    if (rc == XO_OK) rc = d.be->mem.download(d.be, y2, dy2, (size_t)m * out2 * sizeof(float));
    d.be->weights.linear_free(d.be, &L1);
    d.be->weights.linear_free(d.be, &L2);
    release(&d);
    return -(int)rc;
}

/* cache [batch, capacity, d] of cache_dtype (its bytes, in and out) <- rmsnorm of x [batch*n, d] at
 * slots start.., read from device memory when start_on_device (the host value passed is then 0,
 * which a backend ignoring the device's would show) */
XO_EXPORT int xo_hook_rmsnorm_cache_write(const char *plugin, int device, int fused, int cache_dtype, int capacity,
                                          int start, int start_on_device, const float *x, const float *w, int batch,
                                          int n, int d, float eps, void *cache) {
    dev_arrays da = { 0 };
    xo_status rc = make_backend(&da.be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    const size_t cache_bytes = (size_t)batch * capacity * d * xo_dtype_size((xo_dtype)cache_dtype);
    const int32_t start_host = start;
    float *dx = put(&da, x, (size_t)batch * n * d * sizeof(float), &rc);
    const float *dw = put(&da, w, (size_t)d * sizeof(float), &rc);
    void *dcache = put(&da, cache, cache_bytes, &rc);
    const int32_t *dstart = put(&da, &start_host, sizeof start_host, &rc);
    if (rc == XO_OK)
        rc = da.be->ops.rmsnorm_cache_write(da.be, dcache, (xo_dtype)cache_dtype, capacity,
                                            start_on_device ? 0 : start, start_on_device ? dstart : NULL, dx, dx,
                                            dw, batch, n, d, eps);
    if (rc == XO_OK) rc = da.be->mem.download(da.be, cache, dcache, cache_bytes);
    release(&da);
    return -(int)rc;
}

/* k and v caches [batch, capacity, heads*hd] of cache_dtype (bytes in and out) <- RoPE(K), V of
 * kv [batch*n, 2*heads*hd] at slots start.. (read as in xo_hook_rmsnorm_cache_write), row i at pos[i] */
XO_EXPORT int xo_hook_rope_kv_cache_write(const char *plugin, int device, int fused, int cache_dtype, int capacity,
                                          int start, int start_on_device, const float *kv, int batch, int n, int heads,
                                          int hd, const int32_t *pos, const float *inv_freq, float mscale, void *k_cache,
                                          void *v_cache) {
    dev_arrays da = { 0 };
    xo_status rc = make_backend(&da.be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    const size_t W = (size_t)heads * hd, rows = (size_t)batch * n;
    const size_t cache_bytes = (size_t)batch * capacity * W * xo_dtype_size((xo_dtype)cache_dtype);
    const int32_t start_host = start;
    float *dkv = put(&da, kv, rows * 2 * W * sizeof(float), &rc);
    void *dk = put(&da, k_cache, cache_bytes, &rc);
    void *dv = put(&da, v_cache, cache_bytes, &rc);
    const int32_t *dpos = put(&da, pos, rows * sizeof(int32_t), &rc);
    const float *dfreq = put(&da, inv_freq, (size_t)(hd / 2 > 0 ? hd / 2 : 1) * sizeof(float), &rc);
    const int32_t *dstart = put(&da, &start_host, sizeof start_host, &rc);
    const xo_rotary rot = { .pos = dpos, .heads = heads, .head_dim = hd, .inv_freq = dfreq, .mscale = mscale };
    if (rc == XO_OK)
        rc = da.be->ops.rope_kv_cache_write(da.be, dk, dv, (xo_dtype)cache_dtype, capacity,
                                            start_on_device ? 0 : start, start_on_device ? dstart : NULL, dkv,
                                            batch, n, &rot);
    if (rc == XO_OK) rc = da.be->mem.download(da.be, k_cache, dk, cache_bytes);
    if (rc == XO_OK) rc = da.be->mem.download(da.be, v_cache, dv, cache_bytes);
    release(&da);
    return -(int)rc;
}

/* out[n, hidden] = swiglu(x @ gate_up.T) @ down.T, gate_up [2*inter, hidden] (gate rows first) and
 * down [hidden, inter] float32 stored as `dtype`, x [n, hidden] */
XO_EXPORT int xo_hook_ffn(const char *plugin, int device, int fused, int dtype, int hidden, int inter, int n,
                          const float *gate_up, const float *down, const float *x, float *out) {
    dev_arrays d = { 0 };
    xo_status rc = make_backend(&d.be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    xo_ffn f;
    memset(&f, 0, sizeof f);
    rc = load_linear(d.be, &f.gate_up, dtype, 2 * inter, hidden, gate_up);
    if (rc == XO_OK) rc = load_linear(d.be, &f.down, dtype, hidden, inter, down);
    const float *dx = put(&d, x, (size_t)n * hidden * sizeof(float), &rc);
    float *dout = put(&d, NULL, (size_t)n * hidden * sizeof(float), &rc);
    float *dgu = put(&d, NULL, (size_t)n * 2 * inter * sizeof(float), &rc);
    float *dact = put(&d, NULL, (size_t)n * inter * sizeof(float), &rc);
    if (rc == XO_OK) rc = d.be->ops.ffn(d.be, dout, dx, &f, n, dgu, dact);
    if (rc == XO_OK) rc = d.be->mem.download(d.be, out, dout, (size_t)n * hidden * sizeof(float));
    d.be->weights.linear_free(d.be, &f.gate_up);
    d.be->weights.linear_free(d.be, &f.down);
    release(&d);
    return -(int)rc;
}

/* One of the rmsnorm_* entries (entry 0: rmsnorm_matmul, 1: rmsnorm_matmul_pair, 2: rmsnorm_ffn) over
 * the norm of h [n, d] (add [n, d] added first when not NULL; norm weights norm_w [d]; keep as
 * xo_rmsnorm_in has it). w1 [out1, d] is the product's weights (the pair's first, the ffn's gate_up), w2
 * [out2, d] the pair's second or the ffn's down [out2, out1 / 2]; weights float32 stored as `dtype`.
 * y1 [n, out1] (ffn: [n, out2]) and y2 [n, out2] (pair) out, with h after the add in h_out and, with
 * keep, the normed rows in x_out. rotate, heads, hd, pos, inv_freq, mscale: the pair's rotation, as in
 * xo_hook_matmul_pair. */
XO_EXPORT int xo_hook_rmsnorm_product(const char *plugin, int device, int fused, int dtype, int entry, int n, int d,
                                      float eps, const float *h, const float *add, const float *norm_w, int keep,
                                      int out1, const float *w1, int out2, const float *w2, int rotate, int heads,
                                      int hd, const int32_t *pos, const float *inv_freq, float mscale, float *y1,
                                      float *y2, float *h_out, float *x_out) {
    dev_arrays da = { 0 };
    xo_status rc = make_backend(&da.be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    xo_backend *be = da.be;
    xo_linear L1, L2;
    memset(&L1, 0, sizeof L1);
    memset(&L2, 0, sizeof L2);
    const int in2 = entry == 2 ? out1 / 2 : d, rows1 = entry == 2 ? out2 : out1;
    rc = load_linear(be, &L1, dtype, out1, d, w1);
    if (rc == XO_OK && entry > 0) rc = load_linear(be, &L2, dtype, out2, in2, w2);
    const size_t hb = (size_t)n * d * sizeof(float);
    float *dh = put(&da, h, hb, &rc);
    const float *dadd = add ? put(&da, add, hb, &rc) : NULL;
    const float *dw = put(&da, norm_w, (size_t)d * sizeof(float), &rc);
    float *dx = put(&da, NULL, hb, &rc);
    float *dy1 = put(&da, NULL, (size_t)n * rows1 * sizeof(float), &rc);
    float *dy2 = put(&da, NULL, (size_t)n * (size_t)(entry == 2 ? out1 : out2) * sizeof(float), &rc);
    float *dact = entry == 2 ? put(&da, NULL, (size_t)n * (out1 / 2) * sizeof(float), &rc) : NULL;
    const int32_t *dpos = put(&da, pos, (size_t)n * sizeof(int32_t), &rc);
    const float *dfreq = put(&da, inv_freq, (size_t)(hd / 2 > 0 ? hd / 2 : 1) * sizeof(float), &rc);
    const xo_rotary rot = { .pos = dpos, .heads = heads, .head_dim = hd, .inv_freq = dfreq, .mscale = mscale };
    const xo_rmsnorm_in nm = { .h = dh, .add = dadd, .x = dx, .w = dw, .d = d, .eps = eps, .keep = keep };
    xo_ffn f = { .gate_up = L1, .down = L2 };
    if (rc == XO_OK) {
        if (entry == 0) rc = be->ops.rmsnorm_matmul(be, dy1, &nm, &L1, n);
        else if (entry == 1) rc = be->ops.rmsnorm_matmul_pair(be, dy1, &L1, dy2, &L2, &nm, n, rotate ? &rot : NULL);
        else rc = be->ops.rmsnorm_ffn(be, dy1, &nm, &f, n, dy2, dact);
    }
    if (rc == XO_OK) rc = be->mem.download(be, y1, dy1, (size_t)n * rows1 * sizeof(float));
    if (rc == XO_OK && entry == 1) rc = be->mem.download(be, y2, dy2, (size_t)n * out2 * sizeof(float));
    if (rc == XO_OK) rc = be->mem.download(be, h_out, dh, hb);
    if (rc == XO_OK && keep) rc = be->mem.download(be, x_out, dx, hb);
    be->weights.linear_free(be, &L1);
    be->weights.linear_free(be, &L2);
    release(&da);
    return -(int)rc;
}

/* A forward pass of a model with random weights (xo_model_init_random, seed 0) stored as `dtype`:
 * cfg = { vocab, hidden, intermediate, layers, heads, kv_heads, kv_lora_rank, q_lora_rank, use_moe,
 * experts, experts_per_tok, moe_layer_freq, moe_intermediate }; ids [batch, tokens]; logits [batch,
 * kept, V] out (logits_to_keep as the forward takes it); hidden [L+1, batch, tokens, H] out, or NULL;
 * prefill_chunk as the option (0: auto). fused == 0: every fused entry replaced by its default. */
XO_EXPORT int xo_hook_forward_fused(const char *plugin, int device, int fused, int dtype, const int *cfg, int batch,
                                    int tokens, const int32_t *ids, int logits_to_keep, int prefill_chunk,
                                    float *logits, float *hidden) {
    xo_config c = { .vocab_size = cfg[0], .hidden_size = cfg[1], .intermediate_size = cfg[2], .num_layers = cfg[3],
                    .num_heads = cfg[4], .num_kv_heads = cfg[5], .max_position_embeddings = 4096,
                    .rms_norm_eps = 1e-6f, .rope_theta = 10000.0f, .ring_chunk_size = 4096,
                    .kv_lora_rank = cfg[6], .q_lora_rank = cfg[7], .use_moe = cfg[8], .num_experts = cfg[9],
                    .experts_per_tok = cfg[10], .moe_layer_freq = cfg[11], .moe_intermediate_size = cfg[12] };
    xo_options o;
    xo_status rc = xo_options_init(&o);
    o.prefill_chunk = prefill_chunk;
    xo_backend *be = NULL;
    if (rc == XO_OK) rc = make_backend(&be, plugin, device, fused);
    if (rc != XO_OK) return -(int)rc;
    xo_model *m = NULL;
    rc = xo_model_create(&m, &c, be, (xo_dtype)dtype, &o); /* takes be, even on failure */
    if (rc == XO_OK) rc = xo_model_init_random(m, 0);
    if (rc == XO_OK) {
        xo_forward_args a = { .batch = batch, .tokens = tokens, .ids = ids, .logits = logits,
                              .logits_to_keep = logits_to_keep, .hidden = hidden };
        xo_model_lock(m);
        rc = xo_model_forward(m, &a);
        xo_model_unlock(m);
    }
    if (m) xo_model_free(m);
    return -(int)rc;
}
