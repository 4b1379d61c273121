/* DLPack: logits handed to torch (GPU memory, no host copy) and GPU token ids taken in. */
#include "python/binding.h"

#include <stdlib.h>

typedef struct {
    xo_dl_managed_tensor managed;
    int64_t shape[3];
    PyObject *owner;     /* the Model whose backend owns the memory */
} dl_holder;

static void dl_delete(xo_dl_managed_tensor *self) {
    dl_holder *h = (dl_holder *)self;
    PyGILState_STATE g = PyGILState_Ensure();
    ModelObject *mo = (ModelObject *)h->owner;
    if (mo->model) mo->model->be->mem.release_shared(mo->model->be, h->managed.dl_tensor.data);
    Py_DECREF(h->owner);
    PyGILState_Release(g);
    free(h);
}

static void dl_capsule_destructor(PyObject *capsule) {
    /* a consumer renames the capsule "used_dltensor" and takes over the deleter */
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        xo_dl_managed_tensor *t = PyCapsule_GetPointer(capsule, "dltensor");
        if (t && t->deleter) t->deleter(t);
    } else {
        PyErr_Clear();
    }
}

PyObject *xo_py_dl_capsule(ModelObject *self, float *data, int ndim, const int64_t *shape) {
    dl_holder *h = calloc(1, sizeof *h);
    if (!h) {
        self->model->be->mem.release(self->model->be, data);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < ndim; i++) h->shape[i] = shape[i];
    h->managed.dl_tensor = (xo_dl_tensor){
        .data = data,
        .device = { self->model->be->host_memory ? XO_DL_CPU : XO_DL_CUDA,
                    self->model->be->host_memory ? 0 : self->model->be->device_index },
        .ndim = ndim, .dtype = { XO_DL_FLOAT, 32, 1 }, .shape = h->shape, .strides = NULL, .byte_offset = 0,
    };
    h->managed.manager_ctx = h;
    h->managed.deleter = dl_delete;
    h->owner = Py_NewRef((PyObject *)self);
    PyObject *cap = PyCapsule_New(&h->managed, "dltensor", dl_capsule_destructor);
    if (!cap) dl_delete(&h->managed);
    return cap;
}

/* A DLPack capsule of token ids [b, t] (int64 or int32, compact) on this model's GPU: taken
 * over (renamed "used_dltensor"); the caller hands it back with its deleter. NULL and an
 * exception when it does not fit. */
xo_dl_managed_tensor *xo_py_device_ids(ModelObject *self, PyObject *capsule, int *b, int *t, int *wide) {
    xo_dl_managed_tensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
    if (!mt) return NULL;
    const xo_dl_tensor *d = &mt->dl_tensor;
    const xo_backend *be = self->model->be;
    if (be->host_memory || d->device.device_type != XO_DL_CUDA || d->device.device_id != be->device_index) {
        PyErr_Format(PyExc_ValueError, "input_ids on device type %d:%d; this model runs on %s", (int)d->device.device_type,
                     (int)d->device.device_id, be->name);
        return NULL;
    }
    if (d->ndim != 2 || d->dtype.code != XO_DL_INT || (d->dtype.bits != 64 && d->dtype.bits != 32) || d->dtype.lanes != 1) {
        PyErr_SetString(PyExc_ValueError, "input_ids on the GPU must be a 2-D int64 or int32 tensor");
        return NULL;
    }
    if (d->shape[0] <= 0 || d->shape[1] <= 0 || d->shape[0] > INT32_MAX || d->shape[1] > INT32_MAX ||
        d->shape[0] * d->shape[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "input_ids has shape [%lld, %lld]; give at least one token (and fewer than 2^31)",
                     (long long)d->shape[0], (long long)d->shape[1]);
        return NULL;
    }
    if (d->strides && !(d->strides[1] == 1 && (d->strides[0] == d->shape[1] || d->shape[0] == 1))) {
        PyErr_SetString(PyExc_ValueError, "input_ids on the GPU must be contiguous (call .contiguous())");
        return NULL;
    }
    if (PyCapsule_SetName(capsule, "used_dltensor") < 0) return NULL;
    *b = (int)d->shape[0];
    *t = (int)d->shape[1];
    *wide = d->dtype.bits == 64;
    return mt;
}

