/* xoron._C.Cache: the attention cache of one batch of sequences. A forward() in another
 * thread may grow it at any time, so every read takes the model's lock (calls.c). */
#include "python/binding.h"

#include <stdlib.h>
#include <string.h>

static void Cache_dealloc(CacheObject *self) {
    if (xo_py_holds_lock(self->owner)) {  /* dropped by a callback of this thread's own call */
        xo_cache_free(self->cache);
    } else {
        Py_BEGIN_ALLOW_THREADS
        xo_py_lock_uninterruptible(self->owner);
        xo_cache_free(self->cache);
        xo_py_unlock_uninterruptible(self->owner);
        Py_END_ALLOW_THREADS
    }
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

/* What the accessors report, read in one go under the lock. */
typedef struct {
    const xo_cache *cache;
    int length, batch, capacity, format;
    size_t bytes, bytes_per_token;
    int64_t *mask;  /* with want_mask: malloc'd [batch, length] */
    int want_mask;
} cache_snapshot;

static xo_status take_snapshot(cache_snapshot *s) {
    const xo_cache *c = s->cache;
    s->length = c->length;
    s->batch = c->batch;
    s->capacity = c->capacity;
    s->format = c->format;
    s->bytes = xo_cache_bytes(c);
    s->bytes_per_token = xo_cache_bytes_per_token(c);
    s->mask = NULL;
    if (!s->want_mask) return XO_OK;
    s->mask = malloc((size_t)s->batch * s->length * sizeof *s->mask + 1);
    if (!s->mask) return xo_fail(XO_ENOMEM, "out of memory for the attention mask");
    for (int b = 0; b < s->batch; b++)
        for (int j = 0; j < s->length; j++)
            s->mask[(size_t)b * s->length + j] = c->host_mask[(size_t)b * s->capacity + j];
    return XO_OK;
}

static int snapshot(CacheObject *self, cache_snapshot *s, int want_mask) {
    s->cache = self->cache;
    s->want_mask = want_mask;
    xo_status rc;
    if (xo_py_holds_lock(self->owner))  /* a callback of this thread's call: the call is paused */
        rc = take_snapshot(s);
    else
        LOCKED_NOGIL(self->owner, rc, take_snapshot(s));
    if (rc != XO_OK) { xo_py_raise(rc); return -1; }
    return 0;
}

static PyObject *Cache_get(CacheObject *self, void *which) {
    cache_snapshot s;
    if (snapshot(self, &s, 0)) return NULL;
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(s.length);
    case 1: return PyLong_FromLong(s.batch);
    case 2: return PyLong_FromSize_t(s.bytes);
    case 3: return PyLong_FromSize_t(s.bytes_per_token);
    case 4: return PyUnicode_FromString(s.format == XO_CACHE_LATENT ? "latent" : "kv");
    case 5: return PyLong_FromLong(s.capacity);
    default: Py_RETURN_NONE;
    }
}

static PyObject *Cache_mask(CacheObject *self, PyObject *Py_UNUSED(ignored)) {
    cache_snapshot s;
    if (snapshot(self, &s, 1)) return NULL;
    npy_intp dims[2] = { s.batch, s.length };
    PyObject *arr = PyArray_SimpleNew(2, dims, NPY_INT64);
    if (arr) memcpy(PyArray_DATA((PyArrayObject *)arr), s.mask, (size_t)s.batch * s.length * sizeof *s.mask);
    free(s.mask);
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

