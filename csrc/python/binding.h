/* What the binding's files share: the object layouts, the one status-to-exception
 * conversion, argument conversions and the DLPack helpers. */
#ifndef XO_PY_BINDING_H
#define XO_PY_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL xoron_ARRAY_API
#ifndef XO_PY_IMPORTS_ARRAY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdatomic.h>
#include <stdint.h>

#include "engine/cache.h"
#include "engine/model.h"
#include "python/dlpack.h"

typedef struct {
    PyObject_HEAD
    xo_model *model;
    char device[32];
    atomic_uintptr_t holder;  /* the thread holding model->lock (calls.c), or 0 */
} ModelObject;

typedef struct {
    PyObject_HEAD
    ModelObject *owner;     /* keeps the model (and its backend) alive */
    xo_cache *cache;
} CacheObject;

extern PyTypeObject xo_py_ModelType;
extern PyTypeObject xo_py_CacheType;

/* errors.c: the one place a C status becomes a Python exception (always returns NULL) */
PyObject *xo_py_raise(xo_status rc);

/* convert.c */
int xo_py_config_from_dict(PyObject *d, xo_config *c);
int xo_py_parse_dtype(const char *s, xo_dtype *t);
int xo_py_thread_count(PyObject *o, long long *n);   /* TypeError unless an int */
/* the environment's defaults, then each name -> value of d (None: none); values str, int or
 * bool become the strings xo_options_set parses */
int xo_py_options_from_dict(PyObject *d, xo_options *o);

/* dlpack.c */
PyObject *xo_py_dl_capsule(ModelObject *self, float *data, int ndim, const int64_t *shape);
xo_dl_managed_tensor *xo_py_device_ids(ModelObject *self, PyObject *capsule, int *b, int *t, int *wide);

/* sigint.c */
int xo_py_sigint_init(void);               /* at import; -1 with an exception set */
void xo_py_sigint_watch(xo_interrupt *i);  /* i stops on Ctrl-C, where Python would raise */

/* calls.c: one call at a time per model */
typedef struct {
    ModelObject *self;
    xo_interrupt interrupt;
} xo_py_call;
/* GIL held: refuses a re-entrant call (XO_EBUSY) and watches for Ctrl-C. */
xo_status xo_py_call_begin(ModelObject *self, xo_py_call *call);
/* GIL released: waits for the model's lock (XO_EINTERRUPTED on Ctrl-C while waiting). */
xo_status xo_py_call_lock(xo_py_call *call);
void xo_py_call_unlock(xo_py_call *call);
/* 1 when this thread holds the model's lock: a callback of its own call, paused between steps */
int xo_py_holds_lock(ModelObject *self);
/* for deallocators, which must not fail; GIL released, and not from the holder's thread */
void xo_py_lock_uninterruptible(ModelObject *self);
void xo_py_unlock_uninterruptible(ModelObject *self);

/* rc = expr, evaluated with the GIL released and the model's lock held. */
#define LOCKED_NOGIL(self, rc, expr)                      \
    do {                                                  \
        xo_py_call call_;                                 \
        rc = xo_py_call_begin((self), &call_);            \
        if (rc == XO_OK) {                                \
            Py_BEGIN_ALLOW_THREADS                        \
            rc = xo_py_call_lock(&call_);                 \
            if (rc == XO_OK) {                            \
                rc = (expr);                              \
                xo_py_call_unlock(&call_);                \
            }                                             \
            Py_END_ALLOW_THREADS                          \
        }                                                 \
    } while (0)

/* weight_views.c: Model.weight_views() */
PyObject *xo_py_model_weight_views(ModelObject *self, PyObject *ignored);

/* cache_object.c */
PyObject *xo_py_cache_new(ModelObject *owner, xo_cache *c);   /* takes c */
int xo_py_as_cache(PyObject *o, xo_cache **out, ModelObject *self);

#endif
