/* A request to stop a long call early. The C loops poll it between decoder layers and
 * between decode steps; the requester (a signal handler, another thread) bumps a counter. */
#ifndef XO_INTERRUPT_H
#define XO_INTERRUPT_H

#include <stdatomic.h>

#include "engine/status.h"

typedef struct {
    const atomic_uint *counter;  /* bumped on each request; NULL: nothing can interrupt the call */
    unsigned seen;               /* its value when the call began */
} xo_interrupt;

/* XO_EINTERRUPTED once the counter has moved since the call began. A relaxed load: cheap
 * enough to poll once per layer. */
static inline xo_status xo_interrupt_poll(const xo_interrupt *i) {
    if (i && i->counter && atomic_load_explicit(i->counter, memory_order_relaxed) != i->seen)
        return xo_fail(XO_EINTERRUPTED, "interrupted");
    return XO_OK;
}

#endif
