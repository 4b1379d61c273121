/* Python values to C types: the config dict, dtype names and thread counts. Only conversion: the C core
 * validates what the values mean. */
#include "python/binding.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

static int dict_int(PyObject *d, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v) { PyErr_Format(PyExc_ValueError, "config: missing field '%s'", key); return -1; }
    if (PyBool_Check(v)) { *out = v == Py_True; return 0; }
    PyObject *idx = PyNumber_Index(v);
    if (!idx) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "config: %s must be an integer, got %.80s", key, Py_TYPE(v)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || x > 0x7fffffffLL || x < -0x7fffffffLL) {
        PyErr_Format(PyExc_ValueError, "config: %s does not fit in a 32-bit integer", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int dict_float(PyObject *d, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) { PyErr_Format(PyExc_ValueError, "config: missing field '%s'", key); return -1; }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "config: %s must be a number that fits a float, got %.80s", key,
                     Py_TYPE(v)->tp_name);
        return -1;
    }
    if (isfinite(x) && fabs(x) > FLT_MAX) { /* outside float: the cast would be undefined */
        PyErr_Format(PyExc_ValueError, "config: %s=%R does not fit in a 32-bit float", key, v);
        return -1;
    }
    *out = (float)x;
    return 0;
}

int xo_py_config_from_dict(PyObject *d, xo_config *c) {
    if (!PyDict_Check(d)) { PyErr_SetString(PyExc_TypeError, "config must be a dict"); return -1; }
    memset(c, 0, sizeof *c);
    if (dict_int(d, "vocab_size", &c->vocab_size) || dict_int(d, "hidden_size", &c->hidden_size) ||
        dict_int(d, "intermediate_size", &c->intermediate_size) || dict_int(d, "num_hidden_layers", &c->num_layers) ||
        dict_int(d, "num_attention_heads", &c->num_heads) || dict_int(d, "num_key_value_heads", &c->num_kv_heads) ||
        dict_int(d, "max_position_embeddings", &c->max_position_embeddings) ||
        dict_float(d, "rms_norm_eps", &c->rms_norm_eps) || dict_float(d, "rope_theta", &c->rope_theta) ||
        dict_int(d, "tie_word_embeddings", &c->tie_word_embeddings) ||
        dict_int(d, "use_ring_attention", &c->use_ring_attention) ||
        dict_int(d, "ring_attention_chunk_size", &c->ring_chunk_size) ||
        dict_int(d, "kv_lora_rank", &c->kv_lora_rank) || dict_int(d, "q_lora_rank", &c->q_lora_rank) ||
        dict_int(d, "use_moe", &c->use_moe) || dict_int(d, "num_experts", &c->num_experts) ||
        dict_int(d, "num_experts_per_tok", &c->experts_per_tok) || dict_int(d, "moe_layer_freq", &c->moe_layer_freq) ||
        dict_int(d, "moe_intermediate_size", &c->moe_intermediate_size))
        return -1;
    return 0;
}

int xo_py_parse_dtype(const char *s, xo_dtype *t) {
    if (!strcmp(s, "float32")) *t = XO_F32;
    else if (!strcmp(s, "bfloat16")) *t = XO_BF16;
    else if (!strcmp(s, "float16")) *t = XO_F16;
    else if (!strcmp(s, "int8")) *t = XO_I8;
    else if (!strcmp(s, "int4")) *t = XO_I4;
    else { PyErr_Format(PyExc_ValueError, "unknown dtype '%s' (expected float32, bfloat16, float16, int8 or int4)", s); return -1; }
    return 0;
}

int xo_py_options_from_dict(PyObject *d, xo_options *o) {
    xo_status rc = xo_options_init(o);
    if (rc != XO_OK) { xo_py_raise(rc); return -1; }
    if (d == Py_None) return 0;
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "options must be a dict of name -> value, not %s", Py_TYPE(d)->tp_name);
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &key, &value)) {
        if (!PyUnicode_Check(key)) { PyErr_SetString(PyExc_TypeError, "option names must be str"); return -1; }
        const char *name = PyUnicode_AsUTF8(key);
        if (!name) return -1;
        const char *v;
        if (PyBool_Check(value)) {
            v = value == Py_True ? "1" : "0";
        } else if (PyLong_Check(value)) {
            /* as decimal text, so that the core names a number of any size as out of range */
            PyObject *str = PyObject_Str(value);
            const char *t = str ? PyUnicode_AsUTF8(str) : NULL;
            if (!t) { Py_XDECREF(str); return -1; }
            rc = xo_options_set(o, name, t);
            Py_DECREF(str);
            if (rc != XO_OK) { xo_py_raise(rc); return -1; }
            continue;
        } else if (PyUnicode_Check(value)) {
            if (!(v = PyUnicode_AsUTF8(value))) return -1;
        } else {
            PyErr_Format(PyExc_TypeError, "option %s must be a str, int or bool, not %s", name, Py_TYPE(value)->tp_name);
            return -1;
        }
        if ((rc = xo_options_set(o, name, v)) != XO_OK) { xo_py_raise(rc); return -1; }
    }
    return 0;
}

/* a Python int as a thread count for the C core to judge (beyond 64 bits: LLONG_MAX/MIN, which
 * the core names as such) */
int xo_py_thread_count(PyObject *o, long long *n) {
    if (PyBool_Check(o) || !PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "the thread count must be an int, got %s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    *n = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) *n = overflow > 0 ? LLONG_MAX : LLONG_MIN;
    return *n == -1 && PyErr_Occurred() ? -1 : 0;
}
