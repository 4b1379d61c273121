/* C entry point for tests (xoron._testing, through ctypes): allocates a forward's scratch on the
 * CPU backend while the allocator fails at its k-th call, then frees it as the forward does
 * whatever the outcome, and checks that no buffer is released twice. Not used by the engine. */
#include <stdlib.h>

#include "engine/scratch.h"
#include "engine/status.h"

#define XO_EXPORT __attribute__((visibility("default")))

enum { MAX_SEEN = 64 };

static _Thread_local void *(*real_alloc)(xo_backend *be, size_t bytes);
static _Thread_local void (*real_release)(xo_backend *be, void *ptr);
static _Thread_local int allocs_left, released, released_twice;
static _Thread_local void *seen[MAX_SEEN];

static void *failing_alloc(xo_backend *be, size_t bytes) {
    if (allocs_left > 0 && --allocs_left == 0) return NULL;
    return real_alloc(be, bytes);
}

/* frees for real only the first time, so that a second release is counted, not a heap error */
static void recording_release(xo_backend *be, void *ptr) {
    if (!ptr) return;
    for (int i = 0; i < released; i++)
        if (seen[i] == ptr) {
            released_twice++;
            return;
        }
    if (released < MAX_SEEN) seen[released++] = ptr;
    real_release(be, ptr);
}

/* Returns 0 when the allocation failed with XO_ENOMEM, 1 when it succeeded, and negative when a
 * buffer was released twice (-2) or the backend could not be made (-1). */
XO_EXPORT int xo_hook_scratch_failed_alloc(int fail_at) {
    xo_backend *be = NULL;
    xo_options opts;
    if (xo_options_init(&opts) != XO_OK || xo_cpu_backend_create(&be, &opts) != XO_OK) return -1;
    const xo_config cfg = { .hidden_size = 8, .num_heads = 2, .num_kv_heads = 2, .head_dim = 4,
                            .intermediate_size = 16, .moe_intermediate_size = 8, .kv_lora_rank = 4,
                            .use_moe = 1, .num_experts = 4, .experts_per_tok = 2, .vocab_size = 32 };
    real_alloc = be->mem.alloc;
    real_release = be->mem.release;
    be->mem.alloc = failing_alloc;
    be->mem.release = recording_release;
    released = released_twice = 0;
    allocs_left = fail_at;
    xo_scratch s;
    const xo_status rc = xo_scratch_alloc(be, &cfg, 3, 3, 3, &s);
    allocs_left = 0;
    xo_scratch_free(be, &s); /* as xo_model_forward does on every path */
    const int result = released_twice ? -2 : rc == XO_OK ? 1 : rc == XO_ENOMEM ? 0 : -3;
    be->destroy(be);
    return result;
}

/* The message of the last failure on this thread (the one a hook above just made). */
XO_EXPORT const char *xo_hook_last_error(void) { return xo_last_error(); }
