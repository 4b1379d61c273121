#include "engine/weights.h"

#include <math.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static void set_linear(xo_linear *l, int out, int in, xo_dtype t) {
    l->out = out;
    l->in = in;
    l->dtype = t;
}

struct tensor_index;
static xo_status check_slot(const struct tensor_index *ix, const xo_weight_slot *s);

/* The layout is either collected (s, n) or, when `check` is set, only compared slot by slot
 * against a checkpoint: then nothing proportional to the model's size is allocated, so a
 * config far larger than its checkpoint fails at once on the first missing tensor. */
typedef struct {
    xo_weight_slot *s;
    int n, cap;
    xo_status rc;
    const struct tensor_index *check;
    xo_weight_slot scratch;
} slot_list;

static xo_weight_slot *push(slot_list *L, int kind, int rows, int cols, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static xo_weight_slot *push(slot_list *L, int kind, int rows, int cols, const char *fmt, ...) {
    xo_weight_slot *s;
    if (L->check) {   /* checking only: one scratch slot, nothing kept */
        s = &L->scratch;
    } else {
        if (L->n == L->cap) {
            int cap = L->cap ? 2 * L->cap : 64;
            xo_weight_slot *ns = realloc(L->s, (size_t)cap * sizeof *ns);
            if (!ns) { L->rc = xo_fail(XO_ENOMEM, "out of memory"); return NULL; }
            L->s = ns;
            L->cap = cap;
        }
        s = &L->s[L->n++];
    }
    memset(s, 0, sizeof *s);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->name, sizeof s->name, fmt, ap);
    va_end(ap);
    s->kind = kind;
    s->rows = rows;
    s->cols = cols;
    if (L->check && (L->rc = check_slot(L->check, s)) != XO_OK) return NULL;
    return s;
}

#define PUSH_VEC(ptr, n, norm, ...) do { xo_weight_slot *s_ = push(&L, XO_SLOT_VECTOR, n, 0, __VA_ARGS__); \
    if (!s_) { goto fail; } s_->vec = (ptr); s_->is_norm = (norm); } while (0)
#define PUSH_LIN(l, r, c, off, ...) do { xo_weight_slot *s_ = push(&L, XO_SLOT_LINEAR, r, c, __VA_ARGS__); \
    if (!s_) { goto fail; } s_->lin = (l); s_->row_offset = (off); } while (0)

static int push_ffn(slot_list *L, xo_ffn *f, int inter, int hidden, xo_dtype t, const char *base) {
    set_linear(&f->gate_up, 2 * inter, hidden, t);
    set_linear(&f->down, hidden, inter, t);
    xo_weight_slot *s;
    if (!(s = push(L, XO_SLOT_LINEAR, inter, hidden, "%s.gate_proj.weight", base))) return -1;
    s->lin = &f->gate_up;
    if (!(s = push(L, XO_SLOT_LINEAR, inter, hidden, "%s.up_proj.weight", base))) return -1;
    s->lin = &f->gate_up;
    s->row_offset = inter;
    if (!(s = push(L, XO_SLOT_LINEAR, hidden, inter, "%s.down_proj.weight", base))) return -1;
    s->lin = &f->down;
    return 0;
}

static xo_status layout(const xo_config *c, xo_weights *w, xo_dtype t, slot_list *Lp) {
    slot_list L = *Lp;
    const int H = c->hidden_size, hd = c->head_dim, r = c->kv_lora_rank;
    /* checking: one scratch layer serves every layer */
    xo_layer_weights scratch_layer;
    memset(&scratch_layer, 0, sizeof scratch_layer);
    if (!L.check && !w->layers) {
        w->layers = calloc((size_t)c->num_layers, sizeof *w->layers);
        if (!w->layers) return xo_fail(XO_ENOMEM, "out of memory");
    }
    w->tied = c->tie_word_embeddings;
    set_linear(&w->embed, c->vocab_size, H, t);
    xo_weight_slot *s = push(&L, XO_SLOT_LINEAR, c->vocab_size, H, "model.embed_tokens.weight");
    if (!s) goto fail;
    s->lin = &w->embed;
    for (int i = 0; i < c->num_layers; i++) {
        xo_layer_weights *lw = L.check ? &scratch_layer : &w->layers[i];
        char base[64];
        snprintf(base, sizeof base, "model.layers.%d", i);
        PUSH_VEC(&lw->input_norm, H, 1, "%s.input_layernorm.weight", base);
        if (c->q_lora_rank == 0) {
            set_linear(&lw->q, c->num_heads * hd, H, t);
            PUSH_LIN(&lw->q, c->num_heads * hd, H, 0, "%s.self_attn.q_proj.weight", base);
        } else {
            set_linear(&lw->q_a, c->q_lora_rank, H, t);
            set_linear(&lw->q_b, c->num_heads * hd, c->q_lora_rank, t);
            PUSH_LIN(&lw->q_a, c->q_lora_rank, H, 0, "%s.self_attn.q_a_proj.weight", base);
            PUSH_VEC(&lw->q_a_norm, c->q_lora_rank, 1, "%s.self_attn.q_a_layernorm.weight", base);
            PUSH_LIN(&lw->q_b, c->num_heads * hd, c->q_lora_rank, 0, "%s.self_attn.q_b_proj.weight", base);
        }
        set_linear(&lw->kv_a, r, H, t);
        s = push(&L, XO_SLOT_KV_A, r + hd, H, "%s.self_attn.kv_a_proj.weight", base);
        if (!s) goto fail;
        s->lin = &lw->kv_a;
        PUSH_VEC(&lw->kv_a_norm, r, 1, "%s.self_attn.kv_a_layernorm.weight", base);
        set_linear(&lw->kv_b, 2 * c->num_kv_heads * hd, r, t);
        PUSH_LIN(&lw->kv_b, 2 * c->num_kv_heads * hd, r, 0, "%s.self_attn.kv_b_proj.weight", base);
        set_linear(&lw->o, H, c->num_heads * hd, t);
        PUSH_LIN(&lw->o, H, c->num_heads * hd, 0, "%s.self_attn.o_proj.weight", base);
        PUSH_VEC(&lw->post_norm, H, 1, "%s.post_attention_layernorm.weight", base);
        lw->is_moe = xo_config_is_moe_layer(c, i);
        char mbase[96];
        if (!lw->is_moe) {
            snprintf(mbase, sizeof mbase, "%s.mlp", base);
            if (push_ffn(&L, &lw->mlp, c->intermediate_size, H, t, mbase)) goto fail;
        } else {
            PUSH_VEC(&lw->router_norm, H, 1, "%s.mlp.router.input_norm.weight", base);
            set_linear(&lw->router, c->num_experts, H, t == XO_I8 || t == XO_I4 ? XO_F32 : t);
            PUSH_LIN(&lw->router, c->num_experts, H, 0, "%s.mlp.router.gate.weight", base);
            if (!lw->experts) {
                lw->experts = calloc((size_t)c->num_experts, sizeof *lw->experts);
                if (!lw->experts) { L.rc = xo_fail(XO_ENOMEM, "out of memory"); goto fail; }
            }
            for (int e = 0; e < c->num_experts; e++) {
                snprintf(mbase, sizeof mbase, "%s.mlp.experts.%d", base, e);
                if (push_ffn(&L, &lw->experts[e], c->moe_intermediate_size, H, t, mbase)) goto fail;
            }
            snprintf(mbase, sizeof mbase, "%s.mlp.shared_expert", base);
            if (push_ffn(&L, &lw->shared, c->moe_intermediate_size, H, t, mbase)) goto fail;
        }
    }
    PUSH_VEC(&w->final_norm, H, 1, "model.norm.weight");
    if (!c->tie_word_embeddings) {
        set_linear(&w->lm_head, c->vocab_size, H, t);
        PUSH_LIN(&w->lm_head, c->vocab_size, H, 0, "lm_head.weight");
    }
    free(scratch_layer.experts);
    *Lp = L;
    return XO_OK;
fail:
    free(scratch_layer.experts);
    free(L.s);
    return L.rc ? L.rc : xo_fail(XO_ENOMEM, "out of memory");
}

xo_status xo_weights_layout(const xo_config *c, xo_weights *w, xo_dtype t, xo_weight_slot **slots, int *n) {
    slot_list L = {0};
    XO_TRY(layout(c, w, t, &L));
    *slots = L.s;
    *n = L.n;
    return XO_OK;
}

/* Writes one slot's host data (dtype src_t, SPEC layout) into backend storage. */
static xo_status fill_slot(xo_backend *be, const xo_weight_slot *s, const void *host, xo_dtype src_t) {
    if (s->kind == XO_SLOT_VECTOR) {
        float *tmp = malloc((size_t)s->rows * sizeof *tmp);
        if (!tmp) return xo_fail(XO_ENOMEM, "out of memory");
        xo_convert_to_f32(tmp, host, src_t, (size_t)s->rows);
        xo_status rc = XO_OK;
        if (!*s->vec && !(*s->vec = be->mem.alloc(be, (size_t)s->rows * sizeof(float))))
            rc = xo_fail_more(XO_ENOMEM, "out of memory for %s", s->name);
        if (rc == XO_OK) rc = be->mem.upload(be, *s->vec, tmp, (size_t)s->rows * sizeof(float));
        free(tmp);
        return rc;
    }
    if (s->kind == XO_SLOT_KV_A) {
        /* store every row: the storage is sized for s->rows on first use, products read lin->out */
        xo_linear full = *s->lin;
        full.out = s->rows;
        xo_status rc = be->weights.linear_init(be, &full, host, src_t, 0, s->rows);
        s->lin->data = full.data;
        s->lin->scales = full.scales;
        return rc;
    }
    return be->weights.linear_init(be, s->lin, host, src_t, s->row_offset, s->rows);
}

/* The checkpoint's tensors under `prefix`, sorted by the rest of their name. */
struct tensor_index {
    const xo_tensor_view **v;
    int n;
    size_t prefix_len;
    const char *prefix;
};

static int by_suffix(const void *a, const void *b, void *prefix_len) {
    const size_t skip = *(const size_t *)prefix_len;
    return strcmp((*(const xo_tensor_view *const *)a)->name + skip, (*(const xo_tensor_view *const *)b)->name + skip);
}

static xo_status index_build(struct tensor_index *ix, const xo_tensor_view *t, int n, const char *prefix) {
    ix->prefix = prefix;
    ix->prefix_len = strlen(prefix);
    ix->n = 0;
    ix->v = malloc((size_t)(n > 0 ? n : 1) * sizeof *ix->v);
    if (!ix->v) return xo_fail(XO_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        if (!strncmp(t[i].name, prefix, ix->prefix_len)) ix->v[ix->n++] = &t[i];
    qsort_r(ix->v, (size_t)ix->n, sizeof *ix->v, by_suffix, &ix->prefix_len);
    return XO_OK;
}

static const xo_tensor_view *index_find(const struct tensor_index *ix, const char *name) {
    int lo = 0, hi = ix->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(ix->v[mid]->name + ix->prefix_len, name);
        if (!c) return ix->v[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

static xo_status check_slot(const struct tensor_index *ix, const xo_weight_slot *s) {
    const char *prefix = ix->prefix;
    const xo_tensor_view *v = index_find(ix, s->name);
    if (!v) return xo_fail(XO_EFORMAT, "checkpoint is missing tensor '%s%s'", prefix, s->name);
    int want_nd = s->cols ? 2 : 1;
    int ok = v->ndim == want_nd && v->shape[0] == s->rows && (want_nd == 1 || v->shape[1] == s->cols);
    if (!ok) {
        char got[96] = "[";
        for (int d = 0; d < v->ndim && d < XO_MAX_DIMS; d++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)v->shape[d]);
        strncat(got, "]", sizeof got - strlen(got) - 1);
        if (s->cols)
            return xo_fail(XO_EFORMAT, "tensor '%s%s' has shape %s, expected [%d, %d]", prefix, s->name, got, s->rows,
                           s->cols);
        return xo_fail(XO_EFORMAT, "tensor '%s%s' has shape %s, expected [%d]", prefix, s->name, got, s->rows);
    }
    if (v->dtype != XO_F32 && v->dtype != XO_F16 && v->dtype != XO_BF16)
        return xo_fail(XO_EFORMAT, "tensor '%s%s' has unsupported dtype '%s' (expected F32, F16 or BF16)",
                       prefix, s->name, v->dtype_name);
    return XO_OK;
}

/* The bytes of v in memory: its own, or read from its file into *buf (grown as needed). */
static xo_status tensor_bytes(const xo_tensor_view *v, void **buf, size_t *cap, const void **out) {
    if (v->data) {
        *out = v->data;
        return XO_OK;
    }
    if (v->nbytes > *cap) {
        void *nb = realloc(*buf, v->nbytes);
        if (!nb) return xo_fail(XO_ENOMEM, "out of memory reading tensor '%s'", v->name);
        *buf = nb;
        *cap = v->nbytes;
    }
    XO_TRY(xo_tensor_view_read(v, *buf));
    *out = *buf;
    return XO_OK;
}

static xo_status check_finite_values(const xo_tensor_view *v, const void *bytes) {
    size_t es = xo_dtype_size(v->dtype);
    int64_t bad = xo_first_nonfinite(bytes, v->dtype, es ? v->nbytes / es : 0);
    if (bad < 0) return XO_OK;
    float value;
    xo_convert_to_f32(&value, (const char *)bytes + (size_t)bad * es, v->dtype, 1);
    return xo_fail(XO_EFORMAT, "tensor '%s' holds %s at element %lld (load with check_finite=False to accept it)",
                   v->name, isnan(value) ? "NaN" : value > 0 ? "+inf" : "-inf", (long long)bad);
}

xo_status xo_weights_load(xo_weights *w, const xo_config *c, xo_backend *be, xo_dtype t,
                          const xo_tensor_view *tensors, int num_tensors, const char *prefix, int check_finite) {
    struct tensor_index ix;
    XO_TRY(index_build(&ix, tensors, num_tensors, prefix));
    /* Check every tensor before allocating or filling anything, so a bad checkpoint fails fast. */
    xo_weights probe;
    memset(&probe, 0, sizeof probe);
    slot_list check = { .check = &ix };
    xo_status rc = layout(c, &probe, t, &check);
    /* tensors in memory are checked before any is stored too, so a refused load_state_dict
     * leaves the model as it was; a file's are checked as they are read (a failed
     * from_pretrained leaves no model behind) */
    for (int i = 0; check_finite && rc == XO_OK && i < ix.n; i++)
        if (ix.v[i]->data) rc = check_finite_values(ix.v[i], ix.v[i]->data);
    xo_weight_slot *slots = NULL;
    int n = 0;
    if (rc == XO_OK) rc = xo_weights_layout(c, w, t, &slots, &n);
    void *buf = NULL;
    size_t cap = 0;
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const xo_tensor_view *v = index_find(&ix, slots[i].name);
        const void *bytes = NULL;
        rc = tensor_bytes(v, &buf, &cap, &bytes);
        if (rc == XO_OK && check_finite && !v->data) rc = check_finite_values(v, bytes);
        if (rc == XO_OK && (rc = fill_slot(be, &slots[i], bytes, v->dtype)) != XO_OK)
            rc = xo_fail_more(rc, "tensor '%s'", v->name);
    }
    free(buf);
    free(slots);
    free(ix.v);
    return rc;
}

/* splitmix64: a tiny, good-enough generator; one stream per (seed, slot, block). */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fill_normal(float *dst, size_t n, float std, uint64_t seed) {
    const size_t block = 1 << 16;
    size_t nblocks = (n + block - 1) / block;
    #pragma omp parallel for schedule(static)
    for (size_t b = 0; b < nblocks; b++) {
        uint64_t st = seed ^ (0xd1b54a32d192ed03ULL * (b + 1));
        size_t end = (b + 1) * block < n ? (b + 1) * block : n;
        for (size_t i = b * block; i < end; i += 2) {
            double u1 = ((splitmix64(&st) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
            double u2 = (splitmix64(&st) >> 11) * (1.0 / 9007199254740992.0);
            double rad = sqrt(-2.0 * log(u1));
            dst[i] = (float)(std * rad * cos(2.0 * M_PI * u2));
            if (i + 1 < end) dst[i + 1] = (float)(std * rad * sin(2.0 * M_PI * u2));
        }
    }
}

xo_status xo_weights_random(xo_weights *w, const xo_config *c, xo_backend *be, xo_dtype t, uint64_t seed) {
    xo_weight_slot *slots = NULL;
    int n = 0;
    XO_TRY(xo_weights_layout(c, w, t, &slots, &n));
    xo_status rc = XO_OK;
    for (int i = 0; i < n && rc == XO_OK; i++) {
        const xo_weight_slot *s = &slots[i];
        size_t count = (size_t)s->rows * (s->cols ? (size_t)s->cols : 1);
        float *host = malloc(count * sizeof *host);
        if (!host) { rc = xo_fail(XO_ENOMEM, "out of memory initialising %s", s->name); break; }
        if (s->is_norm) {
            for (size_t j = 0; j < count; j++) host[j] = 1.0f;
        } else {
            uint64_t st = seed * 0x100000001b3ULL + (uint64_t)i;
            fill_normal(host, count, 0.02f, splitmix64(&st));
        }
        rc = fill_slot(be, s, host, XO_F32);
        free(host);
    }
    free(slots);
    return rc;
}

xo_status xo_weights_get(const xo_weights *w, const xo_config *c, xo_backend *be, const xo_weight_slot *s, float *host) {
    (void)w;
    (void)c;
    if (s->kind == XO_SLOT_VECTOR) return be->mem.download(be, host, *s->vec, (size_t)s->rows * sizeof(float));
    xo_linear full = *s->lin;
    if (s->kind == XO_SLOT_KV_A) full.out = s->rows;
    const size_t rowsz = (size_t)full.in;
    int tmp_needed = s->kind == XO_SLOT_LINEAR && (s->row_offset != 0 || s->rows != full.out);
    float *dst = host;
    if (tmp_needed && !(dst = malloc((size_t)full.out * rowsz * sizeof(float))))
        return xo_fail(XO_ENOMEM, "out of memory");
    xo_status rc = be->weights.linear_to_host(be, &full, dst);
    if (rc == XO_OK && tmp_needed) memcpy(host, dst + (size_t)s->row_offset * rowsz, (size_t)s->rows * rowsz * sizeof(float));
    if (tmp_needed) free(dst);
    return rc;
}

static void free_ffn(xo_backend *be, xo_ffn *f) {
    be->weights.linear_free(be, &f->gate_up);
    be->weights.linear_free(be, &f->down);
}

void xo_weights_free(xo_weights *w, const xo_config *c, xo_backend *be) {
    if (w->layers) {
        for (int i = 0; i < c->num_layers; i++) {
            xo_layer_weights *l = &w->layers[i];
            be->mem.release(be, l->input_norm);
            be->weights.linear_free(be, &l->q);
            be->weights.linear_free(be, &l->q_a);
            be->mem.release(be, l->q_a_norm);
            be->weights.linear_free(be, &l->q_b);
            be->weights.linear_free(be, &l->kv_a);
            be->mem.release(be, l->kv_a_norm);
            be->weights.linear_free(be, &l->kv_b);
            be->weights.linear_free(be, &l->o);
            be->mem.release(be, l->post_norm);
            free_ffn(be, &l->mlp);
            be->mem.release(be, l->router_norm);
            be->weights.linear_free(be, &l->router);
            if (l->experts) {
                for (int e = 0; e < c->num_experts; e++) free_ffn(be, &l->experts[e]);
                free(l->experts);
            }
            free_ffn(be, &l->shared);
        }
        free(w->layers);
    }
    be->weights.linear_free(be, &w->embed);
    if (!w->tied) be->weights.linear_free(be, &w->lm_head);
    be->mem.release(be, w->final_norm);
    memset(w, 0, sizeof *w);
}
