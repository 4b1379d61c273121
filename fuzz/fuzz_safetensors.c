/* libFuzzer target: the safetensors reader (engine/safetensors.c) on arbitrary bytes, built
 * with AddressSanitizer and UndefinedBehaviorSanitizer by fuzz/run.sh. The reader takes a
 * path, so each input is written to one memory file that is reopened by its /proc path.
 * Besides memory errors, a broken promise of the reader is a crash here: a failure with no
 * message, or a tensor view whose size disagrees with its shape and dtype. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/safetensors.h"

static const char *input_path(void) {
    static char path[64];
    static int fd = -1;
    if (fd < 0) {
        fd = memfd_create("xoron-fuzz", 0);
        if (fd < 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    return fd >= 0 ? path : NULL;
}

static int write_input(const char *path, const uint8_t *data, size_t size) {
    FILE *f = fopen(path, "wb");  /* truncates the memory file */
    if (!f) return -1;
    int ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* Reads every byte of a view the way the loader does, so that a view past its file is caught,
 * and runs the loader's checks and conversions over what was read. */
static void check_view(const xo_tensor_view *v, size_t file_size) {
    if (!v->name || v->ndim < 0 || v->ndim > XO_MAX_DIMS || v->nbytes > file_size) abort();
    (void)strlen(v->name);
    const size_t es = xo_dtype_size(v->dtype);
    if (es) {
        uint64_t count = 1;
        for (int d = 0; d < v->ndim; d++) count *= (uint64_t)v->shape[d];
        if (count * es != v->nbytes) abort();
    }
    unsigned char *buf = malloc(v->nbytes + 1);
    if (!buf) abort();
    if (xo_tensor_view_read(v, buf) != XO_OK) abort();  /* the file does not change here */
    if (v->dtype == XO_F16 || v->dtype == XO_BF16 || v->dtype == XO_F32) {
        (void)xo_first_nonfinite(buf, v->dtype, v->nbytes / es);
        float out[64];
        const size_t n = v->nbytes / es < 64 ? v->nbytes / es : 64;
        xo_convert_to_f32(out, buf, v->dtype, n);
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = input_path();
    if (write_input(path, data, size) != 0) abort();
    xo_safetensors st;
    xo_status rc = xo_safetensors_open(&st, path);
    if (rc == XO_OK) {
        for (int i = 0; i < st.num_tensors; i++) check_view(&st.tensors[i], size);
        xo_safetensors_close(&st);
    } else if (!xo_last_error()[0]) {
        abort();  /* every failure names its problem */
    }
    return 0;
}
