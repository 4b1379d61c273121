#include "engine/options.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_THREADS = 4096, MAX_TILE_ROWS = 4096, MAX_GEMV_ROWS = 1 << 20, MAX_PREFILL_CHUNK = 1 << 20,
       MAX_ATTENTION_KEYS = 1 << 30 };

const xo_option_info xo_option_table[] = {
    { "threads", "XORON_NUM_THREADS", "an integer >= 0",
      "CPU threads of the model's kernels; 0: the process default (xoron.set_num_threads; else OMP_NUM_THREADS, else the physical cores)" },
    { "cpu_isa", "XORON_CPU_ISA", "auto, generic, avx2, avx512, avx512vnni, amx",
      "the highest CPU instruction set the matrix kernels use (a ceiling: the CPU's own is never exceeded; avx512 is AVX-512F+BW, avx512vnni adds VNNI for the int8/int4 kernels, amx adds AMX-BF16 tiles for the bf16, int8 and int4 products of more rows than the matrix-vector kernels take)" },
    { "cpu_gemv_max_rows", "XORON_CPU_GEMV_MAX_ROWS", "auto or an integer >= 0",
      "16-bit, int8 and int4 products of at most this many rows take the matrix-vector kernels, larger ones the AMX tiles (bf16, int8, int4 under cpu_isa amx) or the widened tiles; auto: 40, with AMX 8 for bf16" },
    { "cpu_tile_rows", "XORON_CPU_TILE_ROWS", "an integer >= 1", "rows of a 16-bit or int8 weight widened per tile (64)" },
    { "prefill_chunk", "XORON_PREFILL_CHUNK", "auto or an integer >= 1",
      "tokens (over all rows) per pass of a long input through the layers: activation memory is sized by it, not by the input; "
      "auto: 4096 on the CPU, 16384 on CUDA" },
    { "cuda_moe", "XORON_CUDA_MOE", "device, host",
      "device: expert groups counted and run on the GPU; host: per-expert GEMMs sized from counts read back" },
    { "cuda_attention", "XORON_CUDA_ATTN", "auto, rows, latent_decode, mma",
      "auto: tensor-core prefill attention for 16-bit models, and decode steps over a 16-bit latent cache expand K "
      "on the tensor cores inside the attention kernel (V absorbed) from 512 cached keys on, where that wins; "
      "rows: the row-wise kernel always (decode over the latent: K and V of every key expanded into scratch first); "
      "latent_decode: as auto, with the in-kernel expansion at every cached length; "
      "mma: as auto, with prefill on the mma.sync kernel where the wgmma one (compute capability 9.0, head_dim 64) fits" },
    { "cuda_attention_keys", "XORON_CUDA_ATTN_KEYS", "an integer >= 0",
      "keys of a prefill pass per launch of the wgmma attention kernel, whose scratch is their float16 K and V "
      "(rounded to a multiple of 128); 0: as many as 512 MiB holds (every key of a 128K-token sequence in one launch)" },
    { "cuda_gemm", "XORON_CUDA_GEMM", "cublaslt, builtin",
      "cublaslt: cuBLASLt where it is found, else the built-in kernels; builtin: the built-in kernels always" },
    { "cublaslt_library", "XORON_CUBLASLT", "a path, or empty",
      "the cuBLASLt library to load (empty: the usual names); the first model to load it decides for the process; "
      "a build without cuBLASLt (xoron.build_info()) refuses a path" },
    { "cuda_pdl", "XORON_CUDA_PDL", "0, 1", "programmatic dependent launch on compute capability 9.0 and newer" },
    { "cuda_graphs", "XORON_CUDA_GRAPHS", "0, 1", "decode steps recorded once and replayed as CUDA graphs" },
    { "cuda_memory_limit", "XORON_CUDA_MEMORY_LIMIT", "an integer >= 0 (bytes)",
      "the bytes the device's memory pool may hand out before an allocation fails with MemoryError (0: no cap)" },
};
const int xo_option_count = (int)(sizeof xo_option_table / sizeof *xo_option_table);

/* variables that used to mean something: setting one is an error naming what replaced it */
static const struct { const char *env, *instead; } retired[] = {
    { "XORON_CUDA_NO_CUBLASLT", "XORON_CUDA_GEMM=builtin (option cuda_gemm)" },
    { "XORON_CUDA_VERBOSE", "nothing: the CUDA backend prints nothing; failures are raised as exceptions" },
};

static xo_status bad_value(const char *name, const char *value, const char *valid) {
    return xo_fail(XO_EINVAL, "option %s: '%s' is not valid (expected %s)", name, value, valid);
}

/* an integer in [lo, hi]; with auto_value set, "auto" gives *auto_value */
static xo_status parse_integer(const char *name, const char *value, long lo, long hi, const long *auto_value,
                               long *out) {
    if (auto_value && !strcmp(value, "auto")) {
        *out = *auto_value;
        return XO_OK;
    }
    char *end;
    errno = 0;
    long long v = strtoll(value, &end, 10);
    if (!*value || *end || errno || v < lo || v > hi) {
        char valid[112];
        snprintf(valid, sizeof valid, "%san integer in [%ld, %ld]", auto_value ? "auto or " : "", lo, hi);
        return bad_value(name, value, valid);
    }
    *out = (long)v;
    return XO_OK;
}

static xo_status parse_long(const char *name, const char *value, long lo, long hi, long *out) {
    return parse_integer(name, value, lo, hi, NULL, out);
}

static xo_status parse_size(const char *name, const char *value, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(value, &end, 10);
    if (!*value || *end || errno || value[0] == '-') return bad_value(name, value, "an integer >= 0 (bytes)");
    *out = (size_t)v;
    return XO_OK;
}

static xo_status parse_bool(const char *name, const char *value, int *out) {
    if (!strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "True")) { *out = 1; return XO_OK; }
    if (!strcmp(value, "0") || !strcmp(value, "false") || !strcmp(value, "False")) { *out = 0; return XO_OK; }
    return bad_value(name, value, "0 or 1");
}

/* the index of value in the comma-separated choices (as the table lists them) */
static xo_status parse_choice(const char *name, const char *value, const char *choices, int *out) {
    const size_t n = strlen(value);
    int i = 0;
    for (const char *p = choices; *p; i++) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n && len == n && !strncmp(p, value, n)) { *out = i; return XO_OK; }
        if (!e) break;
        p = e + 1;
        while (*p == ' ') p++;
    }
    return bad_value(name, value, choices);
}

xo_status xo_options_set(xo_options *o, const char *name, const char *value) {
    long v = 0;
    int k = 0;
    if (!strcmp(name, "threads")) {
        XO_TRY(parse_long(name, value, 0, MAX_THREADS, &v));
        o->threads = (int)v;
    } else if (!strcmp(name, "cpu_isa")) {
        XO_TRY(parse_choice(name, value, "auto, generic, avx2, avx512, avx512vnni, amx", &k));
        o->cpu_isa = k - 1;  /* auto = XO_ISA_AUTO, then the sets in order */
    } else if (!strcmp(name, "cpu_gemv_max_rows")) {
        const long auto_rows = -1;
        XO_TRY(parse_integer(name, value, 0, MAX_GEMV_ROWS, &auto_rows, &v));
        o->cpu_gemv_max_rows = (int)v;
    } else if (!strcmp(name, "cpu_tile_rows")) {
        XO_TRY(parse_long(name, value, 1, MAX_TILE_ROWS, &v));
        o->cpu_tile_rows = (int)v;
    } else if (!strcmp(name, "prefill_chunk")) {
        const long auto_chunk = 0; /* the backend's */
        XO_TRY(parse_integer(name, value, 1, MAX_PREFILL_CHUNK, &auto_chunk, &v));
        o->prefill_chunk = (int)v;
    } else if (!strcmp(name, "cuda_moe")) {
        XO_TRY(parse_choice(name, value, "device, host", &o->cuda_moe_host));
    } else if (!strcmp(name, "cuda_attention")) {
        XO_TRY(parse_choice(name, value, "auto, rows, latent_decode, mma", &o->cuda_attention));
    } else if (!strcmp(name, "cuda_attention_keys")) {
        XO_TRY(parse_long(name, value, 0, MAX_ATTENTION_KEYS, &v));
        o->cuda_attention_keys = (int)v;
    } else if (!strcmp(name, "cuda_gemm")) {
        XO_TRY(parse_choice(name, value, "cublaslt, builtin", &o->cuda_gemm_builtin));
    } else if (!strcmp(name, "cublaslt_library")) {
        if (*value && !XO_CUDA_CUBLASLT)
            return xo_fail(XO_EUNSUPPORTED, "option cublaslt_library: this build of xoron has no cuBLASLt path "
                           "(built without CUDA, or setup.py found no cublasLt.h for the CUDA plugin); "
                           "xoron.build_info() shows what a build has");
        if (strlen(value) >= sizeof o->cublaslt_library)
            return xo_fail(XO_EINVAL, "option cublaslt_library: the path is longer than %zu bytes",
                           sizeof o->cublaslt_library - 1);
        snprintf(o->cublaslt_library, sizeof o->cublaslt_library, "%s", value);
    } else if (!strcmp(name, "cuda_pdl")) {
        XO_TRY(parse_bool(name, value, &o->cuda_pdl));
    } else if (!strcmp(name, "cuda_graphs")) {
        XO_TRY(parse_bool(name, value, &o->cuda_graphs));
    } else if (!strcmp(name, "cuda_memory_limit")) {
        XO_TRY(parse_size(name, value, &o->cuda_memory_limit));
    } else {
        char names[512] = "";
        size_t used = 0;
        for (int i = 0; i < xo_option_count && used < sizeof names; i++)
            used += (size_t)snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "", xo_option_table[i].name);
        return xo_fail(XO_EINVAL, "unknown option '%s' (valid options: %s)", name, names);
    }
    return XO_OK;
}

xo_status xo_options_init(xo_options *o) {
    memset(o, 0, sizeof *o);
    o->cpu_isa = XO_ISA_AUTO;
    o->cpu_gemv_max_rows = -1;
    o->cpu_tile_rows = 64;
    o->cuda_pdl = 1;
    o->cuda_graphs = 1;
    for (size_t i = 0; i < sizeof retired / sizeof *retired; i++)
        if (getenv(retired[i].env))
            return xo_fail(XO_EINVAL, "environment variable %s is retired; use %s", retired[i].env, retired[i].instead);
    for (int i = 0; i < xo_option_count; i++) {
        const char *v = getenv(xo_option_table[i].env);
        if (!v) continue;
        xo_status rc = xo_options_set(o, xo_option_table[i].name, v);
        if (rc != XO_OK) return xo_fail_more(rc, "environment variable %s", xo_option_table[i].env);
    }
    return XO_OK;
}
