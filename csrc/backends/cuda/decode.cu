/* Decode sessions on the GPU: the per-step bookkeeping as kernels (so a step reads nothing
 * from the host) and the capture of a whole step as a CUDA graph, replayed every step. */
#include <math.h>

#include "backends/cuda/common.h"

/* One block: every row's input token and position, its cache slot's position and mask. */
__global__ void k_decode_begin(xo_decode_state st) {
    CU_PDL_ENTRY();
    const int32_t past = st.state[0];
    for (int r = threadIdx.x; r < st.batch; r += blockDim.x) {
        const int32_t p = st.next_pos[r];
        st.ids[r] = st.tokens[r];
        st.pos[r] = p;
        st.next_pos[r] = p + 1;
        st.cache_pos[(size_t)r * st.capacity + past] = p;
        st.cache_mask[(size_t)r * st.capacity + past] = 1;
    }
}

/* One block: finished rows get the pad token, an EOS finishes its row, the tokens go to the
 * ring, then the counters advance (after every thread has read them). */
__global__ void k_decode_end(xo_decode_state st) {
    CU_PDL_ENTRY();
    const int32_t step = st.state[1];
    int32_t *out = st.out + (size_t)(step % st.ring) * st.batch;
    for (int r = threadIdx.x; r < st.batch; r += blockDim.x) {
        int32_t tok = st.tokens[r];
        if (st.finished[r]) {
            tok = st.pad_id;
        } else {
            for (int i = 0; i < st.num_eos; i++)
                if (st.eos[i] == tok) st.finished[r] = 1;
        }
        st.tokens[r] = tok;
        out[r] = tok;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        st.state[0] = st.state[0] + 1;
        st.state[1] = st.state[1] + 1;
    }
}

__global__ void k_suppress(float *logits, int rows, int cols, const int32_t *ids, int n, const int32_t *step_dev, int below) {
    CU_PDL_ENTRY();
    if (*step_dev >= below) return;
    for (int t = threadIdx.x; t < rows * n; t += blockDim.x) logits[(size_t)(t / n) * cols + ids[t % n]] = -INFINITY;
}

xo_status cu_decode_begin(xo_backend *be, const xo_decode_state *st) {
    CuCtx *c = cu_ctx(be);
    cu_launch(c, k_decode_begin, 1, 256, 0, *st);
    return cu_check_launch(c, "decode step (begin)");
}

xo_status cu_decode_end(xo_backend *be, const xo_decode_state *st) {
    CuCtx *c = cu_ctx(be);
    cu_launch(c, k_decode_end, 1, 256, 0, *st);
    return cu_check_launch(c, "decode step (end)");
}

xo_status cu_suppress_tokens(xo_backend *be, float *logits, int rows, int cols, const int32_t *ids, int n,
                             const int32_t *step_dev, int below) {
    CuCtx *c = cu_ctx(be);
    if (rows <= 0 || n <= 0) return XO_OK;
    cu_launch(c, k_suppress, 1, 256, 0, logits, rows, cols, ids, n, step_dev, below);
    return cu_check_launch(c, "suppress tokens");
}

/* ---- step graphs ---- */

xo_status cu_capture_begin(xo_backend *be) {
    CuCtx *c = cu_ctx(be);
    /* thread-local: other host threads (torch's, say) may keep using CUDA meanwhile */
    CU_TRY(c, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal), "graph capture (begin)");
    return XO_OK;
}

xo_status cu_capture_end(xo_backend *be, void **graph) {
    CuCtx *c = cu_ctx(be);
    cudaGraph_t g = NULL;
    cudaGraphExec_t exec = NULL;
    *graph = NULL;
    CU_TRY(c, cudaStreamEndCapture(c->stream, &g), "graph capture (end)");
    cudaError_t e = cudaGraphInstantiateWithFlags(&exec, g, 0);
    cudaGraphDestroy(g);
    CU_TRY(c, e, "graph instantiate");
    *graph = exec;
    return XO_OK;
}

xo_status cu_graph_launch(xo_backend *be, void *graph) {
    CuCtx *c = cu_ctx(be);
    CU_TRY(c, cudaGraphLaunch((cudaGraphExec_t)graph, c->stream), "graph launch");
    return XO_OK;
}

void cu_graph_free(xo_backend *be, void *graph) {
    CuCtx *c = cu_ctx(be);
    if (!graph) return;
    cudaStreamSynchronize(c->stream); /* a launch in flight still uses it */
    cudaGraphExecDestroy((cudaGraphExec_t)graph);
}
