/* The DLPack ABI (v0.8 layout of DLManagedTensor), just what handing a tensor to torch needs. */
#ifndef XO_DLPACK_H
#define XO_DLPACK_H

#include <stdint.h>

enum { XO_DL_CPU = 1, XO_DL_CUDA = 2 };  /* DLDeviceType */
enum { XO_DL_INT = 0, XO_DL_FLOAT = 2, XO_DL_BFLOAT = 4 };  /* DLDataTypeCode */

typedef struct { int32_t device_type, device_id; } xo_dl_device;
typedef struct { uint8_t code, bits; uint16_t lanes; } xo_dl_dtype;

typedef struct {
    void *data;
    xo_dl_device device;
    int32_t ndim;
    xo_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides;      /* NULL: compact row-major */
    uint64_t byte_offset;
} xo_dl_tensor;

typedef struct xo_dl_managed_tensor {
    xo_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct xo_dl_managed_tensor *self);
} xo_dl_managed_tensor;

#endif
