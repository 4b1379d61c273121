/* xoron._testing: a test-only extension. It carries the kernel-level entry points of
 * testing/hooks.c, reached from tests and benchmarks through ctypes on this library, so the
 * shipped xoron._C exports nothing but its init function. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "xoron._testing", "Kernel-level test entry points (ctypes on this library's file).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__testing(void) { return PyModule_Create(&moduledef); }
