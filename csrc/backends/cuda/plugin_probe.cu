/* What the loader asks the plugin before it creates a backend: which build of xoron the plugin
 * belongs to, and how many CUDA devices its runtime can use. */
#include <stdio.h>

#include <cuda_runtime.h>

#ifndef XO_BUILD_ID
#error "XO_BUILD_ID must be defined (setup.py passes the same id to _C and to this plugin)"
#endif

/* A plugin left over from another build shares no ABI guarantee with this _C. */
extern "C" __attribute__((visibility("default"))) const char *xo_cuda_plugin_build_id(void) { return XO_BUILD_ID; }

/* The number of usable devices; 0 with the runtime's reason in `why` when there are none
 * (no driver, a driver too old for this runtime, no GPU). Never fails otherwise. */
extern "C" __attribute__((visibility("default"))) int xo_cuda_plugin_device_count(char *why, size_t why_len) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        snprintf(why, why_len, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
        cudaGetLastError(); /* leave no sticky error for a later caller */
        return 0;
    }
    if (count <= 0) {
        snprintf(why, why_len, "no CUDA device is visible");
        return 0;
    }
    return count;
}
