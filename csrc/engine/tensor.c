#include "engine/tensor.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

size_t xo_dtype_size(xo_dtype t) {
    switch (t) {
    case XO_F32: return 4;
    case XO_F16: case XO_BF16: return 2;
    case XO_I8: return 1;
    default: return 0;
    }
}

const char *xo_dtype_name(xo_dtype t) {
    switch (t) {
    case XO_F32: return "float32";
    case XO_F16: return "float16";
    case XO_BF16: return "bfloat16";
    case XO_I8: return "int8";
    case XO_I4: return "int4";
    default: return "unknown";
    }
}

float xo_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t xo_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t man = x & 0x7fffffu;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)h;
}

void xo_convert_to_f32(float *dst, const void *src, xo_dtype t, size_t n) {
    if (t == XO_F32) {
        memcpy(dst, src, n * 4);
    } else if (t == XO_BF16) {
        const unsigned char *s = src;
        #pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = xo_bf16_to_f32(h);
        }
    } else if (t == XO_F16) {
        const unsigned char *s = src;
        #pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = xo_f16_to_f32(h);
        }
    }
}

xo_status xo_tensor_view_read(const xo_tensor_view *v, void *dst) {
    if (v->data) {
        memcpy(dst, v->data, v->nbytes);
        return XO_OK;
    }
    size_t done = 0;
    while (done < v->nbytes) {
        ssize_t got = pread(v->fd, (char *)dst + done, v->nbytes - done, (off_t)(v->file_offset + done));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0)
            return xo_fail(XO_EIO, "%s: cannot read tensor '%s': %s", v->file, v->name, strerror(errno));
        if (got == 0)
            return xo_fail(XO_EIO, "%s: the file ends at byte %llu inside tensor '%s' (it was truncated or "
                           "replaced while loading)", v->file, (unsigned long long)(v->file_offset + done), v->name);
        done += (size_t)got;
    }
    return XO_OK;
}

int64_t xo_first_nonfinite(const void *src, xo_dtype t, size_t n) {
    /* all exponent bits set means infinity or NaN in each of these formats */
    if (t == XO_F32) {
        const uint32_t *u = src;
        for (size_t i = 0; i < n; i++)
            if ((u[i] & 0x7f800000u) == 0x7f800000u) return (int64_t)i;
    } else if (t == XO_F16 || t == XO_BF16) {
        const uint16_t *u = src;
        const uint16_t exp = t == XO_F16 ? 0x7c00u : 0x7f80u;
        for (size_t i = 0; i < n; i++)
            if ((u[i] & exp) == exp) return (int64_t)i;
    }
    return -1;
}
