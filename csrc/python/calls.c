/* How a call from Python enters the engine: one call per model at a time, under the model's
 * lock (xo_model_lock_interruptible), taken with the GIL released so that the holder can still
 * run Python callbacks. The wait can be interrupted by Ctrl-C, and a call from a callback of
 * the call in progress on the same thread is refused: waiting for the lock there never ends. */
#include "python/binding.h"

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
    XO_TRY(xo_model_lock_interruptible(call->self->model, &call->interrupt));
    atomic_store(&call->self->holder, this_thread());
    return XO_OK;
}

void xo_py_call_unlock(xo_py_call *call) {
    atomic_store(&call->self->holder, (uintptr_t)0);
    xo_model_unlock(call->self->model);
}

void xo_py_lock_uninterruptible(ModelObject *self) {
    xo_model_lock(self->model);
    atomic_store(&self->holder, this_thread());
}

void xo_py_unlock_uninterruptible(ModelObject *self) {
    atomic_store(&self->holder, (uintptr_t)0);
    xo_model_unlock(self->model);
}
