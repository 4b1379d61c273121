/* cuBLASLt, with its types from the toolkit's cublasLt.h and the library loaded at run time
 * with dlopen (its import library is not needed to build; a missing library leaves the built-in
 * kernels of gemm.cu), with a cache of plans (descriptors and the heuristic's algorithm) per
 * shape. setup.py builds this file only where it finds the header. 16-bit weights: x converted to
 * the weight's type, fp32 accumulation and output; float32 weights: pure fp32 GEMM
 * (CUBLAS_COMPUTE_32F, no TF32). */
#include <cublasLt.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/cuda/common.h"

/* ------------------------------------------------------------------ the library, loaded at run time */

/* The header declares the functions; only their types are used here, and the addresses come
 * from dlsym, so the plugin has no link-time dependency on cuBLAS. */
struct LtApi {
    decltype(&cublasLtCreate) create;
    decltype(&cublasLtDestroy) destroy;
    decltype(&cublasLtMatmulDescCreate) desc_create;
    decltype(&cublasLtMatmulDescDestroy) desc_destroy;
    decltype(&cublasLtMatmulDescSetAttribute) desc_set;
    decltype(&cublasLtMatrixLayoutCreate) layout_create;
    decltype(&cublasLtMatrixLayoutDestroy) layout_destroy;
    decltype(&cublasLtMatrixLayoutSetAttribute) layout_set; /* optional: strided batches */
    decltype(&cublasLtMatmulPreferenceCreate) pref_create;
    decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy;
    decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
    decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
    decltype(&cublasLtMatmul) matmul;
};

static LtApi g_lt;
static int g_lt_ok = -1;
static pthread_mutex_t g_lt_mu = PTHREAD_MUTEX_INITIALIZER;

/* library: a path the caller named (only it is tried), or "" for the usual names */
static void *lt_open(const char *library) {
    if (*library) return dlopen(library, RTLD_NOW | RTLD_LOCAL);
    const char *names[] = { "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so" };
    for (const char *n : names) {
        void *h = dlopen(n, RTLD_NOW | RTLD_LOCAL);
        if (h) return h;
    }
    /* beside the CUDA runtime we were linked with */
    Dl_info info;
    if (dladdr((void *)&cudaGetDeviceCount, &info) && info.dli_fname) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", info.dli_fname);
        char *slash = strrchr(dir, '/');
        if (slash) {
            *slash = 0;
            for (const char *n : names) {
                char path[4200];
                snprintf(path, sizeof path, "%s/%s", dir, n);
                void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
                if (h) return h;
            }
        }
    }
    return NULL;
}

static int lt_load(const char *library) {
    pthread_mutex_lock(&g_lt_mu);
    if (g_lt_ok < 0) {
        g_lt_ok = 0;
        void *h = lt_open(library);
        if (h) {
#define SYM(field, name) g_lt.field = reinterpret_cast<decltype(g_lt.field)>(dlsym(h, name))
            SYM(create, "cublasLtCreate");
            SYM(destroy, "cublasLtDestroy");
            SYM(desc_create, "cublasLtMatmulDescCreate");
            SYM(desc_destroy, "cublasLtMatmulDescDestroy");
            SYM(desc_set, "cublasLtMatmulDescSetAttribute");
            SYM(layout_create, "cublasLtMatrixLayoutCreate");
            SYM(layout_destroy, "cublasLtMatrixLayoutDestroy");
            SYM(layout_set, "cublasLtMatrixLayoutSetAttribute");
            SYM(pref_create, "cublasLtMatmulPreferenceCreate");
            SYM(pref_destroy, "cublasLtMatmulPreferenceDestroy");
            SYM(pref_set, "cublasLtMatmulPreferenceSetAttribute");
            SYM(heuristic, "cublasLtMatmulAlgoGetHeuristic");
            SYM(matmul, "cublasLtMatmul");
#undef SYM
            g_lt_ok = g_lt.create && g_lt.destroy && g_lt.desc_create && g_lt.desc_destroy && g_lt.desc_set &&
                      g_lt.layout_create && g_lt.layout_destroy && g_lt.pref_create && g_lt.pref_destroy &&
                      g_lt.pref_set && g_lt.heuristic && g_lt.matmul;
        }
    }
    int ok = g_lt_ok;
    pthread_mutex_unlock(&g_lt_mu);
    return ok;
}

/* A cached plan per (m, n, k, type): descriptors and the heuristic's algorithm. */
struct LtPlan {
    int m, n, k, ldc, type, align, used;
    int batch;               /* > 1: strided batches of x (xstride elements apart) and y (m * ldc apart) */
    long long xstride;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, cd;
    cublasLtMatmulAlgo_t algo;
};

enum { LT_PLANS = 512 };

struct XoLt {
    cublasLtHandle_t handle;
    void *ws;
    size_t ws_bytes;
    LtPlan plans[LT_PLANS];
};

static cudaDataType_t cuda_type(xo_dtype t) { return t == XO_F32 ? CUDA_R_32F : t == XO_F16 ? CUDA_R_16F : CUDA_R_16BF; }

XoLt *cu_lt_create(CuCtx *c, const char *library) {
    if (!lt_load(library)) return NULL;
    XoLt *lt = (XoLt *)calloc(1, sizeof *lt);
    if (!lt) return NULL;
    if (g_lt.create(&lt->handle) != CUBLAS_STATUS_SUCCESS) {
        free(lt);
        return NULL;
    }
    lt->ws_bytes = (size_t)32 << 20;
    if (cudaMalloc(&lt->ws, lt->ws_bytes) != cudaSuccess) {
        cudaGetLastError();
        g_lt.destroy(lt->handle);
        free(lt);
        return NULL;
    }
    (void)c;
    return lt;
}

static void plan_release(LtPlan *p) {
    if (p->desc) g_lt.desc_destroy(p->desc);
    if (p->a) g_lt.layout_destroy(p->a);
    if (p->b) g_lt.layout_destroy(p->b);
    if (p->cd) g_lt.layout_destroy(p->cd);
    memset(p, 0, sizeof *p);
}

void cu_lt_destroy(XoLt *lt) {
    if (!lt) return;
    for (int i = 0; i < LT_PLANS; i++)
        if (lt->plans[i].used) plan_release(&lt->plans[i]);
    cudaFree(lt->ws);
    g_lt.destroy(lt->handle);
    free(lt);
}

static int plan_build(XoLt *lt, LtPlan *p, int m, int n, int k, int ldc, xo_dtype t, int align, int batch,
                      long long xstride) {
    memset(p, 0, sizeof *p);
    const cudaDataType_t ab = cuda_type(t);
    const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    const cublasStatus_t ok = CUBLAS_STATUS_SUCCESS;
    if (g_lt.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F /* alpha, beta */) != ok) goto fail;
    if (g_lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof opT) != ok) goto fail;
    if (g_lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof opN) != ok) goto fail;
    /* column-major view: D[n, m] = W[k, n]^T * X[k, m]   (row-major y[m, n] = x[m, k] W[n, k]^T) */
    if (g_lt.layout_create(&p->a, ab, (uint64_t)k, (uint64_t)n, k) != ok) goto fail;
    if (g_lt.layout_create(&p->b, ab, (uint64_t)k, (uint64_t)m, k) != ok) goto fail;
    if (g_lt.layout_create(&p->cd, CUDA_R_32F, (uint64_t)n, (uint64_t)m, ldc) != ok) goto fail;
    if (batch > 1) {
        const int32_t count = batch;
        const int64_t zero = 0, xs = xstride, ys = (int64_t)m * ldc;
        const cublasLtMatrixLayoutAttribute_t n_batches = CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                              stride = CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET;
        if (!g_lt.layout_set) goto fail;
        if (g_lt.layout_set(p->a, n_batches, &count, sizeof count) != ok ||
            g_lt.layout_set(p->a, stride, &zero, sizeof zero) != ok ||
            g_lt.layout_set(p->b, n_batches, &count, sizeof count) != ok ||
            g_lt.layout_set(p->b, stride, &xs, sizeof xs) != ok ||
            g_lt.layout_set(p->cd, n_batches, &count, sizeof count) != ok ||
            g_lt.layout_set(p->cd, stride, &ys, sizeof ys) != ok)
            goto fail;
    }
    {
        cublasLtMatmulPreference_t pref = NULL;
        if (g_lt.pref_create(&pref) != ok) goto fail;
        uint64_t ws = lt->ws_bytes;
        g_lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        uint32_t al = (uint32_t)align; /* the heuristic assumes 256-byte aligned pointers unless told */
        const cublasLtMatmulPreferenceAttributes_t aligns[] = {
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES };
        for (cublasLtMatmulPreferenceAttributes_t attr : aligns) g_lt.pref_set(pref, attr, &al, sizeof al);
        cublasLtMatmulHeuristicResult_t res[1];
        int got = 0;
        cublasStatus_t st = g_lt.heuristic(lt->handle, p->desc, p->a, p->b, p->cd, p->cd, pref, 1, res, &got);
        g_lt.pref_destroy(pref);
        if (st != ok || got < 1 || res[0].state != ok) goto fail;
        p->algo = res[0].algo;
    }
    p->m = m;
    p->n = n;
    p->k = k;
    p->ldc = ldc;
    p->type = (int)t;
    p->align = align;
    p->batch = batch;
    p->xstride = xstride;
    p->used = 1;
    return 1;
fail:
    plan_release(p);
    return 0;
}

/* y[m, n] (rows ldc apart) = x[m, k] @ W[n, k]^T through cuBLASLt; x has the weight's type.
 * Returns 0 when cuBLASLt cannot do it (the caller falls back). */
static int lt_gemm_ld(CuCtx *c, float *y, int ldc, const void *x, const void *w, xo_dtype t, int m, int n, int k,
                      xo_status *rc, int batch = 1, long long xstride = 0) {
    XoLt *lt = c->lt;
    if (!lt) return 0;
    uintptr_t bits = (uintptr_t)y | (uintptr_t)x | (uintptr_t)w | 256;
    const int align = (int)(bits & (~bits + 1)); /* lowest set bit: the common alignment, at most 256 */
    unsigned hsh = ((unsigned)m * 2654435761u) ^ ((unsigned)n * 40503u) ^ ((unsigned)k * 97u) ^ (unsigned)t ^ ((unsigned)align << 20) ^
                   ((unsigned)batch * 7919u) ^ (unsigned)(xstride * 31);
    LtPlan *p = NULL, tmp;
    for (int probe = 0; probe < 8; probe++) {
        LtPlan *q = &lt->plans[(hsh + probe) % LT_PLANS];
        if (q->used && q->m == m && q->n == n && q->k == k && q->ldc == ldc && q->type == (int)t && q->align == align &&
            q->batch == batch && q->xstride == xstride) {
            p = q;
            break;
        }
        if (!q->used) {
            if (!plan_build(lt, q, m, n, k, ldc, t, align, batch, xstride)) return 0;
            p = q;
            break;
        }
    }
    int temp = 0;
    if (!p) {
        if (!plan_build(lt, &tmp, m, n, k, ldc, t, align, batch, xstride)) return 0;
        p = &tmp;
        temp = 1;
    }
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = g_lt.matmul(lt->handle, p->desc, &one, w, p->a, x, p->b, &zero, y, p->cd, y, p->cd, &p->algo,
                                    lt->ws, lt->ws_bytes, c->stream);
    if (temp) plan_release(p);
    if (st != CUBLAS_STATUS_SUCCESS) {
        *rc = cu_fail(c, XO_EDEVICE, "cublasLtMatmul failed (status %d) for [%d, %d] x [%d, %d]^T", (int)st, m, k, n, k);
        return 1;
    }
    *rc = cu_check_launch(c, "cublasLtMatmul");
    return 1;
}

/* Rows of n floats with n not a multiple of 8 (the vocabulary: 151643) push cuBLASLt onto
 * slow unaligned kernels: compute all cu_padded_rows(n) outputs (the weight's storage has
 * them, zero) into padded rows, then copy. */
int cu_lt_gemm(CuCtx *c, float *y, const void *x, const void *w, xo_dtype t, int m, int n, int k, xo_status *rc) {
    if (!c->lt) return 0;
    if (n % 8 == 0 || m < 2) return lt_gemm_ld(c, y, n, x, w, t, m, n, k, rc);
    const int ldc = cu_padded_rows(n);
    float *tmp = (float *)cu_alloc_raw(c, (size_t)m * ldc * sizeof(float));
    if (!tmp) return lt_gemm_ld(c, y, n, x, w, t, m, n, k, rc);
    int done = lt_gemm_ld(c, tmp, ldc, x, w, t, m, ldc, k, rc);
    if (done && *rc == XO_OK)
        *rc = cu_check(c, cudaMemcpy2DAsync(y, (size_t)n * sizeof(float), tmp, (size_t)ldc * sizeof(float),
                                            (size_t)n * sizeof(float), (size_t)m, cudaMemcpyDeviceToDevice, c->stream),
                       "gemm (unpad)");
    cu_free(c, tmp);
    return done;
}

int cu_lt_gemm_batched(CuCtx *c, float *y, const void *x, long long x_stride, const void *w, xo_dtype t, int m, int n,
                       int k, int batch, xo_status *rc) {
    return lt_gemm_ld(c, y, n, x, w, t, m, n, k, rc, batch, x_stride);
}
