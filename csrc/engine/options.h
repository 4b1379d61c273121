/* Every kernel and runtime choice of one model, in one struct, parsed in one place
 * (engine/options.c) from (name, value) strings. Environment variables are the fallback: a
 * variable sets the default an explicit option overrides. The table of names, values and
 * variables is xo_option_table (README "Options" lists the same). */
#ifndef XO_OPTIONS_H
#define XO_OPTIONS_H

#include <stddef.h>

#include "engine/status.h"

/* setup.py sets it for every file of a build: 1 when the build's CUDA plugin has its cuBLASLt
 * path (setup.py found cublasLt.h). */
#ifndef XO_CUDA_CUBLASLT
#define XO_CUDA_CUBLASLT 0
#endif

/* CPU kernel instruction sets, lowest first */
enum { XO_ISA_AUTO = -1, XO_ISA_GENERIC = 0, XO_ISA_AVX2 = 1, XO_ISA_AVX512 = 2, XO_ISA_AVX512VNNI = 3, XO_ISA_AMX = 4 };

typedef struct {
    int threads;                 /* CPU threads of this model's kernels; 0: the process default (backends/cpu/threads.c) */
    int cpu_isa;                 /* the highest CPU kernel set used (XO_ISA_*); AUTO: the best the CPU has */
    int cpu_gemv_max_rows;       /* largest m that takes the matrix-vector kernels; -1: XO_CPU_GEMV_MAX_ROWS */
    int cpu_tile_rows;           /* rows of a 16-bit or int8 W widened per tile for the CPU sgemm */
    int prefill_chunk;           /* tokens per pass through the layers (rows of every scratch buffer);
                                  * 0 (auto): the backend's (xo_backend.prefill_chunk) */
    int cuda_moe_host;           /* 1: per-expert GEMMs sized from counts read back to the host */
    int cuda_attention;          /* 0 auto; 1 rows: the row-wise attention kernel only, never a tensor-core one;
                                  * 2 latent_decode: decode steps over a 16-bit latent cache take the in-kernel
                                  * expansion at every length (auto: where it wins); 3 mma: prefill on the
                                  * mma.sync kernel where the wgmma one would be taken */
    int cuda_attention_keys;     /* keys per wgmma prefill attention launch (0: what 512 MiB of float16 K/V holds) */
    int cuda_gemm_builtin;       /* 1: the built-in GEMM kernels even where cuBLASLt is found */
    int cuda_pdl;                /* programmatic dependent launch on compute capability 9.0+ */
    int cuda_graphs;             /* decode steps recorded and replayed as CUDA graphs */
    size_t cuda_memory_limit;    /* bytes the device pool may hand out (0: no cap) */
    char cublaslt_library[1024]; /* the cuBLASLt library to load ("" searches the usual names) */
} xo_options;

/* One row of the table: the option's name, its environment variable, its values, its meaning. */
typedef struct {
    const char *name, *env, *values, *doc;
} xo_option_info;

extern const xo_option_info xo_option_table[];
extern const int xo_option_count;

/* The defaults, then every option's environment variable that is set (strictly: a bad value
 * is XO_EINVAL naming the variable; a retired variable is XO_EINVAL naming its successor). */
xo_status xo_options_init(xo_options *o);
/* Sets one option; an unknown name or value is XO_EINVAL whose message lists the valid ones. */
xo_status xo_options_set(xo_options *o, const char *name, const char *value);

#endif
