/* How a call from Python enters the engine: one call per model at a time, under the model's
 * lock, taken with the GIL released so that the holder can still run Python callbacks. The
 * wait for the lock can be interrupted by Ctrl-C, and a call from a callback of the call in
 * progress on the same thread is refused: waiting for the lock there would never end. */
#include "python/binding.h"

#include <errno.h>
#include <time.h>

/* An address unique to the calling thread. */
static uintptr_t this_thread(void) {
    static _Thread_local char marker;
    return (uintptr_t)&marker;
}

int xo_py_holds_lock(ModelObject *self) {
    return atomic_load(&self->holder) == this_thread();
}

xo_status xo_py_call_begin(ModelObject *self, xo_py_call *call) {
    call->self = self;
    if (xo_py_holds_lock(self))
        return xo_fail(XO_EBUSY, "re-entrant call: this model is busy with a call on the same thread (a streamer, "
                                 "stopping criterion or other callback of generate() called it); call it after "
                                 "that call returns, or use another model object");
    xo_py_sigint_watch(&call->interrupt);
    return XO_OK;
}

xo_status xo_py_call_lock(xo_py_call *call) {
    xo_model *m = call->self->model;
    int e = pthread_mutex_trylock(&m->lock);
    while (e == EBUSY || e == ETIMEDOUT) {
        XO_TRY(xo_interrupt_poll(&call->interrupt));
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 20 * 1000 * 1000;  /* how long Ctrl-C may wait to be seen */
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        e = pthread_mutex_timedlock(&m->lock, &until);
    }
    if (e != 0) return xo_fail(XO_EDEVICE, "could not take the model's lock (error %d)", e);
    atomic_store(&call->self->holder, this_thread());
    m->interrupt = &call->interrupt;
    return XO_OK;
}

void xo_py_call_unlock(xo_py_call *call) {
    xo_model *m = call->self->model;
    m->interrupt = NULL;
    atomic_store(&call->self->holder, (uintptr_t)0);
    pthread_mutex_unlock(&m->lock);
}

void xo_py_lock_uninterruptible(ModelObject *self) {
    pthread_mutex_lock(&self->model->lock);
    atomic_store(&self->holder, this_thread());
}

void xo_py_unlock_uninterruptible(ModelObject *self) {
    atomic_store(&self->holder, (uintptr_t)0);
    pthread_mutex_unlock(&self->model->lock);
}
