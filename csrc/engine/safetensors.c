#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- a small JSON scanner, just enough for the safetensors header ---- */

typedef struct {
    const char *p, *end;
    const char *base;   /* the header's first byte, which is byte 8 of the file */
    const char *path;
} scanner;

static size_t file_offset(const scanner *s, const char *at) { return 8 + (size_t)(at - s->base); }

static void skip_ws(scanner *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static xo_status bad_at(const scanner *s, const char *at, const char *what) {
    return xo_fail(XO_EFORMAT, "%s: corrupt safetensors header at byte %zu: %s", s->path, file_offset(s, at), what);
}

static xo_status bad(const scanner *s, const char *what) { return bad_at(s, s->p, what); }

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

/* Length of the UTF-8 sequence at p (RFC 3629: no overlongs, no surrogates, <= U+10FFFF),
 * or 0 if the bytes there are not one. */
static int utf8_sequence_length(const unsigned char *p, const unsigned char *end) {
    if (p[0] < 0x80) return 1;
    int n;
    uint32_t cp;
    if (p[0] >= 0xc2 && p[0] <= 0xdf) { n = 2; cp = p[0] & 0x1fu; }
    else if (p[0] >= 0xe0 && p[0] <= 0xef) { n = 3; cp = p[0] & 0x0fu; }
    else if (p[0] >= 0xf0 && p[0] <= 0xf4) { n = 4; cp = p[0] & 0x07u; }
    else return 0;
    if (end - p < n) return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xc0u) != 0x80u) return 0;
        cp = (cp << 6) | (p[i] & 0x3fu);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The four hex digits after a "\u" at p (p points at the backslash), or -1. */
static long read_u_escape(const scanner *s, const char *p) {
    if (s->end - p < 6 || p[1] != 'u') return -1;
    long v = 0;
    for (int i = 2; i < 6; i++) {
        int h = hex_value(p[i]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

static size_t put_utf8(char *out, uint32_t cp) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Parses a JSON string into a freshly allocated UTF-8 buffer, escapes decoded (RFC 8259:
 * \uXXXX with surrogate pairs; a lone surrogate, \u0000, an unknown escape or a raw control
 * character is an error). The header was checked to be UTF-8 before, so raw bytes copy through. */
static xo_status parse_string(scanner *s, char **out) {
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"') return bad(s, "expected a string");
    const char *start = ++s->p;
    while (s->p < s->end && *s->p != '"') s->p += *s->p == '\\' && s->p + 1 < s->end ? 2 : 1;
    if (s->p >= s->end) return bad_at(s, start - 1, "unterminated string");
    /* an escape never decodes to more bytes than it is written with */
    char *buf = malloc((size_t)(s->p - start) + 1);
    if (!buf) return xo_fail(XO_ENOMEM, "out of memory reading %s", s->path);
    size_t n = 0;
    for (const char *q = start; q < s->p;) {
        unsigned char c = (unsigned char)*q;
        if (c < 0x20) { free(buf); return bad_at(s, q, "control character inside a string"); }
        if (c != '\\') { buf[n++] = (char)c; q++; continue; }
        const char *esc = q;
        char simple = 0;
        switch (q[1]) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': break;
        default: free(buf); return bad_at(s, esc, "invalid escape in a string");
        }
        if (simple) { buf[n++] = simple; q += 2; continue; }
        long cp = read_u_escape(s, q);
        if (cp < 0) { free(buf); return bad_at(s, esc, "\\u must be followed by four hex digits"); }
        q += 6;
        if (cp >= 0xdc00 && cp <= 0xdfff) { free(buf); return bad_at(s, esc, "unpaired low surrogate escape"); }
        if (cp >= 0xd800 && cp <= 0xdbff) {
            long lo = q < s->p && *q == '\\' ? read_u_escape(s, q) : -1;
            if (lo < 0xdc00 || lo > 0xdfff) { free(buf); return bad_at(s, esc, "unpaired high surrogate escape"); }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            q += 6;
        }
        if (cp == 0) { free(buf); return bad_at(s, esc, "\\u0000 in a string"); }
        n += put_utf8(buf + n, (uint32_t)cp);
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
    scanner s = { st->header, st->header + strlen(st->header), st->header, st->path };
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
            t->fd = st->fd;
            t->file = st->path;
            t->file_offset = data_start + off[0];
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
        /* As the format requires: the tensors tile the data section exactly. A gap or a tail
         * means the offsets are not what the writer meant (a header length one byte short
         * shifts every tensor by one byte yet still parses). */
        qsort(spans, (size_t)st->num_tensors, sizeof *spans, span_cmp);
        uint64_t cursor = 0;
        int prev = -1;
        for (int i = 0; i < st->num_tensors && rc == XO_OK; i++) {
            if (spans[i].begin < cursor)
                rc = xo_fail(XO_EFORMAT, "%s: tensors '%s' and '%s' have overlapping data ranges", st->path,
                             st->tensors[prev].name, st->tensors[spans[i].index].name);
            else if (spans[i].begin > cursor)
                rc = xo_fail(XO_EFORMAT, "%s: data bytes [%llu, %llu) belong to no tensor (before '%s'; "
                             "corrupt header or wrong header length)", st->path, (unsigned long long)cursor,
                             (unsigned long long)spans[i].begin, st->tensors[spans[i].index].name);
            cursor = spans[i].end;
            prev = spans[i].index;
        }
        if (rc == XO_OK && cursor != data_size)
            rc = xo_fail(XO_EFORMAT, "%s: the last %llu bytes of the %zu-byte data section belong to no tensor "
                         "(corrupt header, wrong header length or trailing data)", st->path,
                         (unsigned long long)(data_size - cursor), data_size);
    }
    free(spans);
    return rc;
}

/* Reads exactly n bytes at offset, or fails naming what was being read. */
static xo_status read_exact(const xo_safetensors *st, void *dst, size_t n, uint64_t offset, const char *what) {
    size_t done = 0;
    while (done < n) {
        ssize_t got = pread(st->fd, (char *)dst + done, n - done, (off_t)(offset + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return xo_fail(XO_EIO, "%s: cannot read the %s: %s", st->path, what, strerror(errno));
        if (got == 0)
            return xo_fail(XO_EIO, "%s: the file ends at byte %llu inside the %s (it was truncated while reading)",
                           st->path, (unsigned long long)(offset + done), what);
        done += (size_t)got;
    }
    return XO_OK;
}

static xo_status check_utf8(const xo_safetensors *st, size_t hlen) {
    const unsigned char *p = (const unsigned char *)st->header, *end = p + hlen;
    while (p < end) {
        int n = utf8_sequence_length(p, end);
        if (!n)
            return xo_fail(XO_EFORMAT, "%s: corrupt safetensors header at byte %zu: not valid UTF-8", st->path,
                           8 + (size_t)(p - (const unsigned char *)st->header));
        p += n;
    }
    return XO_OK;
}

static xo_status open_and_parse(xo_safetensors *st, const char *path) {
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before the
     * regular-file check could refuse it */
    st->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (st->fd < 0) return xo_fail(XO_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(st->fd, &sb) != 0) return xo_fail(XO_EIO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return xo_fail(XO_EIO, "%s: not a regular file", path);
    st->size = (size_t)sb.st_size;
    if (st->size < 8)
        return xo_fail(XO_EFORMAT, "%s: truncated safetensors file (%zu bytes, no header length)", path, st->size);
    unsigned char b[8];
    XO_TRY(read_exact(st, b, 8, 0, "header length"));
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    if (hlen > st->size - 8)
        return xo_fail(XO_EFORMAT, "%s: header length %llu runs past the end of the %zu-byte file "
                       "(truncated or not a safetensors file)", path, (unsigned long long)hlen, st->size);
    if (hlen > 100u * 1024 * 1024)
        return xo_fail(XO_EFORMAT, "%s: header length %llu is implausibly large", path, (unsigned long long)hlen);
    st->header = malloc((size_t)hlen + 1);
    if (!st->header) return xo_fail(XO_ENOMEM, "out of memory reading %s", path);
    XO_TRY(read_exact(st, st->header, (size_t)hlen, 8, "header"));
    st->header[hlen] = '\0';
    size_t nul = strlen(st->header);
    if (nul != hlen) /* trailing NULs are not allowed by the format; embedded ones mean corruption */
        return xo_fail(XO_EFORMAT, "%s: corrupt safetensors header at byte %zu: NUL byte", path, 8 + nul);
    XO_TRY(check_utf8(st, (size_t)hlen));
    return parse_header(st, 8 + (size_t)hlen);
}

xo_status xo_safetensors_open(xo_safetensors *st, const char *path) {
    memset(st, 0, sizeof *st);
    st->fd = -1;
    st->path = strdup(path);
    if (!st->path) return xo_fail(XO_ENOMEM, "out of memory");
    xo_status rc = open_and_parse(st, path);
    if (rc != XO_OK) xo_safetensors_close(st);
    return rc;
}

void xo_safetensors_close(xo_safetensors *st) {
    for (int i = 0; i < st->num_tensors; i++) free((char *)st->tensors[i].name);
    free(st->tensors);
    free(st->header);
    if (st->fd >= 0) close(st->fd);
    free(st->path);
    memset(st, 0, sizeof *st);
    st->fd = -1;
}
