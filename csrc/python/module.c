/* CPython binding: xoron._C. Module functions and registration. */
#define XO_PY_IMPORTS_ARRAY
#include "python/binding.h"

#include <stdlib.h>
#include <string.h>

#include "engine/safetensors.h"
#include "engine/sampling.h"
#include "backends/cpu/kernels.h"

static PyObject *mod_cross_entropy(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *lo, *yo;
    if (!PyArg_ParseTuple(args, "OO", &lo, &yo)) return NULL;
    PyArrayObject *logits = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 3, 3, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!logits) return NULL;
    PyArrayObject *labels = (PyArrayObject *)PyArray_FROMANY(yo, NPY_INT64, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!labels) { Py_DECREF(logits); return NULL; }
    PyObject *result = NULL;
    int b = (int)PyArray_DIM(logits, 0), t = (int)PyArray_DIM(logits, 1), V = (int)PyArray_DIM(logits, 2);
    if (PyArray_DIM(labels, 0) != b || PyArray_DIM(labels, 1) != t) {
        PyErr_Format(PyExc_ValueError, "labels have shape [%zd, %zd]; expected [%d, %d] like input_ids",
                     (Py_ssize_t)PyArray_DIM(labels, 0), (Py_ssize_t)PyArray_DIM(labels, 1), b, t);
    } else {
        double loss = 0.0;
        xo_status rc;
        Py_BEGIN_ALLOW_THREADS
        rc = xo_cross_entropy(PyArray_DATA(logits), PyArray_DATA(labels), b, t, V, &loss);
        Py_END_ALLOW_THREADS
        result = rc == XO_OK ? PyFloat_FromDouble(loss) : xo_py_raise(rc);
    }
    Py_DECREF(logits);
    Py_DECREF(labels);
    return result;
}

/* read_safetensors_header(path) -> [(name, dtype, shape)] */
static PyObject *mod_read_header(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *path_b = NULL;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &path_b)) return NULL;
    xo_safetensors st;
    xo_status rc;
    const char *path = PyBytes_AS_STRING(path_b);
    Py_BEGIN_ALLOW_THREADS
    rc = xo_safetensors_open(&st, path);
    Py_END_ALLOW_THREADS
    Py_DECREF(path_b);
    if (rc != XO_OK) return xo_py_raise(rc);
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < st.num_tensors; i++) {
        const xo_tensor_view *v = &st.tensors[i];
        PyObject *shape = PyTuple_New(v->ndim);
        for (int d = 0; shape && d < v->ndim; d++) PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(v->shape[d]));
        PyObject *item = shape ? Py_BuildValue("(ssN)", v->name, v->dtype_name, shape) : NULL;
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    xo_safetensors_close(&st);
    return out;
}


/* sample_tokens(logits [V] float32, draws, do_sample, temperature, top_k, top_p, seed)
 *   -> (processed logits [V], tokens [draws]). Exposes the C sampler to tests. */
static PyObject *mod_sample_tokens(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *lo;
    int draws, do_sample, top_k;
    float temperature, top_p;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "OipfifK", &lo, &draws, &do_sample, &temperature, &top_k, &top_p, &seed)) return NULL;
    xo_sampling_params p = { .do_sample = do_sample, .temperature = temperature, .top_k = top_k, .top_p = top_p,
                             .repetition_penalty = 1.0f };
    xo_status rc = xo_sampling_check(&p);
    if (rc != XO_OK) return xo_py_raise(rc);
    if (draws < 1) { PyErr_SetString(PyExc_ValueError, "draws must be >= 1"); return NULL; }
    PyArrayObject *logits = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!logits) return NULL;
    int V = (int)PyArray_DIM(logits, 0);
    npy_intp vd[1] = { V }, dd[1] = { draws };
    PyObject *processed = V > 0 ? PyArray_SimpleNew(1, vd, NPY_FLOAT32) : NULL;
    PyObject *tokens = processed ? PyArray_SimpleNew(1, dd, NPY_INT64) : NULL;
    float *work = tokens ? calloc((size_t)V * 3, sizeof(float)) : NULL;
    float *row = work ? malloc((size_t)V * sizeof(float)) : NULL;
    PyObject *result = NULL;
    if (V <= 0) PyErr_SetString(PyExc_ValueError, "logits must not be empty");
    else if (tokens && (!work || !row)) PyErr_NoMemory();
    else if (tokens) {
        xo_rng rng;
        xo_rng_seed(&rng, seed);
        int64_t *out = PyArray_DATA((PyArrayObject *)tokens);
        for (int i = 0; i < draws && rc == XO_OK; i++) {
            memcpy(row, PyArray_DATA(logits), (size_t)V * sizeof(float));
            int32_t tok = 0;
            rc = xo_sample_row(row, V, &p, NULL, 0, &rng, work, 0, &tok);
            out[i] = tok;
        }
        if (rc != XO_OK) {
            xo_py_raise(rc);
        } else {
            memcpy(PyArray_DATA((PyArrayObject *)processed), row, (size_t)V * sizeof(float));
            result = Py_BuildValue("(OO)", processed, tokens);
        }
    }
    free(work);
    free(row);
    Py_XDECREF(processed);
    Py_XDECREF(tokens);
    Py_DECREF(logits);
    return result;
}

static PyObject *mod_set_cuda_plugin(PyObject *Py_UNUSED(m), PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    xo_cuda_set_plugin_path(path);
    Py_RETURN_NONE;
}

/* [(name, environment variable, values, meaning)] of every option (engine/options.c) */
static PyObject *mod_option_table(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    PyObject *out = PyList_New(xo_option_count);
    for (int i = 0; out && i < xo_option_count; i++) {
        const xo_option_info *r = &xo_option_table[i];
        PyObject *row = Py_BuildValue("(ssss)", r->name, r->env, r->values, r->doc);
        if (!row) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, i, row);
    }
    return out;
}

static PyObject *mod_set_num_threads(PyObject *Py_UNUSED(m), PyObject *arg) {
    long long n;
    if (xo_py_thread_count(arg, &n)) return NULL;
    xo_status rc = xo_cpu_set_default_threads(n);
    if (rc != XO_OK) return xo_py_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *mod_get_num_threads(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(arg)) {
    return PyLong_FromLong(xo_cpu_default_threads());
}

static PyObject *mod_physical_cores(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(arg)) {
    return PyLong_FromLong(xo_cpu_physical_cores());
}

static PyObject *mod_cuda_device_count(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(args)) {
    return PyLong_FromLong(xo_cuda_device_count());
}

/* build_info() -> {"cuda": the CUDA plugin was built, "cublaslt": it has its cuBLASLt path, "build_id"} */
static PyObject *mod_build_info(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(args)) {
    return Py_BuildValue("{sOsOss}", "cuda", xo_cuda_built() ? Py_True : Py_False, "cublaslt",
                         XO_CUDA_CUBLASLT ? Py_True : Py_False, "build_id", xo_cuda_build_id());
}

static PyMethodDef module_methods[] = {
    { "build_info", mod_build_info, METH_NOARGS,
      "build_info() -> {'cuda': bool, 'cublaslt': bool, 'build_id': str}: what this build was compiled with" },
    { "option_table", mod_option_table, METH_NOARGS,
      "option_table() -> [(name, environment variable, values, meaning)] of every model option" },
    { "set_num_threads", mod_set_num_threads, METH_O, "set_num_threads(n): the CPU thread count of models without their own" },
    { "get_num_threads", mod_get_num_threads, METH_NOARGS, "get_num_threads() -> the process default CPU thread count" },
    { "physical_cores", mod_physical_cores, METH_NOARGS, "physical_cores() -> physical cores this process may run on" },
    { "cross_entropy", mod_cross_entropy, METH_VARARGS, "cross_entropy(logits[b,t,V], labels[b,t]) -> loss (SPEC 6)" },
    { "read_safetensors_header", mod_read_header, METH_VARARGS, "read_safetensors_header(path) -> [(name, dtype, shape)]" },
    { "sample_tokens", mod_sample_tokens, METH_VARARGS,
      "sample_tokens(logits, draws, do_sample, temperature, top_k, top_p, seed) -> (processed, tokens)" },
    { "cuda_device_count", mod_cuda_device_count, METH_NOARGS,
      "cuda_device_count() -> CUDA devices this build can use (0 without its plugin, a GPU or a driver)" },
    { "set_cuda_plugin", mod_set_cuda_plugin, METH_VARARGS, "set_cuda_plugin(path): where the CUDA backend library is" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "xoron._C", "The xoron C engine.", -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    if (PyType_Ready(&xo_py_ModelType) < 0 || PyType_Ready(&xo_py_CacheType) < 0 || xo_py_sigint_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&xo_py_ModelType) < 0 ||
        PyModule_AddStringConstant(m, "build_id", xo_cuda_build_id()) < 0 ||
        PyModule_AddObjectRef(m, "Cache", (PyObject *)&xo_py_CacheType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

