/* Loads the CUDA backend from its plugin library on first use, so the CPU engine neither
 * links nor needs the CUDA runtime. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "backends/backend.h"


/* setup.py defines both; a build outside it (a test harness) looks for the plugin and accepts
 * none, since no plugin carries its id. */
#ifndef XO_WITH_CUDA
#define XO_WITH_CUDA 1
#endif
#ifndef XO_BUILD_ID
#define XO_BUILD_ID "unversioned"
#endif

typedef xo_status (*cuda_create_fn)(xo_backend **out, int device, const xo_options *opts, const xo_error_sink *sink);
typedef const char *(*cuda_build_id_fn)(void);
typedef int (*cuda_device_count_fn)(char *why, size_t why_len);

static char plugin_path[4096];
/* Room for any reason load_plugin gives: the path, with a sentence around it. */
#define WHY_LEN (sizeof plugin_path + 512)

void xo_cuda_set_plugin_path(const char *path) { snprintf(plugin_path, sizeof plugin_path, "%s", path); }

/* Loads the plugin of this very build and counts the devices its runtime can use. Returns the
 * handle and the count (> 0), or NULL with the reason in `why`. */
static void *load_plugin(int *count, char *why, size_t why_len) {
    *count = 0;
    if (!XO_WITH_CUDA) {
        snprintf(why, why_len, "this xoron was built without CUDA support (XORON_CUDA=0, or nvcc was not found "
                 "at build time; rebuild with the CUDA toolkit and XORON_CUDA=1)");
        return NULL;
    }
    if (!plugin_path[0] || access(plugin_path, R_OK) != 0) {
        snprintf(why, why_len, "this xoron's CUDA plugin %s is missing; reinstall xoron",
                 plugin_path[0] ? plugin_path : "(_xoron_cuda.so)");
        return NULL;
    }
    void *lib = dlopen(plugin_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(why, why_len, "cannot load %s: %s", plugin_path, dlerror());
        return NULL;
    }
    cuda_build_id_fn build_id = (cuda_build_id_fn)dlsym(lib, "xo_cuda_plugin_build_id");
    cuda_device_count_fn device_count = (cuda_device_count_fn)dlsym(lib, "xo_cuda_plugin_device_count");
    if (!build_id || !device_count || strcmp(build_id(), XO_BUILD_ID) != 0) {
        snprintf(why, why_len, "%s was left by another build of xoron (build %s, this one is %s); rebuild xoron",
                 plugin_path, build_id ? build_id() : "unknown", XO_BUILD_ID);
        return NULL;
    }
    char runtime_why[256] = "";
    *count = device_count(runtime_why, sizeof runtime_why);
    if (*count > 0) return lib;
    /* Without the driver the runtime only says that the driver is "insufficient". */
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver) dlclose(driver);
    snprintf(why, why_len, "no CUDA GPU/driver found (%s)",
             driver ? runtime_why : "the NVIDIA driver, libcuda.so.1, is not installed");
    *count = 0;
    return NULL;
}

const char *xo_cuda_build_id(void) { return XO_BUILD_ID; }

int xo_cuda_built(void) { return XO_WITH_CUDA; }

int xo_cuda_device_count(void) {
    int count;
    char why[WHY_LEN];
    return load_plugin(&count, why, sizeof why) ? count : 0;
}

xo_status xo_cuda_backend_create(xo_backend **out, int device, const xo_options *opts) {
    int count;
    char why[WHY_LEN];
    void *lib = load_plugin(&count, why, sizeof why);
    if (!lib) return xo_fail(XO_EUNSUPPORTED, "device 'cuda' is not available: %s", why);
    cuda_create_fn create = (cuda_create_fn)dlsym(lib, "xo_cuda_plugin_create");
    if (!create) return xo_fail(XO_EUNSUPPORTED, "device 'cuda': %s lacks xo_cuda_plugin_create", plugin_path);
    const xo_error_sink sink = { xo_fail, xo_last_error };
    return create(out, device, opts, &sink);
}
