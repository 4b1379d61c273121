/* A request to stop a long call early. The C loops poll it between decoder layers and
 * between decode steps; the requester (a signal handler, another thread) bumps a counter. */
#ifndef XO_INTERRUPT_H
#define XO_INTERRUPT_H

#include "engine/status.h"

#ifdef __cplusplus
/* The CUDA plugin (C++, where <stdatomic.h> is not available) only passes the struct along:
 * the same layout, the counter opaque. */
typedef struct {
    const void *counter;
    unsigned seen;
} xo_interrupt;
#else
#include <stdatomic.h>

typedef struct {
    const atomic_uint *counter;  /* bumped on each request; NULL: nothing can interrupt the call */
    unsigned seen;               /* its value when the call began */
} xo_interrupt;

/* 1 once the counter has moved since the call began: a relaxed load, cheap enough for an
 * inner loop, and safe from any thread. Once requested it stays requested. */
static inline int xo_interrupt_requested(const xo_interrupt *i) {
    return i && i->counter && atomic_load_explicit(i->counter, memory_order_relaxed) != i->seen;
}

/* XO_EINTERRUPTED once requested; from the thread running the call (it records the message). */
static inline xo_status xo_interrupt_poll(const xo_interrupt *i) {
    return xo_interrupt_requested(i) ? xo_fail(XO_EINTERRUPTED, "interrupted") : XO_OK;
}
#endif

#endif
