#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- a small JSON scanner, just enough for the safetensors header ---- */

typedef struct {
    const char *p, *end;
    const char *path;
} scanner;

static void skip_ws(scanner *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static xo_status bad(const scanner *s, const char *what) {
    return xo_fail(XO_EFORMAT, "%s: corrupt safetensors header: %s", s->path, what);
}

static xo_status expect(scanner *s, char c) {
    skip_ws(s);
    if (s->p >= s->end || *s->p != c) {
        char msg[32];
        snprintf(msg, sizeof msg, "expected '%c'", c);
        return bad(s, msg);
    }
    s->p++;
    return XO_OK;
}

/* Parses a JSON string into a freshly allocated buffer (escapes decoded; \u kept ASCII-only). */
static xo_status parse_string(scanner *s, char **out) {
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"') return bad(s, "expected a string");
    s->p++;
    const char *start = s->p;
    size_t cap = 0;
    while (s->p < s->end && *s->p != '"') {
        if (*s->p == '\\') s->p++;
        s->p++;
        cap++;
    }
    if (s->p >= s->end) return bad(s, "unterminated string");
    char *buf = malloc(cap + 1);
    if (!buf) return xo_fail(XO_ENOMEM, "out of memory reading %s", s->path);
    size_t n = 0;
    for (const char *q = start; q < s->p; q++) {
        char c = *q;
        if (c == '\\') {
            q++;
            switch (*q) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': c = '?'; q += (s->p - q > 4) ? 4 : 0; break;
            default: c = *q; break;
            }
        }
        buf[n++] = c;
    }
    buf[n] = '\0';
    s->p++; /* closing quote */
    *out = buf;
    return XO_OK;
}

static xo_status parse_uint(scanner *s, uint64_t *out) {
    skip_ws(s);
    if (s->p >= s->end || *s->p < '0' || *s->p > '9') return bad(s, "expected a non-negative integer");
    uint64_t v = 0;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') {
        uint64_t d = (uint64_t)(*s->p - '0');
        if (v > (UINT64_MAX - d) / 10) return bad(s, "integer overflow");
        v = v * 10 + d;
        s->p++;
    }
    *out = v;
    return XO_OK;
}

/* Skips any JSON value (used for __metadata__ and unknown keys). */
static xo_status skip_value(scanner *s, int depth) {
    if (depth > 64) return bad(s, "nesting too deep");
    skip_ws(s);
    if (s->p >= s->end) return bad(s, "unexpected end");
    char c = *s->p;
    if (c == '"') {
        char *tmp;
        XO_TRY(parse_string(s, &tmp));
        free(tmp);
        return XO_OK;
    }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        s->p++;
        skip_ws(s);
        if (s->p < s->end && *s->p == close) { s->p++; return XO_OK; }
        for (;;) {
            if (c == '{') {
                char *key;
                XO_TRY(parse_string(s, &key));
                free(key);
                XO_TRY(expect(s, ':'));
            }
            XO_TRY(skip_value(s, depth + 1));
            skip_ws(s);
            if (s->p < s->end && *s->p == ',') { s->p++; continue; }
            return expect(s, close);
        }
    }
    while (s->p < s->end && *s->p != ',' && *s->p != '}' && *s->p != ']') s->p++; /* number, literal */
    return XO_OK;
}

static xo_dtype dtype_from_name(const char *n) {
    if (!strcmp(n, "F32")) return XO_F32;
    if (!strcmp(n, "F16")) return XO_F16;
    if (!strcmp(n, "BF16")) return XO_BF16;
    if (!strcmp(n, "I8")) return XO_I8;
    return XO_DTYPE_UNKNOWN;
}

/* Parses {"dtype":..,"shape":[..],"data_offsets":[a,b]} into t (offsets relative to data start). */
static xo_status parse_entry(scanner *s, xo_tensor_view *t, uint64_t off[2]) {
    int have_dtype = 0, have_shape = 0, have_off = 0;
    XO_TRY(expect(s, '{'));
    for (;;) {
        char *key;
        XO_TRY(parse_string(s, &key));
        xo_status st = expect(s, ':');
        if (st == XO_OK && !strcmp(key, "dtype")) {
            char *dt = NULL;
            st = parse_string(s, &dt);
            if (st == XO_OK) {
                snprintf(t->dtype_name, sizeof t->dtype_name, "%s", dt);
                t->dtype = dtype_from_name(dt);
                have_dtype = 1;
            }
            free(dt);
        } else if (st == XO_OK && !strcmp(key, "shape")) {
            st = expect(s, '[');
            t->ndim = 0;
            skip_ws(s);
            if (st == XO_OK && s->p < s->end && *s->p == ']') {
                s->p++;
            } else {
                while (st == XO_OK) {
                    uint64_t d;
                    st = parse_uint(s, &d);
                    if (st != XO_OK) break;
                    if (t->ndim >= XO_MAX_DIMS) { st = bad(s, "too many dimensions"); break; }
                    if (d > (1ULL << 40)) { st = bad(s, "dimension too large"); break; }
                    t->shape[t->ndim++] = (int64_t)d;
                    skip_ws(s);
                    if (s->p < s->end && *s->p == ',') { s->p++; continue; }
                    st = expect(s, ']');
                    break;
                }
            }
            have_shape = 1;
        } else if (st == XO_OK && !strcmp(key, "data_offsets")) {
            st = expect(s, '[');
            if (st == XO_OK) st = parse_uint(s, &off[0]);
            if (st == XO_OK) st = expect(s, ',');
            if (st == XO_OK) st = parse_uint(s, &off[1]);
            if (st == XO_OK) st = expect(s, ']');
            have_off = 1;
        } else if (st == XO_OK) {
            st = skip_value(s, 1);
        }
        free(key);
        XO_TRY(st);
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') { s->p++; continue; }
        XO_TRY(expect(s, '}'));
        break;
    }
    if (!have_dtype || !have_shape || !have_off) return bad(s, "tensor entry lacks dtype, shape or data_offsets");
    return XO_OK;
}

typedef struct { uint64_t begin, end; int index; } span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end < y->end ? -1 : x->end > y->end);
}

static int view_name_cmp(const void *a, const void *b) {
    return strcmp((*(const xo_tensor_view *const *)a)->name, (*(const xo_tensor_view *const *)b)->name);
}

static xo_status parse_header(xo_safetensors *st, size_t data_start) {
    scanner s = { st->header, st->header + strlen(st->header), st->path };
    size_t data_size = st->size - data_start;
    int cap = 64;
    st->tensors = calloc((size_t)cap, sizeof *st->tensors);
    span *spans = malloc((size_t)cap * sizeof *spans);
    if (!st->tensors || !spans) { free(spans); return xo_fail(XO_ENOMEM, "out of memory reading %s", st->path); }
    xo_status rc = expect(&s, '{');
    skip_ws(&s);
    if (rc == XO_OK && s.p < s.end && *s.p == '}') { s.p++; goto done; }
    while (rc == XO_OK) {
        char *name = NULL;
        rc = parse_string(&s, &name);
        if (rc == XO_OK) rc = expect(&s, ':');
        if (rc == XO_OK && !strcmp(name, "__metadata__")) {
            rc = skip_value(&s, 1);
            free(name);
        } else if (rc == XO_OK) {
            if (st->num_tensors == cap) {
                cap *= 2;
                void *nt = realloc(st->tensors, (size_t)cap * sizeof *st->tensors);
                void *ns = nt ? realloc(spans, (size_t)cap * sizeof *spans) : NULL;
                if (nt) st->tensors = nt;
                if (ns) spans = ns;
                if (!nt || !ns) { free(name); rc = xo_fail(XO_ENOMEM, "out of memory reading %s", st->path); break; }
            }
            xo_tensor_view *t = &st->tensors[st->num_tensors];
            memset(t, 0, sizeof *t);
            t->name = name;
            st->num_tensors++;
            uint64_t off[2] = {0, 0};
            rc = parse_entry(&s, t, off);
            if (rc != XO_OK) break;
            if (off[1] < off[0] || off[1] > data_size) {
                rc = xo_fail(XO_EFORMAT, "%s: tensor '%s' has data offsets [%llu, %llu] outside the %zu-byte "
                             "data section (truncated or corrupt file)", st->path, name,
                             (unsigned long long)off[0], (unsigned long long)off[1], data_size);
                break;
            }
            uint64_t count = 1;
            int too_big = 0;
            for (int d = 0; d < t->ndim; d++) {
                if (t->shape[d] && count > UINT64_MAX / (uint64_t)t->shape[d]) too_big = 1;
                else count *= (uint64_t)t->shape[d];
            }
            size_t es = xo_dtype_size(t->dtype);
            if (too_big || (es && count > UINT64_MAX / es)) {
                rc = xo_fail(XO_EFORMAT, "%s: tensor '%s' has a shape too large for any file (corrupt header)",
                             st->path, name);
                break;
            }
            if (es && count * es != off[1] - off[0]) {
                rc = xo_fail(XO_EFORMAT, "%s: tensor '%s' holds %llu bytes but its shape and dtype %s need %llu",
                             st->path, name, (unsigned long long)(off[1] - off[0]), t->dtype_name,
                             (unsigned long long)(count * es));
                break;
            }
            t->data = (const char *)st->map + data_start + off[0];
            t->nbytes = (size_t)(off[1] - off[0]);
            spans[st->num_tensors - 1] = (span){ off[0], off[1], st->num_tensors - 1 };
        } else {
            free(name);
        }
        if (rc != XO_OK) break;
        skip_ws(&s);
        if (s.p < s.end && *s.p == ',') { s.p++; continue; }
        rc = expect(&s, '}');
        break;
    }
done:
    if (rc == XO_OK) {
        skip_ws(&s);
        if (s.p < s.end) rc = bad(&s, "unexpected characters after the JSON object");
    }
    if (rc == XO_OK && st->num_tensors > 1) {
        /* The same name twice would make the later entry silently unreachable. */
        const xo_tensor_view **byname = malloc((size_t)st->num_tensors * sizeof *byname);
        if (!byname) {
            rc = xo_fail(XO_ENOMEM, "out of memory reading %s", st->path);
        } else {
            for (int i = 0; i < st->num_tensors; i++) byname[i] = &st->tensors[i];
            qsort(byname, (size_t)st->num_tensors, sizeof *byname, view_name_cmp);
            for (int i = 1; i < st->num_tensors && rc == XO_OK; i++)
                if (!strcmp(byname[i - 1]->name, byname[i]->name))
                    rc = xo_fail(XO_EFORMAT, "%s: tensor '%s' appears twice in the header", st->path, byname[i]->name);
            free(byname);
        }
    }
    if (rc == XO_OK) {
        qsort(spans, (size_t)st->num_tensors, sizeof *spans, span_cmp);
        uint64_t covered = 0; /* furthest end among the non-empty spans seen so far */
        int owner = -1;
        for (int i = 0; i < st->num_tensors; i++) {
            if (spans[i].end == spans[i].begin) continue;
            if (owner >= 0 && spans[i].begin < covered) {
                rc = xo_fail(XO_EFORMAT, "%s: tensors '%s' and '%s' have overlapping data ranges", st->path,
                             st->tensors[owner].name, st->tensors[spans[i].index].name);
                break;
            }
            if (spans[i].end > covered) { covered = spans[i].end; owner = spans[i].index; }
        }
    }
    free(spans);
    return rc;
}

xo_status xo_safetensors_open(xo_safetensors *st, const char *path) {
    memset(st, 0, sizeof *st);
    st->path = strdup(path);
    if (!st->path) return xo_fail(XO_ENOMEM, "out of memory");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        xo_status rc = xo_fail(XO_EIO, "%s: cannot open: %s", path, strerror(errno));
        xo_safetensors_close(st);
        return rc;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        xo_status rc = xo_fail(XO_EIO, "%s: not a regular file", path);
        xo_safetensors_close(st);
        return rc;
    }
    st->size = (size_t)sb.st_size;
    xo_status rc = XO_OK;
    if (st->size < 8) {
        rc = xo_fail(XO_EFORMAT, "%s: truncated safetensors file (%zu bytes, no header length)", path, st->size);
    } else {
        st->map = mmap(NULL, st->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (st->map == MAP_FAILED) {
            st->map = NULL;
            rc = xo_fail(XO_EIO, "%s: cannot map: %s", path, strerror(errno));
        }
    }
    close(fd);
    if (rc == XO_OK) {
        uint64_t hlen = 0;
        const unsigned char *b = st->map;
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
        if (hlen > st->size - 8) {
            rc = xo_fail(XO_EFORMAT, "%s: header length %llu runs past the end of the %zu-byte file "
                         "(truncated or not a safetensors file)", path, (unsigned long long)hlen, st->size);
        } else if (hlen > 100u * 1024 * 1024) {
            rc = xo_fail(XO_EFORMAT, "%s: header length %llu is implausibly large", path, (unsigned long long)hlen);
        } else {
            st->header = malloc((size_t)hlen + 1);
            if (!st->header) {
                rc = xo_fail(XO_ENOMEM, "out of memory reading %s", path);
            } else {
                memcpy(st->header, b + 8, (size_t)hlen);
                st->header[hlen] = '\0';
                if (strlen(st->header) != hlen) {
                    /* trailing NULs are not allowed by the format; embedded ones mean corruption */
                    rc = xo_fail(XO_EFORMAT, "%s: corrupt safetensors header (NUL byte)", path);
                } else {
                    rc = parse_header(st, 8 + (size_t)hlen);
                }
            }
        }
    }
    if (rc != XO_OK) xo_safetensors_close(st);
    return rc;
}

void xo_safetensors_close(xo_safetensors *st) {
    for (int i = 0; i < st->num_tensors; i++) free((char *)st->tensors[i].name);
    free(st->tensors);
    free(st->header);
    if (st->map) munmap(st->map, st->size);
    free(st->path);
    memset(st, 0, sizeof *st);
}
