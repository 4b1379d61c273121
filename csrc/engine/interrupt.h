/* A request to stop a long call early. The C loops poll it between decoder layers and
 * between decode steps; the requester (a signal handler, another thread) bumps a counter. */
#ifndef XO_INTERRUPT_H
#define XO_INTERRUPT_H

/* CUDA C++ (no <stdatomic.h> before C++23) sees only pointers to it in the kernel table and
 * never polls, so it gets the declaration alone. */
#ifdef __cplusplus
typedef struct xo_interrupt xo_interrupt;
#else
#include <stdatomic.h>

#include "engine/status.h"

typedef struct xo_interrupt {
    const atomic_uint *counter;  /* bumped on each request; NULL: nothing can interrupt the call */
    unsigned seen;               /* its value when the call began */
} xo_interrupt;

/* 1 once the counter has moved since the call began: one load, cheap enough for an inner
 * loop, and safe from any thread. Once requested it stays requested. */
static inline int xo_interrupt_requested(const xo_interrupt *i) {
    return i && i->counter && atomic_load_explicit(i->counter, memory_order_acquire) != i->seen;
}

/* XO_EINTERRUPTED once requested; from the thread running the call (it records the message). */
static inline xo_status xo_interrupt_poll(const xo_interrupt *i) {
    return xo_interrupt_requested(i) ? xo_fail(XO_EINTERRUPTED, "interrupted") : XO_OK;
}

#endif

#endif
