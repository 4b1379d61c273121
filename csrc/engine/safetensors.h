/* Bounds-checked safetensors reader. The header is read and checked whole (UTF-8, offsets that
 * tile the data section); tensor data stays in the file and is read with checked reads when
 * loaded (xo_tensor_view_read), so a file truncated underneath is an error, not a SIGBUS. */
#ifndef XO_SAFETENSORS_H
#define XO_SAFETENSORS_H

#include "engine/status.h"
#include "engine/tensor.h"

typedef struct {
    char *path;
    int fd;                 /* open while the views are in use */
    size_t size;            /* at open */
    char *header;           /* NUL-terminated copy of the JSON header */
    xo_tensor_view *tensors;
    int num_tensors;
} xo_safetensors;

/* Opens and validates `path`. On failure nothing needs closing. The views' fd stays valid
 * until xo_safetensors_close. */
xo_status xo_safetensors_open(xo_safetensors *st, const char *path);
void xo_safetensors_close(xo_safetensors *st);

#endif
