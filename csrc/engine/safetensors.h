/* Memory-mapped, bounds-checked safetensors reader. Every offset in the header is checked
 * against the file before any tensor view is handed out. */
#ifndef XO_SAFETENSORS_H
#define XO_SAFETENSORS_H

#include "engine/status.h"
#include "engine/tensor.h"

typedef struct {
    char *path;
    void *map;              /* whole file, read-only */
    size_t size;
    char *header;           /* NUL-terminated copy of the JSON header */
    xo_tensor_view *tensors;
    int num_tensors;
} xo_safetensors;

/* Opens and validates `path`. On failure nothing needs closing. */
xo_status xo_safetensors_open(xo_safetensors *st, const char *path);
void xo_safetensors_close(xo_safetensors *st);

#endif
