/* Element types and the read-only view of a named tensor that loaders consume. */
#ifndef XO_TENSOR_H
#define XO_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "engine/status.h"

typedef enum {
    XO_DTYPE_UNKNOWN = 0,
    XO_F32,
    XO_F16,
    XO_BF16,
    XO_I8,
    XO_I4,               /* weights only, packed two to a byte (the backend owns the layout) */
} xo_dtype;

#define XO_MAX_DIMS 8

/* A tensor somebody else owns: bytes in memory (a numpy array), or a range of an open file
 * that is read when needed, so a file that changes underneath is an error and not a fault. */
typedef struct {
    const char *name;
    xo_dtype dtype;
    char dtype_name[16];    /* as written in the source, for error messages */
    int ndim;
    int64_t shape[XO_MAX_DIMS];
    const void *data;       /* NULL: the bytes are at file_offset of fd */
    size_t nbytes;
    int fd;
    uint64_t file_offset;
    const char *file;       /* the file's path, for error messages */
} xo_tensor_view;

size_t xo_dtype_size(xo_dtype t);   /* bytes per element; 0 for packed XO_I4 */
const char *xo_dtype_name(xo_dtype t);

/* Conversions used by loaders and kernels. */
static inline float xo_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}
static inline uint16_t xo_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { .f = f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);                 /* round to nearest even */
}
float xo_f16_to_f32(uint16_t h);
uint16_t xo_f32_to_f16(float f);

/* Copies the view's nbytes into dst, from memory or by checked reads of its file. */
xo_status xo_tensor_view_read(const xo_tensor_view *v, void *dst);

/* Index of the first NaN or infinity among n elements of `src` (dtype t), or -1. */
int64_t xo_first_nonfinite(const void *src, xo_dtype t, size_t n);

/* Converts n elements of `src` (dtype t) to float32. */
void xo_convert_to_f32(float *dst, const void *src, xo_dtype t, size_t n);

#endif
