/* A C entry point for tests (xoron._testing, through ctypes): the CUDA backend's device draw
 * (sample_rows) over host logits, for several (seed, step) pairs on one backend, so a test can
 * hold the kernel to an exact reference of the draw. Not part of the engine. */
#include <string.h>

#include "backends/backend.h"

#define XO_EXPORT __attribute__((visibility("default")))

/* tokens[d, rows] = sample_rows(logits [rows, cols]) with seeds[d], steps[d] for d < n_draws, on
 * CUDA `device` (the plugin at `plugin`). The logits are stored `offset` floats into their buffer
 * (1..3: rows of any width start unaligned). step_on_device: each step is read from device memory
 * (the host value passed is then 0, which a kernel ignoring the device's would show). 0 on success,
 * else -status with the message in err (err_len bytes): a NaN logit shows once the stream
 * synchronises, at the download. */
XO_EXPORT int xo_hook_cuda_sample_rows(const char *plugin, int device, const float *logits, int rows, int cols,
                                       int offset, float temperature, int top_k, float top_p, float min_p,
                                       const uint64_t *seeds, const uint64_t *steps, int n_draws, int step_on_device,
                                       int32_t *tokens, char *err, int err_len) {
    xo_cuda_set_plugin_path(plugin);
    xo_options o;
    xo_status rc = xo_options_init(&o);
    xo_backend *be = NULL;
    if (rc == XO_OK) rc = xo_cuda_backend_create(&be, device, &o);
    if (rc == XO_OK && !be->ops.sample_rows) rc = xo_fail(XO_EINVAL, "the backend has no sample_rows");
    const size_t n = (size_t)rows * cols, out_bytes = (size_t)rows * sizeof(int32_t);
    float *dlogits = NULL;
    int32_t *dout = NULL, *dstep = NULL;
    if (rc == XO_OK && !(dlogits = be->mem.alloc(be, (n + (size_t)offset) * sizeof(float)))) rc = XO_ENOMEM;
    if (rc == XO_OK && !(dout = be->mem.alloc(be, out_bytes))) rc = XO_ENOMEM;
    if (rc == XO_OK && !(dstep = be->mem.alloc(be, sizeof(int32_t)))) rc = XO_ENOMEM;
    if (rc == XO_OK) rc = be->mem.upload(be, dlogits + offset, logits, n * sizeof(float));
    for (int d = 0; rc == XO_OK && d < n_draws; d++) {
        const int32_t step32 = (int32_t)steps[d];
        if (step_on_device) rc = be->mem.upload(be, dstep, &step32, sizeof step32);
        if (rc == XO_OK)
            rc = be->ops.sample_rows(be, dout, dlogits + offset, rows, cols, temperature, top_k, top_p, min_p, seeds[d],
                                     step_on_device ? 0 : steps[d], step_on_device ? dstep : NULL);
        if (rc == XO_OK) rc = be->mem.download(be, tokens + (size_t)d * rows, dout, out_bytes);
    }
    if (rc != XO_OK && err && err_len > 0) {
        const char *msg = xo_last_error();
        strncpy(err, msg ? msg : "", (size_t)err_len - 1);
        err[err_len - 1] = 0;
    }
    if (be) {
        if (dlogits) be->mem.release(be, dlogits);
        if (dout) be->mem.release(be, dout);
        if (dstep) be->mem.release(be, dstep);
        be->destroy(be);
    }
    return rc == XO_OK ? 0 : -(int)rc;
}
