/* Loads the CUDA backend from its plugin library on first use, so the CPU engine neither
 * links nor needs the CUDA runtime. */
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

#include "backends/backend.h"

typedef xo_status (*cuda_create_fn)(xo_backend **out, int device, const xo_options *opts, const xo_error_sink *sink);

static char plugin_path[4096];

void xo_cuda_set_plugin_path(const char *path) { snprintf(plugin_path, sizeof plugin_path, "%s", path); }

xo_status xo_cuda_backend_create(xo_backend **out, int device, const xo_options *opts) {
    if (!plugin_path[0] || access(plugin_path, R_OK) != 0)
        return xo_fail(XO_EUNSUPPORTED, "device 'cuda' is not available: this xoron was built without CUDA support "
                       "(nvcc was not found at install time; reinstall with the CUDA toolkit, or XORON_CUDA=1)");
    void *lib = dlopen(plugin_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return xo_fail(XO_EUNSUPPORTED, "device 'cuda' is not available: cannot load %s: %s", plugin_path, dlerror());
    cuda_create_fn create = (cuda_create_fn)dlsym(lib, "xo_cuda_plugin_create");
    if (!create) return xo_fail(XO_EUNSUPPORTED, "device 'cuda': %s lacks xo_cuda_plugin_create", plugin_path);
    const xo_error_sink sink = { xo_fail, xo_last_error };
    return create(out, device, opts, &sink);
}
