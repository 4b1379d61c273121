/* The one place where a C status becomes a Python exception. */
#include "python/binding.h"

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
    PyErr_SetString(type, xo_last_error());
    return NULL;
}
