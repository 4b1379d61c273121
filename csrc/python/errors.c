/* The one place where a C status becomes a Python exception. */
#include "python/binding.h"

PyObject *xo_py_raise(xo_status rc) {
    PyObject *type;
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
