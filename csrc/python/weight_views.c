/* Model.weight_views(): every SPEC tensor as a view of the engine's own storage, so that a
 * framework holding the views (the torch module) reads and edits the weights the engine runs
 * with. Host memory comes back as numpy arrays whose base is the Model, device memory as
 * DLPack capsules that keep the Model alive; neither ever frees the storage. Quantised (int8,
 * int4) weights have no float view: they come back as a dequantised copy, marked as such. */
#include "python/binding.h"

#include <stdlib.h>

#include "engine/weights.h"

typedef struct {
    xo_dl_managed_tensor managed;
    int64_t shape[2];
    PyObject *owner;   /* the Model whose storage this views */
} view_holder;

static void view_delete(xo_dl_managed_tensor *t) {
    view_holder *h = t->manager_ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_DECREF(h->owner);
    PyGILState_Release(g);
    free(h);
}

static void view_capsule_destructor(PyObject *capsule) {
    /* a consumer renames the capsule "used_dltensor" and takes over the deleter */
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        xo_dl_managed_tensor *t = PyCapsule_GetPointer(capsule, "dltensor");
        if (t && t->deleter) t->deleter(t);
    } else {
        PyErr_Clear();
    }
}

static PyObject *device_view(ModelObject *self, void *data, xo_dtype t, int ndim, const npy_intp *dims) {
    view_holder *h = calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    for (int i = 0; i < ndim; i++) h->shape[i] = dims[i];
    const xo_backend *be = self->model->be;
    xo_dl_dtype dt = { t == XO_BF16 ? XO_DL_BFLOAT : XO_DL_FLOAT, (uint8_t)(8 * xo_dtype_size(t)), 1 };
    h->managed.dl_tensor = (xo_dl_tensor){
        .data = data, .device = { XO_DL_CUDA, be->device_index }, .ndim = ndim, .dtype = dt,
        .shape = h->shape, .strides = NULL, .byte_offset = 0,
    };
    h->managed.manager_ctx = h;
    h->managed.deleter = view_delete;
    h->owner = Py_NewRef((PyObject *)self);
    PyObject *cap = PyCapsule_New(&h->managed, "dltensor", view_capsule_destructor);
    if (!cap) view_delete(&h->managed);
    return cap;
}

static PyObject *host_view(ModelObject *self, void *data, xo_dtype t, int ndim, npy_intp *dims) {
    /* numpy has no bfloat16: its bits come as uint16 for the caller to reinterpret */
    int typenum = t == XO_F32 ? NPY_FLOAT32 : t == XO_F16 ? NPY_FLOAT16 : NPY_UINT16;
    PyObject *arr = PyArray_SimpleNewFromData(ndim, dims, typenum, data);
    if (!arr) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef((PyObject *)self)) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* A dequantised float32 copy of a quantised slot. */
static PyObject *dequantised_copy(ModelObject *self, const xo_weight_slot *s, int ndim, npy_intp *dims) {
    PyObject *arr = PyArray_SimpleNew(ndim, dims, NPY_FLOAT32);
    if (!arr) return NULL;
    xo_model *m = self->model;
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_weights_get(&m->w, &m->cfg, m->be, s, PyArray_DATA((PyArrayObject *)arr)));
    if (rc != XO_OK) {
        Py_DECREF(arr);
        return xo_py_raise(rc);
    }
    return arr;
}

/* weight_views() -> [(name, view, storage dtype name, is_view)] in SPEC order */
PyObject *xo_py_model_weight_views(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (!self->model) { PyErr_SetString(PyExc_RuntimeError, "model is not initialised"); return NULL; }
    xo_model *m = self->model;
    xo_weight_slot *slots = NULL;
    int n = 0;
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_weights_layout(&m->cfg, &m->w, m->weight_dtype, &slots, &n));
    if (rc != XO_OK) return xo_py_raise(rc);
    /* the views are read on the consumer's streams: the engine's pending writes land first */
    LOCKED_NOGIL(self, rc, m->be->mem.synchronize(m->be));
    if (rc != XO_OK) { free(slots); return xo_py_raise(rc); }
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < n; i++) {
        const xo_weight_slot *s = &slots[i];
        npy_intp dims[2] = { s->rows, s->cols };
        const int ndim = s->cols ? 2 : 1;
        xo_dtype t = XO_F32;
        void *data = NULL;
        if (s->kind == XO_SLOT_VECTOR) {
            data = *s->vec;
        } else {
            t = s->lin->dtype;
            data = (char *)s->lin->data + (size_t)s->row_offset * s->lin->in * xo_dtype_size(t);
        }
        PyObject *view;
        int is_view = t != XO_I8 && t != XO_I4;
        if (!data) {
            PyErr_Format(PyExc_RuntimeError, "weight '%s' has no storage", s->name);
            view = NULL;
        } else if (!is_view) {
            view = dequantised_copy(self, s, ndim, dims);
        } else if (m->be->host_memory) {
            view = host_view(self, data, t, ndim, dims);
        } else {
            view = device_view(self, data, t, ndim, dims);
        }
        PyObject *item = view ? Py_BuildValue("(sNsO)", s->name, view, xo_dtype_name(t), is_view ? Py_True : Py_False) : NULL;
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    free(slots);
    return out;
}
