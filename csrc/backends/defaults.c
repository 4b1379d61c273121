/* The defaults of the kernel table's optional slots, each composed from required entries,
 * for a backend that has no fused kernel for the step. */
#include "backends/backend.h"

/* y1 = x @ w1.T (rotated by rot when given), y2 = x @ w2.T */
static xo_status default_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2, const xo_linear *w2,
                                     const float *x, int m, const xo_rotary *rot) {
    XO_TRY(be->ops.matmul(be, y1, x, w1, m));
    XO_TRY(be->ops.matmul(be, y2, x, w2, m));
    if (!rot) return XO_OK;
    return be->ops.rope(be, y1, (size_t)w1->out, rot->pos, m, rot->heads, rot->head_dim, rot->inv_freq, rot->mscale);
}

/* the normed rows through `normed`, then into the cache */
static xo_status default_rmsnorm_cache_write(xo_backend *be, void *cache, xo_dtype cache_t, int capacity, int start,
                                             const int32_t *start_device, float *normed, const float *x,
                                             const float *w, int batch, int n, int d, float eps) {
    XO_TRY(be->ops.rmsnorm(be, normed, x, d, w, batch * n, d, eps));
    return be->ops.cache_write(be, cache, cache_t, capacity, d, start, start_device, normed, batch, n, d);
}

/* K rotated in place in kv, then K and V into their caches */
static xo_status default_rope_kv_cache_write(xo_backend *be, void *k_cache, void *v_cache, xo_dtype cache_t,
                                             int capacity, int start, const int32_t *start_device, float *kv, int batch,
                                             int n, const xo_rotary *rot) {
    const int W = rot->heads * rot->head_dim;
    XO_TRY(be->ops.rope(be, kv, 2 * (size_t)W, rot->pos, batch * n, rot->heads, rot->head_dim, rot->inv_freq,
                        rot->mscale));
    XO_TRY(be->ops.cache_write(be, k_cache, cache_t, capacity, W, start, start_device, kv, batch, n, 2 * W));
    return be->ops.cache_write(be, v_cache, cache_t, capacity, W, start, start_device, kv + W, batch, n, 2 * W);
}

/* act = swiglu(x @ gate_up.T), through gu [n, 2I] */
static xo_status default_gate_up_swiglu(xo_backend *be, float *act, const float *x, float *gu, const xo_linear *gate_up,
                                        int n) {
    XO_TRY(be->ops.matmul(be, gu, x, gate_up, n));
    return be->ops.swiglu(be, act, gu, n, gate_up->out / 2);
}

/* out = swiglu(x @ gate_up.T) @ down.T, through gu [n, 2I] and act [n, I] */
static xo_status default_ffn(xo_backend *be, float *out, const float *x, const xo_ffn *f, int n, float *gu, float *act) {
    XO_TRY(be->ops.gate_up_swiglu(be, act, x, gu, &f->gate_up, n));
    return be->ops.matmul(be, out, act, &f->down, n);
}

/* y = attention(a) @ o.T, through a->out */
static xo_status default_attention_o_proj(xo_backend *be, float *y, const xo_attention_args *a, const xo_linear *o) {
    XO_TRY(be->ops.attention(be, a));
    return be->ops.matmul(be, y, a->out, o, a->batch * a->new_tokens);
}

/* top-k of softmax(rmsnorm(x) @ router.T), through normed [n, H] and logits [n, E] */
static xo_status default_moe_router(xo_backend *be, int32_t *idx, float *weight, const float *x, const float *norm_w,
                                    const xo_linear *router, int n, int k, float *normed, float *logits) {
    const int H = router->in, E = router->out;
    XO_TRY(be->ops.rmsnorm(be, normed, x, H, norm_w, n, H, XO_ROUTER_NORM_EPS));
    XO_TRY(be->ops.matmul(be, logits, normed, router, n));
    return be->ops.moe_route(be, idx, weight, logits, n, E, k);
}

/* the norm of nm alone, its rows written to nm->x */
static xo_status rmsnorm_in(xo_backend *be, const xo_rmsnorm_in *nm, int n) {
    if (nm->add) return be->ops.add_rmsnorm(be, nm->h, nm->add, nm->x, nm->w, n, nm->d, nm->eps);
    return be->ops.rmsnorm(be, nm->x, nm->h, nm->d, nm->w, n, nm->d, nm->eps);
}

static xo_status default_rmsnorm_matmul(xo_backend *be, float *y, const xo_rmsnorm_in *nm, const xo_linear *w, int m) {
    XO_TRY(rmsnorm_in(be, nm, m));
    return be->ops.matmul(be, y, nm->x, w, m);
}

static xo_status default_rmsnorm_matmul_pair(xo_backend *be, float *y1, const xo_linear *w1, float *y2,
                                             const xo_linear *w2, const xo_rmsnorm_in *nm, int m, const xo_rotary *rot) {
    XO_TRY(rmsnorm_in(be, nm, m));
    return be->ops.matmul_pair(be, y1, w1, y2, w2, nm->x, m, rot);
}

static xo_status default_rmsnorm_ffn(xo_backend *be, float *out, const xo_rmsnorm_in *nm, const xo_ffn *f, int n,
                                     float *gu, float *act) {
    XO_TRY(rmsnorm_in(be, nm, n));
    return be->ops.ffn(be, out, nm->x, f, n, gu, act);
}

void xo_backend_fill_defaults(xo_backend *be) {
    if (!be->ops.matmul_pair) be->ops.matmul_pair = default_matmul_pair;
    if (!be->ops.rmsnorm_cache_write) be->ops.rmsnorm_cache_write = default_rmsnorm_cache_write;
    if (!be->ops.rope_kv_cache_write) be->ops.rope_kv_cache_write = default_rope_kv_cache_write;
    if (!be->ops.gate_up_swiglu) be->ops.gate_up_swiglu = default_gate_up_swiglu;
    if (!be->ops.moe_router) be->ops.moe_router = default_moe_router;
    if (!be->ops.ffn) be->ops.ffn = default_ffn;
    if (!be->ops.attention_o_proj) be->ops.attention_o_proj = default_attention_o_proj;
    if (!be->ops.rmsnorm_matmul) be->ops.rmsnorm_matmul = default_rmsnorm_matmul;
    if (!be->ops.rmsnorm_matmul_pair) be->ops.rmsnorm_matmul_pair = default_rmsnorm_matmul_pair;
    if (!be->ops.rmsnorm_ffn) be->ops.rmsnorm_ffn = default_rmsnorm_ffn;
}
