/* xoron._C.Cache: the attention cache of one batch of sequences. */
#include "python/binding.h"

static void Cache_dealloc(CacheObject *self) {
    xo_cache_free(self->cache);
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static PyObject *Cache_get(CacheObject *self, void *which) {
    const xo_cache *c = self->cache;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(c->length);
    case 1: return PyLong_FromLong(c->batch);
    case 2: return PyLong_FromSize_t(xo_cache_bytes(c));
    case 3: return PyLong_FromSize_t(xo_cache_bytes_per_token(c));
    case 4: return PyUnicode_FromString(c->format == XO_CACHE_LATENT ? "latent" : "kv");
    case 5: return PyLong_FromLong(c->capacity);
    default: Py_RETURN_NONE;
    }
}

static PyObject *Cache_mask(CacheObject *self, PyObject *Py_UNUSED(ignored)) {
    const xo_cache *c = self->cache;
    npy_intp dims[2] = { c->batch, c->length };
    PyObject *arr = PyArray_SimpleNew(2, dims, NPY_INT64);
    if (!arr) return NULL;
    int64_t *dst = PyArray_DATA((PyArrayObject *)arr);
    for (int b = 0; b < c->batch; b++)
        for (int j = 0; j < c->length; j++) dst[(size_t)b * c->length + j] = c->host_mask[(size_t)b * c->capacity + j];
    return arr;
}

static PyGetSetDef Cache_getset[] = {
    { "length", (getter)Cache_get, NULL, "tokens stored per row", (void *)0 },
    { "batch_size", (getter)Cache_get, NULL, "rows", (void *)1 },
    { "nbytes", (getter)Cache_get, NULL, "bytes of cached state for the stored tokens", (void *)2 },
    { "bytes_per_token", (getter)Cache_get, NULL, "bytes per token per row, all layers", (void *)3 },
    { "format", (getter)Cache_get, NULL, "'latent' (compressed c) or 'kv'", (void *)4 },
    { "capacity", (getter)Cache_get, NULL, "token slots allocated per row", (void *)5 },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyMethodDef Cache_methods[] = {
    { "attention_mask", (PyCFunction)Cache_mask, METH_NOARGS, "the [batch, length] key mask stored so far" },
    { NULL, NULL, 0, NULL },
};

PyTypeObject xo_py_CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xoron._C.Cache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Attention cache of one batch of sequences (compressed latent by default).",
    .tp_dealloc = (destructor)Cache_dealloc,
    .tp_getset = Cache_getset,
    .tp_methods = Cache_methods,
};

PyObject *xo_py_cache_new(ModelObject *owner, xo_cache *c) {
    CacheObject *obj = PyObject_New(CacheObject, &xo_py_CacheType);
    if (!obj) { xo_cache_free(c); return NULL; }
    obj->cache = c;
    obj->owner = (ModelObject *)Py_NewRef((PyObject *)owner);
    return (PyObject *)obj;
}

int xo_py_as_cache(PyObject *o, xo_cache **out, ModelObject *self) {
    if (o == Py_None) { *out = NULL; return 0; }
    if (!PyObject_TypeCheck(o, &xo_py_CacheType)) {
        PyErr_SetString(PyExc_TypeError, "past_key_values must be a cache returned by this model (use_cache=True)");
        return -1;
    }
    CacheObject *c = (CacheObject *)o;
    if (c->owner != self) {
        PyErr_SetString(PyExc_ValueError, "past_key_values belongs to another model");
        return -1;
    }
    *out = c->cache;
    return 0;
}

