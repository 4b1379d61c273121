/* The one place where a C status becomes a Python exception. */
#include "python/binding.h"

#include <string.h>

PyObject *xo_py_raise(xo_status rc) {
    PyObject *type;
    if (rc == XO_EINTERRUPTED) {  /* run Python's SIGINT handler now: it raises KeyboardInterrupt */
        if (PyErr_CheckSignals() < 0) return NULL;
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    }
    switch (rc) {
    case XO_EINVAL:
    case XO_EFORMAT: type = PyExc_ValueError; break;
    case XO_ENOMEM: type = PyExc_MemoryError; break;
    case XO_EIO: type = PyExc_OSError; break;
    default: type = PyExc_RuntimeError; break;
    }
    /* 'replace': a message quoting non-UTF-8 bytes (a path, a corrupt name) must still be one */
    const char *msg = xo_last_error();
    PyObject *text = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (!text) return NULL;
    PyErr_SetObject(type, text);
    Py_DECREF(text);
    return NULL;
}
