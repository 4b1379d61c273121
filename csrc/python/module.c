/* CPython binding: xoron._C. Registration, argument conversion and the one place where a
 * C status becomes a Python exception. Compute runs with the GIL released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <string.h>

#include "engine/cache.h"
#include "python/dlpack.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/safetensors.h"

/* ---- errors ---- */

static PyObject *raise_status(xo_status rc) {
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

/* ---- config ---- */

static int dict_int(PyObject *d, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v) { PyErr_Format(PyExc_ValueError, "config: missing field '%s'", key); return -1; }
    if (PyBool_Check(v)) { *out = v == Py_True; return 0; }
    PyObject *idx = PyNumber_Index(v);
    if (!idx) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "config: %s must be an integer, got %R", key, v);
        return -1;
    }
    long x = PyLong_AsLong(idx);
    Py_DECREF(idx);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x > 0x7fffffffL || x < -0x7fffffffL) { PyErr_Format(PyExc_ValueError, "config: %s=%ld is out of range", key, x); return -1; }
    *out = (int)x;
    return 0;
}

static int dict_float(PyObject *d, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) { PyErr_Format(PyExc_ValueError, "config: missing field '%s'", key); return -1; }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "config: %s must be a number, got %R", key, v);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int config_from_dict(PyObject *d, xo_config *c) {
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

static int parse_dtype(const char *s, xo_dtype *t) {
    if (!strcmp(s, "float32")) *t = XO_F32;
    else if (!strcmp(s, "bfloat16")) *t = XO_BF16;
    else if (!strcmp(s, "float16")) *t = XO_F16;
    else if (!strcmp(s, "int8")) *t = XO_I8;
    else { PyErr_Format(PyExc_ValueError, "unknown dtype '%s' (expected float32, bfloat16, float16 or int8)", s); return -1; }
    return 0;
}

/* ---- Model object ---- */

typedef struct {
    PyObject_HEAD
    xo_model *model;
    char device[32];
} ModelObject;

typedef struct {
    PyObject_HEAD
    ModelObject *owner;     /* keeps the model (and its backend) alive */
    xo_cache *cache;
} CacheObject;

static PyTypeObject ModelType;
static PyTypeObject CacheType;

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "config", "dtype", "device", NULL };
    PyObject *cfg_dict;
    const char *dtype = "float32", *device = "cpu";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ss", names, &cfg_dict, &dtype, &device)) return -1;
    xo_config cfg;
    xo_dtype t;
    if (config_from_dict(cfg_dict, &cfg) || parse_dtype(dtype, &t)) return -1;
    xo_backend *be = NULL;
    xo_status rc;
    if (!strcmp(device, "cpu")) {
        rc = xo_cpu_backend_create(&be);
    } else if (!strncmp(device, "cuda", 4)) {
        int index = 0;
        if (device[4] == ':') {
            char *end;
            long v = strtol(device + 5, &end, 10);
            if (*end || end == device + 5 || v < 0 || v > 1024) {
                PyErr_Format(PyExc_ValueError, "bad device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
                return -1;
            }
            index = (int)v;
        } else if (device[4]) {
            PyErr_Format(PyExc_ValueError, "bad device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
            return -1;
        }
        rc = xo_cuda_backend_create(&be, index);
    } else {
        PyErr_Format(PyExc_ValueError, "bad device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
        return -1;
    }
    if (rc != XO_OK) { raise_status(rc); return -1; }
    xo_model *m = NULL;
    rc = xo_model_create(&m, &cfg, be, t);
    if (rc != XO_OK) { raise_status(rc); return -1; }
    if (self->model) xo_model_free(self->model);
    self->model = m;
    snprintf(self->device, sizeof self->device, "%s", device);
    return 0;
}

static void Model_dealloc(ModelObject *self) {
    xo_model_free(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ensure_model(ModelObject *self) {
    if (!self->model) { PyErr_SetString(PyExc_RuntimeError, "model is not initialised"); return -1; }
    return 0;
}

/* Runs f(model) with the GIL released and the model's lock held. */
#define LOCKED_NOGIL(self, stmt)                           \
    do {                                                   \
        Py_BEGIN_ALLOW_THREADS                             \
        pthread_mutex_lock(&(self)->model->lock);          \
        stmt;                                              \
        pthread_mutex_unlock(&(self)->model->lock);        \
        Py_END_ALLOW_THREADS                               \
    } while (0)

static PyObject *Model_init_random(ModelObject *self, PyObject *args) {
    unsigned long long seed;
    if (ensure_model(self) || !PyArg_ParseTuple(args, "K", &seed)) return NULL;
    xo_status rc;
    LOCKED_NOGIL(self, rc = xo_model_init_random(self->model, seed));
    if (rc != XO_OK) return raise_status(rc);
    Py_RETURN_NONE;
}

static PyObject *Model_load_safetensors(ModelObject *self, PyObject *args) {
    PyObject *files;
    const char *prefix = "";
    if (ensure_model(self) || !PyArg_ParseTuple(args, "O|s", &files, &prefix)) return NULL;
    PyObject *seq = PySequence_Fast(files, "files must be a list of paths");
    if (!seq) return NULL;
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    xo_safetensors *st = calloc((size_t)(nf ? nf : 1), sizeof *st);
    char **paths = calloc((size_t)(nf ? nf : 1), sizeof *paths);
    xo_tensor_view *views = NULL;
    PyObject *result = NULL;
    int opened = 0;
    if (!st || !paths) { PyErr_NoMemory(); goto exit; }
    for (Py_ssize_t i = 0; i < nf; i++) {
        PyObject *b = NULL;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(seq, i), &b)) goto exit;
        paths[i] = strdup(PyBytes_AS_STRING(b));
        Py_DECREF(b);
        if (!paths[i]) { PyErr_NoMemory(); goto exit; }
    }
    xo_status rc = XO_OK;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nf && rc == XO_OK; i++) {
        rc = xo_safetensors_open(&st[i], paths[i]);
        if (rc == XO_OK) opened++;
    }
    Py_END_ALLOW_THREADS
    if (rc != XO_OK) { raise_status(rc); goto exit; }
    int total = 0;
    for (int i = 0; i < opened; i++) total += st[i].num_tensors;
    views = malloc((size_t)(total ? total : 1) * sizeof *views);
    if (!views) { PyErr_NoMemory(); goto exit; }
    total = 0;
    for (int i = 0; i < opened; i++)
        for (int j = 0; j < st[i].num_tensors; j++) views[total++] = st[i].tensors[j];
    LOCKED_NOGIL(self, rc = xo_model_load(self->model, views, total, prefix));
    if (rc != XO_OK) { raise_status(rc); goto exit; }
    result = Py_NewRef(Py_None);
exit:
    for (int i = 0; i < opened; i++) xo_safetensors_close(&st[i]);
    for (Py_ssize_t i = 0; paths && i < nf; i++) free(paths[i]);
    free(paths);
    free(st);
    free(views);
    Py_DECREF(seq);
    return result;
}

/* load_arrays({name: float32/float16 ndarray}) */
static PyObject *Model_load_arrays(ModelObject *self, PyObject *args) {
    PyObject *d;
    if (ensure_model(self) || !PyArg_ParseTuple(args, "O!", &PyDict_Type, &d)) return NULL;
    Py_ssize_t n = PyDict_Size(d), pos = 0, i = 0;
    xo_tensor_view *views = calloc((size_t)(n ? n : 1), sizeof *views);
    PyObject **arrays = calloc((size_t)(n ? n : 1), sizeof *arrays);
    PyObject *key, *value, *result = NULL;
    if (!views || !arrays) { PyErr_NoMemory(); goto exit; }
    while (PyDict_Next(d, &pos, &key, &value)) {
        const char *name = PyUnicode_AsUTF8(key);
        if (!name) goto exit;
        int typenum = NPY_FLOAT32;
        if (PyArray_Check(value) && PyArray_TYPE((PyArrayObject *)value) == NPY_FLOAT16) typenum = NPY_FLOAT16;
        PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(value, typenum, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!a) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "state_dict entry '%s' cannot be read as a float array", name);
            goto exit;
        }
        arrays[i] = (PyObject *)a;
        xo_tensor_view *v = &views[i++];
        v->name = name;
        v->dtype = typenum == NPY_FLOAT16 ? XO_F16 : XO_F32;
        snprintf(v->dtype_name, sizeof v->dtype_name, "%s", xo_dtype_name(v->dtype));
        v->ndim = PyArray_NDIM(a) > XO_MAX_DIMS ? XO_MAX_DIMS : PyArray_NDIM(a);
        for (int k = 0; k < v->ndim; k++) v->shape[k] = PyArray_DIM(a, k);
        v->data = PyArray_DATA(a);
        v->nbytes = (size_t)PyArray_NBYTES(a);
    }
    xo_status rc;
    LOCKED_NOGIL(self, rc = xo_model_load(self->model, views, (int)i, ""));
    if (rc != XO_OK) { raise_status(rc); goto exit; }
    result = Py_NewRef(Py_None);
exit:
    for (Py_ssize_t k = 0; arrays && k < i; k++) Py_XDECREF(arrays[k]);
    free(arrays);
    free(views);
    return result;
}

static PyObject *Model_state_dict(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (ensure_model(self)) return NULL;
    xo_model *m = self->model;
    xo_weight_slot *slots = NULL;
    int n = 0;
    xo_status rc = xo_weights_layout(&m->cfg, &m->w, m->weight_dtype, &slots, &n);
    if (rc != XO_OK) return raise_status(rc);
    PyObject *out = PyDict_New();
    for (int i = 0; out && i < n; i++) {
        npy_intp dims[2] = { slots[i].rows, slots[i].cols };
        PyObject *arr = PyArray_SimpleNew(slots[i].cols ? 2 : 1, dims, NPY_FLOAT32);
        if (!arr) { Py_CLEAR(out); break; }
        float *dst = PyArray_DATA((PyArrayObject *)arr);
        LOCKED_NOGIL(self, rc = xo_weights_get(&m->w, &m->cfg, m->be, &slots[i], dst));
        if (rc != XO_OK || PyDict_SetItemString(out, slots[i].name, arr) < 0) {
            if (rc != XO_OK) raise_status(rc);
            Py_DECREF(arr);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(arr);
    }
    free(slots);
    return out;
}

static PyObject *Model_tensor_shapes(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    if (ensure_model(self)) return NULL;
    xo_model *m = self->model;
    xo_weight_slot *slots = NULL;
    int n = 0;
    xo_status rc = xo_weights_layout(&m->cfg, &m->w, m->weight_dtype, &slots, &n);
    if (rc != XO_OK) return raise_status(rc);
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < n; i++) {
        PyObject *item = slots[i].cols ? Py_BuildValue("(s(ii))", slots[i].name, slots[i].rows, slots[i].cols)
                                       : Py_BuildValue("(s(i))", slots[i].name, slots[i].rows);
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    free(slots);
    return out;
}

static int as_cache(PyObject *o, xo_cache **out, ModelObject *self) {
    if (o == Py_None) { *out = NULL; return 0; }
    if (!PyObject_TypeCheck(o, &CacheType)) {
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


/* ---- logits handed to torch through DLPack (GPU memory, no host copy) ---- */

typedef struct {
    xo_dl_managed_tensor managed;
    int64_t shape[3];
    PyObject *owner;     /* the Model whose backend owns the memory */
} dl_holder;

static void dl_delete(xo_dl_managed_tensor *self) {
    dl_holder *h = (dl_holder *)self;
    PyGILState_STATE g = PyGILState_Ensure();
    ModelObject *mo = (ModelObject *)h->owner;
    if (mo->model) mo->model->be->release_shared(mo->model->be, h->managed.dl_tensor.data);
    Py_DECREF(h->owner);
    PyGILState_Release(g);
    free(h);
}

static void dl_capsule_destructor(PyObject *capsule) {
    /* a consumer renames the capsule "used_dltensor" and takes over the deleter */
    if (PyCapsule_IsValid(capsule, "dltensor")) {
        xo_dl_managed_tensor *t = PyCapsule_GetPointer(capsule, "dltensor");
        if (t && t->deleter) t->deleter(t);
    } else {
        PyErr_Clear();
    }
}

static PyObject *dl_capsule(ModelObject *self, float *data, int ndim, const int64_t *shape) {
    dl_holder *h = calloc(1, sizeof *h);
    if (!h) {
        self->model->be->release(self->model->be, data);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < ndim; i++) h->shape[i] = shape[i];
    h->managed.dl_tensor = (xo_dl_tensor){
        .data = data,
        .device = { self->model->be->host_memory ? XO_DL_CPU : XO_DL_CUDA,
                    self->model->be->host_memory ? 0 : self->model->be->device_index },
        .ndim = ndim, .dtype = { XO_DL_FLOAT, 32, 1 }, .shape = h->shape, .strides = NULL, .byte_offset = 0,
    };
    h->managed.manager_ctx = h;
    h->managed.deleter = dl_delete;
    h->owner = Py_NewRef((PyObject *)self);
    PyObject *cap = PyCapsule_New(&h->managed, "dltensor", dl_capsule_destructor);
    if (!cap) dl_delete(&h->managed);
    return cap;
}

/* A DLPack capsule of token ids [b, t] (int64 or int32, compact) on this model's GPU: taken
 * over (renamed "used_dltensor"); the caller hands it back with its deleter. NULL and an
 * exception when it does not fit. */
static xo_dl_managed_tensor *device_ids(ModelObject *self, PyObject *capsule, int *b, int *t, int *wide) {
    xo_dl_managed_tensor *mt = PyCapsule_GetPointer(capsule, "dltensor");
    if (!mt) return NULL;
    const xo_dl_tensor *d = &mt->dl_tensor;
    const xo_backend *be = self->model->be;
    if (be->host_memory || d->device.device_type != XO_DL_CUDA || d->device.device_id != be->device_index) {
        PyErr_Format(PyExc_ValueError, "input_ids on device type %d:%d; this model runs on %s", (int)d->device.device_type,
                     (int)d->device.device_id, be->name);
        return NULL;
    }
    if (d->ndim != 2 || d->dtype.code != XO_DL_INT || (d->dtype.bits != 64 && d->dtype.bits != 32) || d->dtype.lanes != 1) {
        PyErr_SetString(PyExc_ValueError, "input_ids on the GPU must be a 2-D int64 or int32 tensor");
        return NULL;
    }
    if (d->shape[0] <= 0 || d->shape[1] <= 0 || d->shape[0] > INT32_MAX || d->shape[1] > INT32_MAX ||
        d->shape[0] * d->shape[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "input_ids has shape [%lld, %lld]; give at least one token (and fewer than 2^31)",
                     (long long)d->shape[0], (long long)d->shape[1]);
        return NULL;
    }
    if (d->strides && !(d->strides[1] == 1 && (d->strides[0] == d->shape[1] || d->shape[0] == 1))) {
        PyErr_SetString(PyExc_ValueError, "input_ids on the GPU must be contiguous (call .contiguous())");
        return NULL;
    }
    if (PyCapsule_SetName(capsule, "used_dltensor") < 0) return NULL;
    *b = (int)d->shape[0];
    *t = (int)d->shape[1];
    *wide = d->dtype.bits == 64;
    return mt;
}

/* forward(ids int32 [b,t] | DLPack capsule of GPU ids | embeds float32 [b,t,H], positions int32 [b,t] | None, mask uint8 [b,m] | None, cache | None,
 *         want_logits, last_only, want_hidden) -> (logits | None, hidden | None) */
static PyObject *Model_forward(ModelObject *self, PyObject *args) {
    PyObject *ids_o, *pos_o, *mask_o, *cache_o;
    int want_logits, last_only, want_hidden, device_logits = 0;
    if (ensure_model(self) ||
        !PyArg_ParseTuple(args, "OOOOppp|p", &ids_o, &pos_o, &mask_o, &cache_o, &want_logits, &last_only, &want_hidden,
                          &device_logits))
        return NULL;
    xo_model *m = self->model;
    PyArrayObject *ids = NULL, *pos = NULL, *mask = NULL;
    if (!ids_o) return NULL;
    PyObject *logits = NULL, *hidden = NULL, *result = NULL;
    xo_cache *cache = NULL;
    if (as_cache(cache_o, &cache, self)) return NULL;
    int is_embeds = PyArray_Check(ids_o) && PyArray_NDIM((PyArrayObject *)ids_o) == 3;
    int b, t, wide = 0;
    xo_dl_managed_tensor *dev_ids = NULL;
    if (PyCapsule_CheckExact(ids_o)) {
        if (!(dev_ids = device_ids(self, ids_o, &b, &t, &wide))) goto exit;
    } else {
        ids = (PyArrayObject *)PyArray_FROMANY(ids_o, is_embeds ? NPY_FLOAT32 : NPY_INT32, is_embeds ? 3 : 2,
                                               is_embeds ? 3 : 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!ids) goto exit;
        b = (int)PyArray_DIM(ids, 0);
        t = (int)PyArray_DIM(ids, 1);
    }
    if (is_embeds && PyArray_DIM(ids, 2) != m->cfg.hidden_size) {
        PyErr_Format(PyExc_ValueError, "inputs_embeds has width %zd; expected hidden_size %d",
                     (Py_ssize_t)PyArray_DIM(ids, 2), m->cfg.hidden_size);
        goto exit;
    }
    if (pos_o != Py_None) {
        pos = (PyArrayObject *)PyArray_FROMANY(pos_o, NPY_INT32, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!pos) goto exit;
        if (PyArray_DIM(pos, 0) != b || PyArray_DIM(pos, 1) != t) {
            PyErr_Format(PyExc_ValueError, "position_ids has shape [%zd, %zd]; expected [%d, %d] like input_ids",
                         (Py_ssize_t)PyArray_DIM(pos, 0), (Py_ssize_t)PyArray_DIM(pos, 1), b, t);
            goto exit;
        }
    }
    if (mask_o != Py_None) {
        mask = (PyArrayObject *)PyArray_FROMANY(mask_o, NPY_UINT8, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!mask) goto exit;
        if (PyArray_DIM(mask, 0) != b) {
            PyErr_Format(PyExc_ValueError, "attention_mask has %zd rows; input_ids has %d",
                         (Py_ssize_t)PyArray_DIM(mask, 0), b);
            goto exit;
        }
    }
    const int V = m->cfg.vocab_size, H = m->cfg.hidden_size, L = m->cfg.num_layers;
    if (want_logits && !device_logits) {
        npy_intp d3[3] = { b, t, V }, d2[2] = { b, V };
        logits = last_only ? PyArray_SimpleNew(2, d2, NPY_FLOAT32) : PyArray_SimpleNew(3, d3, NPY_FLOAT32);
        if (!logits) goto exit;
    }
    if (want_hidden) {
        npy_intp d4[4] = { L + 1, b, t, H };
        hidden = PyArray_SimpleNew(4, d4, NPY_FLOAT32);
        if (!hidden) goto exit;
    }
    xo_forward_args fa = {
        .batch = b, .tokens = t,
        .ids = is_embeds || dev_ids ? NULL : PyArray_DATA(ids),
        .ids_device = dev_ids ? (const char *)dev_ids->dl_tensor.data + dev_ids->dl_tensor.byte_offset : NULL,
        .ids_wide = wide,
        .embeds = is_embeds ? PyArray_DATA(ids) : NULL,
        .positions = pos ? PyArray_DATA(pos) : NULL,
        .mask = mask ? PyArray_DATA(mask) : NULL,
        .mask_len = mask ? (int)PyArray_DIM(mask, 1) : 0,
        .cache = cache,
        .logits = logits ? PyArray_DATA((PyArrayObject *)logits) : NULL,
        .last_only = last_only,
        .hidden = hidden ? PyArray_DATA((PyArrayObject *)hidden) : NULL,
    };
    float *dev_logits = NULL;
    if (want_logits && device_logits) fa.device_logits = &dev_logits;
    xo_status rc;
    LOCKED_NOGIL(self, rc = xo_model_forward(m, &fa));
    if (rc != XO_OK) {
        if (dev_logits) m->be->release(m->be, dev_logits);
        raise_status(rc);
        goto exit;
    }
    if (dev_logits) {
        int64_t shape[3] = { b, t, V };
        logits = last_only ? dl_capsule(self, dev_logits, 2, (int64_t[]){ b, V }) : dl_capsule(self, dev_logits, 3, shape);
        if (!logits) goto exit;
    }
    result = Py_BuildValue("(OO)", logits ? logits : Py_None, hidden ? hidden : Py_None);
exit:
    if (dev_ids && dev_ids->deleter) dev_ids->deleter(dev_ids);
    Py_XDECREF(ids);
    Py_XDECREF(pos);
    Py_XDECREF(mask);
    Py_XDECREF(logits);
    Py_XDECREF(hidden);
    return result;
}


/* ---- generate ---- */

typedef struct {
    PyObject *callback;       /* called with an int64 array of the step's tokens, or NULL */
    PyObject *exc_type, *exc_value, *exc_tb;
} stream_ctx;

static xo_status stream_token(void *p, const int32_t *tokens, int batch) {
    stream_ctx *ctx = p;
    PyGILState_STATE g = PyGILState_Ensure();
    npy_intp dims[1] = { batch };
    PyObject *arr = PyArray_SimpleNew(1, dims, NPY_INT64);
    PyObject *res = NULL;
    if (arr) {
        int64_t *d = PyArray_DATA((PyArrayObject *)arr);
        for (int i = 0; i < batch; i++) d[i] = tokens[i];
        res = PyObject_CallOneArg(ctx->callback, arr);
    }
    Py_XDECREF(arr);
    xo_status rc = XO_OK;
    if (!res) {
        PyErr_Fetch(&ctx->exc_type, &ctx->exc_value, &ctx->exc_tb);
        rc = xo_fail(XO_EINVAL, "streamer raised");
    }
    Py_XDECREF(res);
    PyGILState_Release(g);
    return rc;
}

static PyObject *Model_generate(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "prompt", "mask", "max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                             "top_k", "top_p", "repetition_penalty", "eos_ids", "pad_id", "seed", "cache_format",
                             "want_scores", "callback", NULL };
    PyObject *prompt_o, *mask_o, *eos_o, *cb = Py_None;
    int max_new, min_new, do_sample, top_k, pad_id, cache_format = XO_CACHE_LATENT, want_scores = 0;
    float temperature, top_p, rep;
    unsigned long long seed;
    if (ensure_model(self) ||
        !PyArg_ParseTupleAndKeywords(args, kw, "OOiipfiffOiK|ipO", names, &prompt_o, &mask_o, &max_new, &min_new,
                                     &do_sample, &temperature, &top_k, &top_p, &rep, &eos_o, &pad_id, &seed,
                                     &cache_format, &want_scores, &cb))
        return NULL;
    xo_model *m = self->model;
    PyArrayObject *prompt = NULL, *mask = NULL, *eos = NULL;
    PyObject *out = NULL, *scores = NULL, *result = NULL;
    stream_ctx ctx = { cb == Py_None ? NULL : cb, NULL, NULL, NULL };
    prompt = (PyArrayObject *)PyArray_FROMANY(prompt_o, NPY_INT32, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!prompt) goto exit;
    int b = (int)PyArray_DIM(prompt, 0), t = (int)PyArray_DIM(prompt, 1);
    if (b == 0 || t == 0) { PyErr_SetString(PyExc_ValueError, "input_ids is empty; give at least one token"); goto exit; }
    if (mask_o != Py_None) {
        mask = (PyArrayObject *)PyArray_FROMANY(mask_o, NPY_UINT8, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
        if (!mask) goto exit;
        if (PyArray_DIM(mask, 0) != b || PyArray_DIM(mask, 1) != t) {
            PyErr_Format(PyExc_ValueError, "attention_mask has shape [%zd, %zd]; expected [%d, %d] like input_ids",
                         (Py_ssize_t)PyArray_DIM(mask, 0), (Py_ssize_t)PyArray_DIM(mask, 1), b, t);
            goto exit;
        }
    }
    eos = (PyArrayObject *)PyArray_FROMANY(eos_o, NPY_INT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!eos) goto exit;
    if (max_new < 0) { PyErr_Format(PyExc_ValueError, "max_new_tokens must be >= 0 (got %d)", max_new); goto exit; }
    npy_intp od[2] = { b, (npy_intp)t + max_new };
    out = PyArray_SimpleNew(2, od, NPY_INT32);
    if (!out) goto exit;
    if (want_scores) {
        npy_intp sd[3] = { max_new, b, m->cfg.vocab_size };
        scores = PyArray_SimpleNew(3, sd, NPY_FLOAT32);
        if (!scores) goto exit;
    }
    int steps = 0;
    xo_generate_args ga = {
        .batch = b, .prompt_len = t, .prompt = PyArray_DATA(prompt), .mask = mask ? PyArray_DATA(mask) : NULL,
        .max_new_tokens = max_new, .min_new_tokens = min_new,
        .sampling = { .do_sample = do_sample, .temperature = temperature, .top_k = top_k, .top_p = top_p,
                      .repetition_penalty = rep },
        .eos_ids = PyArray_DATA(eos), .num_eos = (int)PyArray_DIM(eos, 0), .pad_id = pad_id, .seed = seed,
        .cache_format = cache_format, .out = PyArray_DATA((PyArrayObject *)out), .steps_done = &steps,
        .scores = scores ? PyArray_DATA((PyArrayObject *)scores) : NULL,
        .on_token = ctx.callback ? stream_token : NULL, .ctx = &ctx,
    };
    xo_status rc;
    LOCKED_NOGIL(self, rc = xo_generate(m, &ga));
    if (ctx.exc_type) { PyErr_Restore(ctx.exc_type, ctx.exc_value, ctx.exc_tb); goto exit; }
    if (rc != XO_OK) { raise_status(rc); goto exit; }
    result = Py_BuildValue("(OOi)", out, scores ? scores : Py_None, steps);
exit:
    Py_XDECREF(prompt);
    Py_XDECREF(mask);
    Py_XDECREF(eos);
    Py_XDECREF(out);
    Py_XDECREF(scores);
    return result;
}

static PyObject *Model_new_cache(ModelObject *self, PyObject *args) {
    int batch, format = XO_CACHE_LATENT;
    if (ensure_model(self) || !PyArg_ParseTuple(args, "i|i", &batch, &format)) return NULL;
    xo_cache *c = NULL;
    xo_status rc = xo_cache_create(&c, &self->model->cfg, self->model->be, batch, format, self->model->weight_dtype);
    if (rc != XO_OK) return raise_status(rc);
    CacheObject *obj = PyObject_New(CacheObject, &CacheType);
    if (!obj) { xo_cache_free(c); return NULL; }
    obj->cache = c;
    obj->owner = (ModelObject *)Py_NewRef(self);
    return (PyObject *)obj;
}

static PyObject *Model_get_device(ModelObject *self, void *Py_UNUSED(c)) { return PyUnicode_FromString(self->device); }

/* the CUDA stream the model's kernels run on, as an integer (DLPack's `stream`), or None */
static PyObject *Model_get_stream(ModelObject *self, void *Py_UNUSED(c)) {
    if (ensure_model(self)) return NULL;
    void *s = self->model->be->native_stream;
    return s ? PyLong_FromVoidPtr(s) : Py_NewRef(Py_None);
}

static PyMethodDef Model_methods[] = {
    { "init_random", (PyCFunction)Model_init_random, METH_VARARGS, "init_random(seed): normal(0, 0.02) weights, norms 1." },
    { "load_safetensors", (PyCFunction)Model_load_safetensors, METH_VARARGS, "load_safetensors(files, prefix='')" },
    { "load_arrays", (PyCFunction)Model_load_arrays, METH_VARARGS, "load_arrays({name: ndarray})" },
    { "state_dict", (PyCFunction)Model_state_dict, METH_NOARGS, "state_dict() -> {name: float32 ndarray}" },
    { "tensor_shapes", (PyCFunction)Model_tensor_shapes, METH_NOARGS, "[(name, shape)] of every SPEC tensor" },
    { "forward", (PyCFunction)Model_forward, METH_VARARGS,
      "forward(ids | GPU ids DLPack capsule, positions, mask, cache, want_logits, last_only, want_hidden, "
      "device_logits=False) -> (logits, hidden)" },
    { "generate", (PyCFunction)(void (*)(void))Model_generate, METH_VARARGS | METH_KEYWORDS,
      "generate(prompt, mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, "
      "repetition_penalty, eos_ids, pad_id, seed, cache_format=0, want_scores=False, callback=None) "
      "-> (tokens [b, t+max_new], scores | None, steps)" },
    { "new_cache", (PyCFunction)Model_new_cache, METH_VARARGS, "new_cache(batch, format=0) -> Cache (0 latent, 1 K/V)" },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Model_getset[] = {
    { "device", (getter)Model_get_device, NULL, "device string", NULL },
    { "cuda_stream", (getter)Model_get_stream, NULL, "the CUDA stream the model runs on (int), or None", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xoron._C.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config: dict, dtype='float32', device='cpu'): the C engine behind MoELlamaForCausalLM.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ---- Cache object ---- */

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

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xoron._C.Cache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Attention cache of one batch of sequences (compressed latent by default).",
    .tp_dealloc = (destructor)Cache_dealloc,
    .tp_getset = Cache_getset,
    .tp_methods = Cache_methods,
};

/* ---- module functions ---- */

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
        result = rc == XO_OK ? PyFloat_FromDouble(loss) : raise_status(rc);
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
    if (rc != XO_OK) return raise_status(rc);
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
    if (rc != XO_OK) return raise_status(rc);
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
        for (int i = 0; i < draws; i++) {
            memcpy(row, PyArray_DATA(logits), (size_t)V * sizeof(float));
            out[i] = xo_sample_row(row, V, &p, NULL, 0, &rng, work);
        }
        memcpy(PyArray_DATA((PyArrayObject *)processed), row, (size_t)V * sizeof(float));
        result = Py_BuildValue("(OO)", processed, tokens);
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

static PyMethodDef module_methods[] = {
    { "cross_entropy", mod_cross_entropy, METH_VARARGS, "cross_entropy(logits[b,t,V], labels[b,t]) -> loss (SPEC 6)" },
    { "read_safetensors_header", mod_read_header, METH_VARARGS, "read_safetensors_header(path) -> [(name, dtype, shape)]" },
    { "sample_tokens", mod_sample_tokens, METH_VARARGS,
      "sample_tokens(logits, draws, do_sample, temperature, top_k, top_p, seed) -> (processed, tokens)" },
    { "set_cuda_plugin", mod_set_cuda_plugin, METH_VARARGS, "set_cuda_plugin(path): where the CUDA backend library is" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "xoron._C", "The xoron C engine.", -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    if (PyType_Ready(&ModelType) < 0 || PyType_Ready(&CacheType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Model", (PyObject *)&ModelType) < 0 ||
        PyModule_AddObjectRef(m, "Cache", (PyObject *)&CacheType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
