/* The defaults of the kernel table's optional slots, each composed from required entries,
 * for a backend that has no fused kernel for the step. */
#include "backends/backend.h"

/* act = swiglu(x @ gate_up.T), through gu [n, 2I] */
static xo_status default_gate_up_swiglu(xo_backend *be, float *act, const float *x, float *gu, const xo_linear *gate_up,
                                        int n) {
    XO_TRY(be->ops.matmul(be, gu, x, gate_up, n));
    return be->ops.swiglu(be, act, gu, n, gate_up->out / 2);
}

/* top-k of softmax(rmsnorm(x) @ router.T), through normed [n, H] and logits [n, E] */
static xo_status default_moe_router(xo_backend *be, int32_t *idx, float *weight, const float *x, const float *norm_w,
                                    const xo_linear *router, int n, int k, float *normed, float *logits) {
    const int H = router->in, E = router->out;
    XO_TRY(be->ops.rmsnorm(be, normed, x, H, norm_w, n, H, XO_ROUTER_NORM_EPS));
    XO_TRY(be->ops.matmul(be, logits, normed, router, n));
    return be->ops.moe_route(be, idx, weight, logits, n, E, k);
}

void xo_backend_fill_defaults(xo_backend *be) {
    if (!be->ops.gate_up_swiglu) be->ops.gate_up_swiglu = default_gate_up_swiglu;
    if (!be->ops.moe_router) be->ops.moe_router = default_moe_router;
}
