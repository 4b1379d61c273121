/* xoron._C.Model: the engine object behind MoELlamaForCausalLM. Compute runs with the GIL
 * released and the model's lock held. */
#include "python/binding.h"

#include <stdlib.h>
#include <string.h>

#include "engine/generate.h"
#include "engine/safetensors.h"

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "config", "dtype", "device", "options", NULL };
    if (self->model) {  /* replacing it would pull the weights from under its caches and callers */
        PyErr_SetString(PyExc_RuntimeError, "this xoron._C.Model is already initialised; create a new one instead");
        return -1;
    }
    PyObject *cfg_dict, *opt_dict = Py_None;
    const char *dtype = "float32", *device = "cpu";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|ssO", names, &cfg_dict, &dtype, &device, &opt_dict)) return -1;
    xo_config cfg;
    xo_dtype t;
    xo_options opts;
    if (xo_py_config_from_dict(cfg_dict, &cfg) || xo_py_parse_dtype(dtype, &t) || xo_py_options_from_dict(opt_dict, &opts))
        return -1;
    xo_backend *be = NULL;
    xo_status rc;
    if (!strcmp(device, "cpu")) {
        rc = xo_cpu_backend_create(&be, &opts);
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
        rc = xo_cuda_backend_create(&be, index, &opts);
    } else {
        PyErr_Format(PyExc_ValueError, "bad device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
        return -1;
    }
    if (rc != XO_OK) { xo_py_raise(rc); return -1; }
    xo_model *m = NULL;
    rc = xo_model_create(&m, &cfg, be, t, &opts);
    if (rc != XO_OK) { xo_py_raise(rc); return -1; }
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

static PyObject *Model_init_random(ModelObject *self, PyObject *args) {
    unsigned long long seed;
    if (ensure_model(self) || !PyArg_ParseTuple(args, "K", &seed)) return NULL;
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_model_init_random(self->model, seed));
    if (rc != XO_OK) return xo_py_raise(rc);
    Py_RETURN_NONE;
}

static PyObject *Model_load_safetensors(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "files", "prefix", "check_finite", NULL };
    PyObject *files;
    const char *prefix = "";
    int check_finite = 1;
    if (ensure_model(self) || !PyArg_ParseTupleAndKeywords(args, kw, "O|sp", names, &files, &prefix, &check_finite))
        return NULL;
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
    if (rc != XO_OK) { xo_py_raise(rc); goto exit; }
    int total = 0;
    for (int i = 0; i < opened; i++) total += st[i].num_tensors;
    views = malloc((size_t)(total ? total : 1) * sizeof *views);
    if (!views) { PyErr_NoMemory(); goto exit; }
    total = 0;
    for (int i = 0; i < opened; i++)
        for (int j = 0; j < st[i].num_tensors; j++) views[total++] = st[i].tensors[j];
    LOCKED_NOGIL(self, rc, xo_model_load(self->model, views, total, prefix, check_finite));
    if (rc != XO_OK) { xo_py_raise(rc); goto exit; }
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

/* load_arrays({name: float32/float16 ndarray}, check_finite=True) */
static PyObject *Model_load_arrays(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "arrays", "check_finite", NULL };
    PyObject *d;
    int check_finite = 1;
    if (ensure_model(self) || !PyArg_ParseTupleAndKeywords(args, kw, "O!|p", names, &PyDict_Type, &d, &check_finite))
        return NULL;
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
    LOCKED_NOGIL(self, rc, xo_model_load(self->model, views, (int)i, "", check_finite));
    if (rc != XO_OK) { xo_py_raise(rc); goto exit; }
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
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_weights_layout(&m->cfg, &m->w, m->weight_dtype, &slots, &n));
    if (rc != XO_OK) return xo_py_raise(rc);
    PyObject *out = PyDict_New();
    for (int i = 0; out && i < n; i++) {
        npy_intp dims[2] = { slots[i].rows, slots[i].cols };
        PyObject *arr = PyArray_SimpleNew(slots[i].cols ? 2 : 1, dims, NPY_FLOAT32);
        if (!arr) { Py_CLEAR(out); break; }
        float *dst = PyArray_DATA((PyArrayObject *)arr);
        LOCKED_NOGIL(self, rc, xo_weights_get(&m->w, &m->cfg, m->be, &slots[i], dst));
        if (rc != XO_OK || PyDict_SetItemString(out, slots[i].name, arr) < 0) {
            if (rc != XO_OK) xo_py_raise(rc);
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
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_weights_layout(&m->cfg, &m->w, m->weight_dtype, &slots, &n));
    if (rc != XO_OK) return xo_py_raise(rc);
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

/* forward(ids int32 [b,t] | DLPack capsule of GPU ids | embeds float32 [b,t,H], *, positions int32 [b,t] | None,
 *         mask uint8 [b,m] | None, cache | None, want_logits, logits_to_keep, want_hidden, device_logits)
 *   -> (logits [b, kept, V] | None, hidden | None); logits_to_keep: the last N positions of each row,
 *   0 for all (the C core checks it) */
static PyObject *Model_forward(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "ids", "positions", "mask", "cache", "want_logits", "logits_to_keep", "want_hidden",
                             "device_logits", NULL };
    PyObject *ids_o, *pos_o = Py_None, *mask_o = Py_None, *cache_o = Py_None;
    int want_logits = 1, logits_to_keep = 0, want_hidden = 0, device_logits = 0;
    if (ensure_model(self) ||
        !PyArg_ParseTupleAndKeywords(args, kw, "O|$OOOpipp", names, &ids_o, &pos_o, &mask_o, &cache_o, &want_logits,
                                     &logits_to_keep, &want_hidden, &device_logits))
        return NULL;
    xo_model *m = self->model;
    PyArrayObject *ids = NULL, *pos = NULL, *mask = NULL;
    if (!ids_o) return NULL;
    PyObject *logits = NULL, *hidden = NULL, *result = NULL;
    xo_cache *cache = NULL;
    if (xo_py_as_cache(cache_o, &cache, self)) return NULL;
    int is_embeds = PyArray_Check(ids_o) && PyArray_NDIM((PyArrayObject *)ids_o) == 3;
    int b, t, wide = 0;
    xo_dl_managed_tensor *dev_ids = NULL;
    if (PyCapsule_CheckExact(ids_o)) {
        if (!(dev_ids = xo_py_device_ids(self, ids_o, &b, &t, &wide))) goto exit;
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
    const int kept = logits_to_keep > 0 && logits_to_keep < t ? logits_to_keep : t;
    if (want_logits && !device_logits) {
        npy_intp d3[3] = { b, kept, V };
        logits = PyArray_SimpleNew(3, d3, NPY_FLOAT32);
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
        .logits_to_keep = logits_to_keep,
        .hidden = hidden ? PyArray_DATA((PyArrayObject *)hidden) : NULL,
    };
    float *dev_logits = NULL;
    if (want_logits && device_logits) fa.device_logits = &dev_logits;
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_model_forward(m, &fa));
    if (rc != XO_OK) {
        if (dev_logits) m->be->mem.release(m->be, dev_logits);
        xo_py_raise(rc);
        goto exit;
    }
    if (dev_logits) {
        int64_t shape[3] = { b, kept, V };
        logits = xo_py_dl_capsule(self, dev_logits, 3, shape);
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
    PyObject *logits_hook;    /* (ids int64 [b, len], scores float32 [b, V]) -> scores [b, V], or NULL */
    PyObject *stop_hook;      /* (ids int64 [b, len], scores float32 [b, V]) -> bools [b], or NULL */
    PyObject *exc_type, *exc_value, *exc_tb;
} stream_ctx;

/* Keeps the Python exception for the caller (re-raised once the GIL is back in Model_generate). */
static xo_status hook_failed(stream_ctx *ctx, const char *what) {
    PyErr_Fetch(&ctx->exc_type, &ctx->exc_value, &ctx->exc_tb);
    return xo_fail(XO_EINVAL, "%s raised", what);
}

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
    xo_status rc = res ? XO_OK : hook_failed(ctx, "streamer");
    Py_XDECREF(res);
    PyGILState_Release(g);
    return rc;
}

/* (ids [batch, len] int64, scores [batch, V] float32) as new arrays; NULL with an exception set */
static PyObject *hook_args(const int32_t *seqs, int width, int len, int batch, const float *scores, int V) {
    npy_intp id_dims[2] = { batch, len }, sc_dims[2] = { batch, V };
    PyObject *ids = PyArray_SimpleNew(2, id_dims, NPY_INT64);
    PyObject *sc = ids ? PyArray_SimpleNew(2, sc_dims, NPY_FLOAT32) : NULL;
    if (!sc) { Py_XDECREF(ids); return NULL; }
    int64_t *d = PyArray_DATA((PyArrayObject *)ids);
    for (int r = 0; r < batch; r++)
        for (int i = 0; i < len; i++) d[(size_t)r * len + i] = seqs[(size_t)r * width + i];
    memcpy(PyArray_DATA((PyArrayObject *)sc), scores, (size_t)batch * V * sizeof(float));
    return Py_BuildValue("(NN)", ids, sc);
}

static xo_status logits_hook(void *p, const int32_t *seqs, int width, int len, int batch, float *scores, int V) {
    stream_ctx *ctx = p;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = hook_args(seqs, width, len, batch, scores, V);
    PyObject *res = args ? PyObject_CallObject(ctx->logits_hook, args) : NULL;
    PyArrayObject *arr = res ? (PyArrayObject *)PyArray_FROMANY(res, NPY_FLOAT32, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED)
                             : NULL;
    if (arr && (PyArray_DIM(arr, 0) != batch || PyArray_DIM(arr, 1) != V)) {
        PyErr_Format(PyExc_ValueError, "a logits processor returned scores of shape [%zd, %zd]; expected [%d, %d]",
                     (Py_ssize_t)PyArray_DIM(arr, 0), (Py_ssize_t)PyArray_DIM(arr, 1), batch, V);
        Py_CLEAR(arr);
    }
    xo_status rc = XO_OK;
    if (arr) memcpy(scores, PyArray_DATA(arr), (size_t)batch * V * sizeof(float));
    else rc = hook_failed(ctx, "logits_processor");
    Py_XDECREF(arr);
    Py_XDECREF(res);
    Py_XDECREF(args);
    PyGILState_Release(g);
    return rc;
}

static xo_status stop_hook(void *p, const int32_t *seqs, int width, int len, int batch, const float *scores, int V,
                           uint8_t *stop) {
    stream_ctx *ctx = p;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *args = hook_args(seqs, width, len, batch, scores, V);
    PyObject *res = args ? PyObject_CallObject(ctx->stop_hook, args) : NULL;
    PyArrayObject *arr = res ? (PyArrayObject *)PyArray_FROMANY(res, NPY_BOOL, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED)
                             : NULL;
    if (arr && PyArray_DIM(arr, 0) != batch) {
        PyErr_Format(PyExc_ValueError, "a stopping criterion returned %zd flags; expected one per row (%d)",
                     (Py_ssize_t)PyArray_DIM(arr, 0), batch);
        Py_CLEAR(arr);
    }
    xo_status rc = XO_OK;
    if (arr) memcpy(stop, PyArray_DATA(arr), (size_t)batch);
    else rc = hook_failed(ctx, "stopping_criteria");
    Py_XDECREF(arr);
    Py_XDECREF(res);
    Py_XDECREF(args);
    PyGILState_Release(g);
    return rc;
}

/* o as a C-contiguous array of typenum and ndim dims, or NULL for None (*ok = 0 on error) */
static PyArrayObject *optional_array(PyObject *o, int typenum, int ndim, int *ok) {
    if (o == Py_None) return NULL;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, typenum, ndim, ndim, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!a) *ok = 0;
    return a;
}

static PyObject *Model_generate(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "prompt", "mask", "embeds", "cache", "max_new_tokens", "min_new_tokens", "do_sample",
                             "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size",
                             "bad_words", "bad_offsets", "eos_ids", "pad_id", "seed", "cache_format", "want_scores",
                             "want_logits", "num_beams", "num_return_sequences", "length_penalty", "early_stopping",
                             "stop_bytes", "stop_offsets", "token_bytes", "token_offsets", "callback", "logits_hook",
                             "stop_hook", NULL };
    PyObject *prompt_o, *mask_o = Py_None, *embeds_o = Py_None, *cache_o = Py_None, *eos_o = Py_None;
    PyObject *bad_o = Py_None, *bad_off_o = Py_None, *stop_o = Py_None, *stop_off_o = Py_None;
    PyObject *tok_o = Py_None, *tok_off_o = Py_None, *cb = Py_None, *lh = Py_None, *sh = Py_None;
    int max_new = 0, min_new = 0, do_sample = 0, top_k = 0, ngram = 0, pad_id = 0, cache_format = XO_CACHE_LATENT;
    int want_scores = 0, want_logits = 0, num_beams = 1, num_return = 1, early_stopping = XO_EARLY_STOP_HEURISTIC;
    float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f, rep = 1.0f, length_penalty = 1.0f;
    unsigned long long seed = 0;
    if (ensure_model(self) ||
        !PyArg_ParseTupleAndKeywords(args, kw, "O|$OOOiipfifffiOOOiKippiifiOOOOOOO", names, &prompt_o, &mask_o,
                                     &embeds_o, &cache_o, &max_new, &min_new, &do_sample, &temperature, &top_k, &top_p,
                                     &min_p, &rep, &ngram, &bad_o, &bad_off_o, &eos_o, &pad_id, &seed, &cache_format,
                                     &want_scores, &want_logits, &num_beams, &num_return, &length_penalty,
                                     &early_stopping, &stop_o, &stop_off_o, &tok_o, &tok_off_o, &cb, &lh, &sh))
        return NULL;
    xo_model *m = self->model;
    const int V = m->cfg.vocab_size;
    PyArrayObject *prompt = NULL, *mask = NULL, *embeds = NULL, *eos = NULL, *bad = NULL, *bad_off = NULL;
    PyArrayObject *stop = NULL, *stop_off = NULL, *tok = NULL, *tok_off = NULL;
    PyObject *out = NULL, *scores = NULL, *raw = NULL, *seq_scores = NULL, *result = NULL;
    stream_ctx ctx = { cb == Py_None ? NULL : cb, lh == Py_None ? NULL : lh, sh == Py_None ? NULL : sh, NULL, NULL, NULL };
    xo_cache *cache = NULL;
    int ok = 1;
    if (xo_py_as_cache(cache_o, &cache, self)) return NULL;
    prompt = (PyArrayObject *)PyArray_FROMANY(prompt_o, NPY_INT32, 2, 2, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!prompt) goto exit;
    mask = optional_array(mask_o, NPY_UINT8, 2, &ok);
    embeds = optional_array(embeds_o, NPY_FLOAT32, 3, &ok);
    eos = optional_array(eos_o, NPY_INT32, 1, &ok);
    bad = optional_array(bad_o, NPY_INT32, 1, &ok);
    bad_off = optional_array(bad_off_o, NPY_INT32, 1, &ok);
    stop = optional_array(stop_o, NPY_UINT8, 1, &ok);
    stop_off = optional_array(stop_off_o, NPY_INT32, 1, &ok);
    tok = optional_array(tok_o, NPY_UINT8, 1, &ok);
    tok_off = optional_array(tok_off_o, NPY_INT64, 1, &ok);
    if (!ok) goto exit;
    int b = (int)PyArray_DIM(prompt, 0), t = (int)PyArray_DIM(prompt, 1), te = 0;
    if (embeds) {
        te = (int)PyArray_DIM(embeds, 1);
        if (PyArray_DIM(embeds, 0) != b || PyArray_DIM(embeds, 2) != m->cfg.hidden_size) {
            PyErr_Format(PyExc_ValueError, "inputs_embeds has shape [%zd, %zd, %zd]; expected [%d, tokens, %d]",
                         (Py_ssize_t)PyArray_DIM(embeds, 0), (Py_ssize_t)te, (Py_ssize_t)PyArray_DIM(embeds, 2), b,
                         m->cfg.hidden_size);
            goto exit;
        }
    }
    if (b == 0 || t + te == 0) { PyErr_SetString(PyExc_ValueError, "input_ids is empty; give at least one token"); goto exit; }
    if (mask && (PyArray_DIM(mask, 0) != b || PyArray_DIM(mask, 1) != te + t)) {
        PyErr_Format(PyExc_ValueError, "attention_mask has shape [%zd, %zd]; expected [%d, %d] like the prompt",
                     (Py_ssize_t)PyArray_DIM(mask, 0), (Py_ssize_t)PyArray_DIM(mask, 1), b, te + t);
        goto exit;
    }
    if ((bad == NULL) != (bad_off == NULL) || (bad && PyArray_DIM(bad_off, 0) < 1) ||
        (bad && ((int32_t *)PyArray_DATA(bad_off))[PyArray_DIM(bad_off, 0) - 1] != PyArray_DIM(bad, 0)) ||
        (stop == NULL) != (stop_off == NULL) || (stop && PyArray_DIM(stop_off, 0) < 1) ||
        (stop && ((int32_t *)PyArray_DATA(stop_off))[PyArray_DIM(stop_off, 0) - 1] != PyArray_DIM(stop, 0)) ||
        (stop && (!tok || !tok_off || PyArray_DIM(tok_off, 0) < 1 ||
                  ((int64_t *)PyArray_DATA(tok_off))[PyArray_DIM(tok_off, 0) - 1] != PyArray_DIM(tok, 0)))) {
        PyErr_SetString(PyExc_ValueError, "bad_words, stop strings and token bytes come as (values, offsets) pairs");
        goto exit;
    }
    if (max_new < 0) { PyErr_Format(PyExc_ValueError, "max_new_tokens must be >= 0 (got %d)", max_new); goto exit; }
    if (num_beams < 1 || num_return < 1) {
        PyErr_SetString(PyExc_ValueError, "num_beams and num_return_sequences must be >= 1");
        goto exit;
    }
    const int rows_out = num_beams > 1 ? b * num_return : b, rows_run = b * num_beams;
    npy_intp od[2] = { rows_out, (npy_intp)t + max_new }, sd[3] = { max_new, rows_run, V }, qd[1] = { rows_out };
    if (!(out = PyArray_SimpleNew(2, od, NPY_INT32))) goto exit;
    if (want_scores && !(scores = PyArray_SimpleNew(3, sd, NPY_FLOAT32))) goto exit;
    if (want_logits && !(raw = PyArray_SimpleNew(3, sd, NPY_FLOAT32))) goto exit;
    if (num_beams > 1 && !(seq_scores = PyArray_SimpleNew(1, qd, NPY_FLOAT32))) goto exit;
    int steps = 0, steps_run = 0;
    xo_generate_args ga = {
        .batch = b, .prompt_len = t, .prompt = PyArray_DATA(prompt),
        .embeds = embeds ? PyArray_DATA(embeds) : NULL, .embeds_len = te,
        .mask = mask ? PyArray_DATA(mask) : NULL, .cache = cache,
        .max_new_tokens = max_new, .min_new_tokens = min_new,
        .sampling = { .do_sample = do_sample, .temperature = temperature, .top_k = top_k, .top_p = top_p,
                      .min_p = min_p, .repetition_penalty = rep },
        .bans = { .no_repeat_ngram_size = ngram, .bad_words = bad ? PyArray_DATA(bad) : NULL,
                  .bad_offsets = bad ? PyArray_DATA(bad_off) : NULL, .num_bad = bad ? (int)PyArray_DIM(bad_off, 0) - 1 : 0 },
        .stops = { .token_bytes = tok ? PyArray_DATA(tok) : NULL, .token_offsets = tok_off ? PyArray_DATA(tok_off) : NULL,
                   .vocab = tok_off ? (int)PyArray_DIM(tok_off, 0) - 1 : 0, .strings = stop ? PyArray_DATA(stop) : NULL,
                   .string_offsets = stop ? PyArray_DATA(stop_off) : NULL, .num = stop ? (int)PyArray_DIM(stop_off, 0) - 1 : 0 },
        .eos_ids = eos ? PyArray_DATA(eos) : NULL, .num_eos = eos ? (int)PyArray_DIM(eos, 0) : 0, .pad_id = pad_id,
        .seed = seed, .cache_format = cache_format,
        .num_beams = num_beams, .num_return = num_return, .length_penalty = length_penalty, .early_stopping = early_stopping,
        .sequence_scores = seq_scores ? PyArray_DATA((PyArrayObject *)seq_scores) : NULL,
        .out = PyArray_DATA((PyArrayObject *)out), .steps_done = &steps, .steps_run = &steps_run,
        .scores = scores ? PyArray_DATA((PyArrayObject *)scores) : NULL,
        .raw_logits = raw ? PyArray_DATA((PyArrayObject *)raw) : NULL,
        .on_token = ctx.callback ? stream_token : NULL,
        .process_logits = ctx.logits_hook ? logits_hook : NULL,
        .should_stop = ctx.stop_hook ? stop_hook : NULL,
        .ctx = &ctx,
    };
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_generate(m, &ga));
    if (ctx.exc_type) { PyErr_Restore(ctx.exc_type, ctx.exc_value, ctx.exc_tb); goto exit; }
    if (rc != XO_OK) { xo_py_raise(rc); goto exit; }
    result = Py_BuildValue("(OOOOii)", out, scores ? scores : Py_None, raw ? raw : Py_None,
                           seq_scores ? seq_scores : Py_None, steps, steps_run);
exit:
    Py_XDECREF(prompt);
    Py_XDECREF(mask);
    Py_XDECREF(embeds);
    Py_XDECREF(eos);
    Py_XDECREF(bad);
    Py_XDECREF(bad_off);
    Py_XDECREF(stop);
    Py_XDECREF(stop_off);
    Py_XDECREF(tok);
    Py_XDECREF(tok_off);
    Py_XDECREF(out);
    Py_XDECREF(scores);
    Py_XDECREF(raw);
    Py_XDECREF(seq_scores);
    return result;
}

static PyObject *Model_new_cache(ModelObject *self, PyObject *args) {
    int batch, format = XO_CACHE_LATENT;
    if (ensure_model(self) || !PyArg_ParseTuple(args, "i|i", &batch, &format)) return NULL;
    xo_cache *c = NULL;
    xo_model *m = self->model;
    xo_status rc;
    LOCKED_NOGIL(self, rc, xo_cache_create(&c, &m->cfg, m->be, batch, format, m->weight_dtype));
    if (rc != XO_OK) return xo_py_raise(rc);
    return xo_py_cache_new(self, c);
}

/* {"in_use", "peak"} bytes of the backend's allocator, or None where it tracks none */
static PyObject *Model_memory_stats(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = { "reset_peak", NULL };
    int reset = 0;
    if (ensure_model(self) || !PyArg_ParseTupleAndKeywords(args, kw, "|p", names, &reset)) return NULL;
    xo_backend *be = self->model->be;
    if (!be->mem.usage) Py_RETURN_NONE;
    size_t in_use = 0, peak = 0;
    xo_status rc;
    LOCKED_NOGIL(self, rc, be->mem.usage(be, &in_use, &peak, reset));
    if (rc != XO_OK) return xo_py_raise(rc);
    return Py_BuildValue("{s:n,s:n}", "in_use", (Py_ssize_t)in_use, "peak", (Py_ssize_t)peak);
}

/* {'expand': n, 'latent_decode': n}: decode-attention calls over the latent cache by kernel, or
 * None where the backend does not count them (a test's view of which kernel ran) */
static PyObject *Model_decode_attention_counts(ModelObject *self, PyObject *Py_UNUSED(args)) {
    if (ensure_model(self)) return NULL;
    xo_backend *be = self->model->be;
    if (!be->decode_attention_counts) Py_RETURN_NONE;
    long long counts[2] = { 0, 0 };
    xo_status rc;
    LOCKED_NOGIL(self, rc, (be->decode_attention_counts(be, counts), XO_OK)); /* read under the model's lock */
    if (rc != XO_OK) return xo_py_raise(rc);
    return Py_BuildValue("{s:L,s:L}", "expand", counts[0], "latent_decode", counts[1]);
}

/* {'indexed': n, 'decode_batch': n, 'skinny': n, 'grouped': n, 'grouped_wgmma': n, 'host': n}: routed-
 * expert calls by the path they took, or None where the backend does not count them (a test's view of
 * the MoE path) */
static PyObject *Model_moe_path_counts(ModelObject *self, PyObject *Py_UNUSED(args)) {
    if (ensure_model(self)) return NULL;
    xo_backend *be = self->model->be;
    if (!be->moe_path_counts) Py_RETURN_NONE;
    long long n[XO_MOE_PATHS] = { 0 };
    xo_status rc;
    LOCKED_NOGIL(self, rc, (be->moe_path_counts(be, n), XO_OK));
    if (rc != XO_OK) return xo_py_raise(rc);
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L}", "indexed", n[XO_MOE_PATH_INDEXED], "decode_batch",
                         n[XO_MOE_PATH_DECODE_BATCH], "skinny", n[XO_MOE_PATH_SKINNY], "grouped", n[XO_MOE_PATH_GROUPED],
                         "grouped_wgmma", n[XO_MOE_PATH_GROUPED_WGMMA], "host", n[XO_MOE_PATH_HOST]);
}

/* {'mma': n, 'hopper': n}: tensor-core prefill attention launches by kernel, or None (CPU) */
static PyObject *Model_prefill_attention_counts(ModelObject *self, PyObject *Py_UNUSED(args)) {
    if (ensure_model(self)) return NULL;
    xo_backend *be = self->model->be;
    if (!be->prefill_attention_counts) Py_RETURN_NONE;
    long long counts[2] = { 0, 0 };
    xo_status rc;
    LOCKED_NOGIL(self, rc, (be->prefill_attention_counts(be, counts), XO_OK));
    if (rc != XO_OK) return xo_py_raise(rc);
    return Py_BuildValue("{s:L,s:L}", "mma", counts[0], "hopper", counts[1]);
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
    { "load_safetensors", (PyCFunction)(void (*)(void))Model_load_safetensors, METH_VARARGS | METH_KEYWORDS,
      "load_safetensors(files, prefix='', check_finite=True): check_finite refuses a NaN or infinity in any tensor" },
    { "load_arrays", (PyCFunction)(void (*)(void))Model_load_arrays, METH_VARARGS | METH_KEYWORDS,
      "load_arrays({name: ndarray}, check_finite=True)" },
    { "state_dict", (PyCFunction)Model_state_dict, METH_NOARGS, "state_dict() -> {name: float32 ndarray}" },
    { "tensor_shapes", (PyCFunction)Model_tensor_shapes, METH_NOARGS, "[(name, shape)] of every SPEC tensor" },
    { "weight_views", (PyCFunction)xo_py_model_weight_views, METH_NOARGS,
      "[(name, view of the engine's storage (numpy | DLPack capsule) or int8's dequantised copy, dtype, is_view)]" },
    { "forward", (PyCFunction)(void (*)(void))Model_forward, METH_VARARGS | METH_KEYWORDS,
      "forward(ids | GPU ids DLPack capsule, *, positions=None, mask=None, cache=None, want_logits=True, "
      "logits_to_keep=0, want_hidden=False, device_logits=False) -> (logits [b, kept, V], hidden)" },
    { "generate", (PyCFunction)(void (*)(void))Model_generate, METH_VARARGS | METH_KEYWORDS,
      "generate(prompt, *, mask, embeds, cache, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, "
      "top_p, min_p, repetition_penalty, no_repeat_ngram_size, bad_words, bad_offsets, eos_ids, pad_id, seed, "
      "cache_format, want_scores, want_logits, num_beams, num_return_sequences, length_penalty, early_stopping, "
      "stop_bytes, stop_offsets, token_bytes, token_offsets, callback, logits_hook, stop_hook) "
      "-> (tokens [rows, t+max_new], scores | None, logits | None, sequence_scores | None, new tokens, steps run)" },
    { "new_cache", (PyCFunction)Model_new_cache, METH_VARARGS, "new_cache(batch, format=0) -> Cache (0 latent, 1 K/V)" },
    { "memory_stats", (PyCFunction)(void (*)(void))Model_memory_stats, METH_VARARGS | METH_KEYWORDS,
      "memory_stats(reset_peak=False) -> {'in_use': bytes, 'peak': bytes} of the device's memory pool, or None (CPU)" },
    { "decode_attention_counts", (PyCFunction)Model_decode_attention_counts, METH_NOARGS,
      "decode_attention_counts() -> {'expand': n, 'latent_decode': n} of decode steps over the latent cache "
      "(recorded steps counted once), or None (CPU)" },
    { "moe_path_counts", (PyCFunction)Model_moe_path_counts, METH_NOARGS,
      "moe_path_counts() -> {'indexed', 'decode_batch', 'skinny', 'grouped', 'grouped_wgmma', 'host': n} of routed-expert calls by "
      "the CUDA path they took (recorded steps counted once), or None (CPU)" },
    { "prefill_attention_counts", (PyCFunction)Model_prefill_attention_counts, METH_NOARGS,
      "prefill_attention_counts() -> {'mma': n, 'hopper': n} tensor-core prefill attention launches (one per key "
      "block), or None (CPU)" },
    { NULL, NULL, 0, NULL },
};

static PyGetSetDef Model_getset[] = {
    { "device", (getter)Model_get_device, NULL, "device string", NULL },
    { "cuda_stream", (getter)Model_get_stream, NULL, "the CUDA stream the model runs on (int), or None", NULL },
    { NULL, NULL, NULL, NULL, NULL },
};

PyTypeObject xo_py_ModelType = {
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
