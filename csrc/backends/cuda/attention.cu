/* Causal attention over the cache on the GPU, flash style: key tiles, online softmax, no
 * t x t buffer. With the latent cache, K and V are first expanded from c for the keys in
 * range (c @ Wkvb.T, K rotated with the key positions), one GEMM per block of keys: a prefill
 * pass over a long context runs in blocks of key_block keys, each kernel leaving its softmax
 * partials, which are folded into a running state, so the scratch is sized by the block and not
 * by the context (a decode step takes its keys at once).
 *
 * The kernels:
 * - k_attn_rows: one block per (head, query row, key split); warps stride over keys with a
 *   running (max, sum, acc) each, merged in shared memory; several splits are merged by a
 *   second kernel (split-K decode). Any head_dim up to 1024, float32 arithmetic on K/V read
 *   as float32 or as a 16-bit K/V cache: this is the decode path and the path of float32 models.
 *   k_attn_kv16 does its work for a 16-bit K/V cache at head_dim 64 (decode over the kv cache),
 *   a key per quarter warp so that more of the cache is in flight.
 * - k_attn_mma: 128 queries (8 warps of 16) x 64 keys per step on the tensor cores
 *   (mma.sync), for prefill of 16-bit models (head_dim 16/32/64/128): Q, K, V and P in
 *   float16, scores, softmax statistics and the output accumulated in float32. On compute
 *   capability 9.0 at head_dim 64 attention_hopper.cu takes its place (wgmma, hopper_prefill
 *   below): the same float16 rounding of Q, K, V and P, the keys packed into its tile layout.
 * Semantics as csrc/backends/cpu/attention.c: key j is visible to the query at sequence index qi
 * iff j <= qi and key_mask[j]; GQA head h reads kv head h / (nh / nkv); the output is
 * acc / (sum + denom_eps), or 0 when no key is visible. */
#include <math.h>

#include "backends/cuda/common.h"

struct AttnP {
    int t, past, nh, hd, cap, group;
    const float *q;
    float *out;
    const void *K, *V; /* float, or the 16-bit type of a K/V cache (the kernels' KT) */
    size_t kvs; /* elements between consecutive key rows; the row of key (b, j) is b * kcap + j - kbeg */
    int kcap;   /* key rows per batch row in K/V (the mask and the positions use cap) */
    int kbeg, kstop; /* the keys [kbeg, kstop) of this launch (a block of a long context) */
    const uint8_t *mask;
    float scale, eps;
    /* the row-wise kernel only: */
    const int32_t *past_dev; /* or NULL: the true past, read when the kernel runs (past is then a bound) */
    const int32_t *kpos;     /* or NULL: K arrives unrotated, key (b, j) at position kpos[b * cap + j] */
    const float *inv_freq;
    float mscale;
};

/* ------------------------------------------------------------------ row-wise / split-K */

/* The keys [j0, j1) that split `split` (split_len keys each) of the row-wise grid sees for query
 * row `row`: causal (the true past read from the device when p.past_dev is set), within the
 * launch's block [p.kbeg, p.kstop). */
__device__ __forceinline__ void rows_keys(const AttnP &p, int row, int split, int split_len, int &j0, int &j1) {
    const int past = p.past_dev ? *p.past_dev : p.past;
    const int qi = past + row % p.t, kv_len = past + p.t;
    const int kend = min(min(qi + 1, kv_len), p.kstop);
    j0 = p.kbeg + split * split_len;
    j1 = min(j0 + split_len, kend);
}

/* The end of a row-wise block: the 4 warps' (max, sum, acc) in shared memory merged, then the
 * output acc / (sum + eps) written, or the split's partial (max, sum, acc) */
template <int WIDTH>
__device__ __forceinline__ void rows_finish(const AttnP &p, int row, int h, int split, int nsplit, float *part,
                                            const float *sm, const float *sl, const float (*sacc)[WIDTH]) {
    const int hd = p.hd;
    float M = fmaxf(fmaxf(sm[0], sm[1]), fmaxf(sm[2], sm[3]));
    float f[4], L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        f[w] = sm[w] == -INFINITY ? 0.0f : expf(sm[w] - M);
        L += sl[w] * f[w];
    }
    if (!part) {
        const float inv = L > 0.0f ? 1.0f / (L + p.eps) : 0.0f;
        float *o = p.out + (size_t)row * p.nh * hd + (size_t)h * hd;
        for (int d = threadIdx.x; d < hd; d += 128) {
            float A = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; w++) A += sacc[w][d] * f[w];
            o[d] = A * inv;
        }
    } else {
        float *pp = part + (((size_t)row * p.nh + h) * nsplit + split) * (hd + 2);
        if (threadIdx.x == 0) {
            pp[0] = M;
            pp[1] = L;
        }
        for (int d = threadIdx.x; d < hd; d += 128) {
            float A = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; w++) A += sacc[w][d] * f[w];
            pp[2 + d] = A;
        }
    }
}

/* Each warp takes KU keys at a time (their loads in flight together), so a block's latency
 * chain is keys / (4 * KU) steps long. With p.kpos set, K arrives unrotated (expanded from
 * the latent) and is rotated here: lane element c pairs with c + NC/2 (needs hd == 32 * NC). */
enum { KU = 4 };

template <int NC, typename KT>
__global__ __launch_bounds__(128) void k_attn_rows(AttnP p, int split_len, float *part) {
    CU_PDL_ENTRY();
    const int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int bb = row / p.t;
    int j0, j1;
    rows_keys(p, row, split, split_len, j0, j1);
    const int g = h / p.group, hd = p.hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *qp = p.q + (size_t)row * p.nh * hd + (size_t)h * hd;
    float qv[NC], acc[NC], fr[NC / 2 > 0 ? NC / 2 : 1];
#pragma unroll
    for (int c = 0; c < NC; c++) {
        int d = lane + 32 * c;
        qv[c] = d < hd ? qp[d] : 0.0f;
        acc[c] = 0.0f;
    }
    if (NC % 2 == 0 && p.kpos) {
#pragma unroll
        for (int c = 0; c < NC / 2; c++) fr[c] = p.inv_freq[lane + 32 * c];
    }
    float m = -INFINITY, l = 0.0f;
    const uint8_t *mk = p.mask + (size_t)bb * p.cap;
    for (int jb = j0 + warp * KU; jb < j1; jb += 4 * KU) {
        float s[KU], kv[KU][NC];
        bool ok[KU];
#pragma unroll
        for (int u = 0; u < KU; u++) {
            const int j = jb + u;
            ok[u] = j < j1 && mk[j];
            const KT *kp = (const KT *)p.K + ((size_t)bb * p.kcap + (ok[u] ? j : j0) - p.kbeg) * p.kvs + (size_t)g * hd;
#pragma unroll
            for (int c = 0; c < NC; c++) {
                int d = lane + 32 * c;
                kv[u][c] = d < hd ? cu_ld(kp, d) : 0.0f;
            }
        }
        if (NC % 2 == 0 && p.kpos) {
#pragma unroll
            for (int u = 0; u < KU; u++) {
                const float pos = (float)p.kpos[(size_t)bb * p.cap + (ok[u] ? jb + u : j0)];
#pragma unroll
                for (int c = 0; c < NC / 2; c++) {
                    const float th = pos * fr[c];
                    const float cs = cosf(th) * p.mscale, sn = sinf(th) * p.mscale;
                    const float a = kv[u][c], b = kv[u][c + NC / 2];
                    kv[u][c] = a * cs - b * sn;
                    kv[u][c + NC / 2] = b * cs + a * sn;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < KU; u++) {
            s[u] = 0.0f;
#pragma unroll
            for (int c = 0; c < NC; c++) s[u] = fmaf(qv[c], kv[u][c], s[u]);
        }
#pragma unroll
        for (int o = 16; o; o >>= 1)
#pragma unroll
            for (int u = 0; u < KU; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float mn = m;
#pragma unroll
        for (int u = 0; u < KU; u++) {
            s[u] *= p.scale;
            if (ok[u]) mn = fmaxf(mn, s[u]);
        }
        if (mn == -INFINITY) continue; /* no visible key in this group (nor before) */
        const float corr = expf(m - mn); /* 0 when m is -inf */
        l *= corr;
#pragma unroll
        for (int c = 0; c < NC; c++) acc[c] *= corr;
        m = mn;
#pragma unroll
        for (int u = 0; u < KU; u++) {
            if (!ok[u]) continue;
            const float e = expf(s[u] - m);
            l += e;
            const KT *vp = (const KT *)p.V + ((size_t)bb * p.kcap + jb + u - p.kbeg) * p.kvs + (size_t)g * hd;
#pragma unroll
            for (int c = 0; c < NC; c++) {
                int d = lane + 32 * c;
                if (d < hd) acc[c] = fmaf(e, cu_ld(vp, d), acc[c]);
            }
        }
    }
    __shared__ float sm[4], sl[4];
    __shared__ float sacc[4][32 * NC];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < NC; c++) sacc[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    rows_finish<32 * NC>(p, row, h, split, nsplit, part, sm, sl, sacc);
}


/* The row-wise kernel's work (same grid, splits and output) for a 16-bit K/V cache at head_dim
 * 64 (decode steps over the kv cache), with more bytes in flight: the 8 lanes of a quarter warp
 * share one key, 8 dims (16 bytes) each, so a warp loads 16 keys' K and V rows at once before any
 * of its scores is needed, and a score is a reduction over 8 lanes. Each quarter keeps its own
 * running (max, sum, acc) over its keys; the quarters, then the warps, are merged at the end. */
enum { KV16_HD = 64, KV16_U = 4 };

template <typename KT>
__global__ __launch_bounds__(128) void k_attn_kv16(AttnP p, int split_len, float *part) {
    CU_PDL_ENTRY();
    const int row = blockIdx.x, h = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int bb = row / p.t;
    int j0, j1;
    rows_keys(p, row, split, split_len, j0, j1);
    const int g = h / p.group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quarter = lane >> 3, dims = (lane & 7) * 8;
    float qv[8], acc[8];
    load8(p.q + (size_t)row * p.nh * KV16_HD + (size_t)h * KV16_HD + dims, qv);
#pragma unroll
    for (int d = 0; d < 8; d++) acc[d] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const uint8_t *mk = p.mask + (size_t)bb * p.cap;
    const KT *K = (const KT *)p.K + (size_t)g * KV16_HD + dims, *V = (const KT *)p.V + (size_t)g * KV16_HD + dims;
    for (int jb = j0 + warp * 4 * KV16_U; jb < j1; jb += 16 * KV16_U) {
        float kv[KV16_U][8], vv[KV16_U][8], s[KV16_U];
        bool ok[KV16_U];
#pragma unroll
        for (int u = 0; u < KV16_U; u++) {
            const int j = jb + 4 * u + quarter;
            ok[u] = j < j1 && mk[j];
            const size_t at = ((size_t)bb * p.kcap + (ok[u] ? j : j0) - p.kbeg) * p.kvs;
            load8(K + at, kv[u]);
            load8(V + at, vv[u]);
        }
#pragma unroll
        for (int u = 0; u < KV16_U; u++) {
            s[u] = 0.0f;
#pragma unroll
            for (int d = 0; d < 8; d++) s[u] = fmaf(qv[d], kv[u][d], s[u]);
        }
#pragma unroll
        for (int o = 1; o < 8; o <<= 1)
#pragma unroll
            for (int u = 0; u < KV16_U; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float mn = m;
#pragma unroll
        for (int u = 0; u < KV16_U; u++) {
            s[u] *= p.scale;
            if (ok[u]) mn = fmaxf(mn, s[u]);
        }
        if (mn == -INFINITY) continue; /* no visible key of this quarter yet */
        const float corr = expf(m - mn); /* 0 when m is -inf */
        l *= corr;
#pragma unroll
        for (int d = 0; d < 8; d++) acc[d] *= corr;
        m = mn;
#pragma unroll
        for (int u = 0; u < KV16_U; u++) {
            if (!ok[u]) continue;
            const float e = expf(s[u] - m);
            l += e;
#pragma unroll
            for (int d = 0; d < 8; d++) acc[d] = fmaf(e, vv[u][d], acc[d]);
        }
    }
    /* the warp's four quarters (lanes 8 apart hold the same dims) into one state */
#pragma unroll
    for (int o = 8; o < 32; o <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
        const float M = fmaxf(m, mo);
        const float f = m == -INFINITY ? 0.0f : expf(m - M), fo = mo == -INFINITY ? 0.0f : expf(mo - M);
        l = l * f + lo * fo;
#pragma unroll
        for (int d = 0; d < 8; d++) acc[d] = acc[d] * f + __shfl_xor_sync(0xffffffffu, acc[d], o) * fo;
        m = M;
    }
    __shared__ float sm[4], sl[4];
    __shared__ float sacc[4][KV16_HD];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    if (lane < 8) {
#pragma unroll
        for (int d = 0; d < 8; d++) sacc[warp][dims + d] = acc[d];
    }
    __syncthreads();
    rows_finish<KV16_HD>(p, row, h, split, nsplit, part, sm, sl, sacc);
}

/* Folds the nsplit partials (max, sum, acc) of each (query row, head) into the running state of
 * earlier key blocks (none when first); the last block writes acc / (sum + eps) to out (p.out, or its
 * 16-bit stand-in for attention_o_proj). */
template <typename O>
__global__ void k_attn_fold(AttnP p, O *out, int nsplit, const float *__restrict__ part, float *state, int first,
                            int last) {
    CU_PDL_ENTRY();
    const int row = blockIdx.x, h = blockIdx.y, hd = p.hd;
    const float *base = part + ((size_t)row * p.nh + h) * nsplit * (hd + 2);
    float *st = state ? state + ((size_t)row * p.nh + h) * (hd + 2) : NULL;
    const float m_run = first ? -INFINITY : st[0];
    float M = m_run;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, base[(size_t)s * (hd + 2)]);
    float L = m_run == -INFINITY ? 0.0f : st[1] * expf(m_run - M);
    for (int s = 0; s < nsplit; s++) {
        float ms = base[(size_t)s * (hd + 2)];
        if (ms != -INFINITY) L += base[(size_t)s * (hd + 2) + 1] * expf(ms - M);
    }
    const float inv = L > 0.0f ? 1.0f / (L + p.eps) : 0.0f;
    O *o = out + (size_t)row * p.nh * hd + (size_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float A = m_run == -INFINITY ? 0.0f : st[2 + d] * expf(m_run - M);
        for (int s = 0; s < nsplit; s++) {
            float ms = base[(size_t)s * (hd + 2)];
            if (ms != -INFINITY) A += base[(size_t)s * (hd + 2) + 2 + d] * expf(ms - M);
        }
        if (last) cu_st(o, d, A * inv);
        else st[2 + d] = A;
    }
    if (last) return;
    __syncthreads(); /* every thread has read the old max and sum */
    if (threadIdx.x == 0) {
        st[0] = M;
        st[1] = L;
    }
}

template <int NC, typename KT>
static void launch_rows(CuCtx *c, const AttnP &p, int rows, int nsplit, int split_len, float *part) {
    dim3 grid((unsigned)rows, (unsigned)p.nh, (unsigned)nsplit);
    cu_launch(c, k_attn_rows<NC, KT>, grid, 128, 0, p, split_len, part);
}

template <typename KT>
static void launch_rows_hd(CuCtx *c, const AttnP &p, int rows, int nsplit, int split_len, float *part) {
    if (p.hd <= 32) launch_rows<1, KT>(c, p, rows, nsplit, split_len, part);
    else if (p.hd <= 64) launch_rows<2, KT>(c, p, rows, nsplit, split_len, part);
    else if (p.hd <= 128) launch_rows<4, KT>(c, p, rows, nsplit, split_len, part);
    else if (p.hd <= 256) launch_rows<8, KT>(c, p, rows, nsplit, split_len, part);
    else if (p.hd <= 512) launch_rows<16, KT>(c, p, rows, nsplit, split_len, part);
    else launch_rows<32, KT>(c, p, rows, nsplit, split_len, part);
}

/* ------------------------------------------------------------------ mma.sync tiles (f16) */

/* Register-level flash attention (the FlashAttention-2 layout): each warp owns 16 query rows;
 * S = Q K^T, the online softmax and O += P V stay in registers (mma.sync m16n8k16, f16
 * operands, f32 accumulation); K and V tiles of 64 keys go through shared memory (V
 * transposed). K16/V16 are float16 copies of the rotated keys and the values. f16 keeps 3 more
 * mantissa bits than bf16 in Q, K, V and P. */

__device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
}

struct AttnP16 {
    AttnP p;
    const __half *K16, *V16; /* row of key (b, j): b * p.kcap + j - p.kbeg, p.kvs halfs apart */
    float *part;             /* or NULL: the (max, sum, acc) of each row and head instead of the output */
    void *out16;             /* or NULL: the output stored as out16_t (BF16 or F16) here instead of p.out */
    xo_dtype out16_t;
};

/* NW warps: NW * 16 queries per block share each K/V tile */
template <int HD, int NW>
/* head_dim <= 64: at most 128 registers, two 8-warp blocks per SM (a few more halve the occupancy) */
__global__ __launch_bounds__(NW * 32, HD <= 64 ? 512 / (NW * 32) : 1) void k_attn_mma(AttnP16 a) {
    const AttnP &p = a.p;
    constexpr int LK = HD + 8, LV = 64 + 8;
    __shared__ __align__(16) __half Ks[64 * LK];
    __shared__ __align__(16) __half Vt[HD * LV];
    __shared__ int kval[64];

    /* the longest tiles (last queries: most keys) first: grid (heads, batch, query tiles) */
    const int q0 = (gridDim.z - 1 - blockIdx.z) * (NW * 16), h = blockIdx.x, bb = blockIdx.y;
    const int g = h / p.group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2, gc = (lane & 3) * 2; /* fragment row and column pair */
    const int kv_len = p.past + p.t;
    const size_t qrow = (size_t)p.nh * HD;
    const int r0 = q0 + warp * 16; /* first query (index into the new tokens) of this warp */

    /* Q fragments, kept for the whole kernel */
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = r0 + gr + ((e & 1) ? 8 : 0), col = ks * 16 + gc + ((e & 2) ? 8 : 0);
            float x0 = 0.0f, x1 = 0.0f;
            if (row < p.t) {
                const float *src = p.q + ((size_t)bb * p.t + row) * qrow + (size_t)h * HD + col;
                x0 = src[0];
                x1 = src[1];
            }
            qa[ks][e] = pack_h2(x0, x1);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int qi0 = p.past + r0 + gr, qi1 = qi0 + 8;          /* sequence indices of my two rows */
    const bool ok0 = r0 + gr < p.t, ok1 = r0 + gr + 8 < p.t;

    const int qlast = min(q0 + NW * 16, p.t) - 1;
    const int kend = min(min(kv_len, p.past + qlast + 1), p.kstop), kv_end = min(kv_len, p.kstop);
    for (int k0 = p.kbeg; k0 < kend; k0 += 64) {
        __syncthreads();
        for (int e = tid; e < 64 * (HD / 8); e += NW * 32) { /* K: a row's 16-byte pieces on neighbouring lanes */
            const int r = e / (HD / 8), c8 = (e % (HD / 8)) * 8, j = k0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0);
            if (j < kv_end) kv = *(const uint4 *)(a.K16 + ((size_t)bb * p.kcap + j - p.kbeg) * p.kvs + (size_t)g * HD + c8);
            *(uint4 *)(Ks + r * LK + c8) = kv;
        }
        for (int e = tid; e < 64 * (HD / 8); e += NW * 32) { /* V, transposed: neighbouring lanes on neighbouring keys */
            const int r = e % 64, c8 = (e / 64) * 8, j = k0 + r;
            uint4 vv = make_uint4(0, 0, 0, 0);
            if (j < kv_end) vv = *(const uint4 *)(a.V16 + ((size_t)bb * p.kcap + j - p.kbeg) * p.kvs + (size_t)g * HD + c8);
            const __half *vh = (const __half *)&vv;
#pragma unroll
            for (int x = 0; x < 8; x++) Vt[(c8 + x) * LV + r] = vh[x];
        }
        if (tid < 64) {
            const int j = k0 + tid;
            kval[tid] = j < kv_end && p.mask[(size_t)bb * p.cap + j];
        }
        __syncthreads();

        float sc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) {
                const __half *kp = Ks + (nt * 8 + gr) * LK + ks * 16 + gc;
                mma16816(sc[nt], qa[ks], *(const uint32_t *)kp, *(const uint32_t *)(kp + 8));
            }
        }
        /* mask, scale, row maxima (rows gr and gr + 8, shared by the 4 lanes of a quad) */
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = nt * 8 + gc + (e & 1), j = k0 + col;
                const bool ok = (e < 2 ? (ok0 && j <= qi0) : (ok1 && j <= qi1)) && kval[col];
                const float v = ok ? sc[nt][e] * p.scale : -INFINITY;
                sc[nt][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mnew = fmaxf(m[r], mx[r]);
            corr[r] = mnew == -INFINITY ? 1.0f : (m[r] == -INFINITY ? 0.0f : expf(m[r] - mnew));
            m[r] = mnew;
        }
        float rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float v = sc[nt][e];
                const float pe = v == -INFINITY ? 0.0f : expf(v - m[e >> 1]);
                sc[nt][e] = pe;
                rs[e >> 1] += pe;
            }
        }
        l[0] = l[0] * corr[0] + rs[0];
        l[1] = l[1] * corr[1] + rs[1];
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }
        /* O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of step kk */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[4];
            pa[0] = pack_h2(sc[2 * kk][0], sc[2 * kk][1]);
            pa[1] = pack_h2(sc[2 * kk][2], sc[2 * kk][3]);
            pa[2] = pack_h2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            pa[3] = pack_h2(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
            for (int dt = 0; dt < HD / 8; dt++) {
                const __half *vp = Vt + (dt * 8 + gr) * LV + kk * 16 + gc;
                mma16816(o[dt], pa, *(const uint32_t *)vp, *(const uint32_t *)(vp + 8));
            }
        }
    }
    /* the row sums are split over the quad */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if (a.part) { /* a block of a long context: the partials, in k_attn_fold's layout */
        const size_t ps = (size_t)HD + 2;
        float *pp0 = a.part + (((size_t)bb * p.t + r0 + gr) * p.nh + h) * ps, *pp1 = pp0 + 8 * p.nh * ps;
        if (ok0 && (lane & 3) == 0) {
            pp0[0] = m[0];
            pp0[1] = l[0];
        }
        if (ok1 && (lane & 3) == 0) {
            pp1[0] = m[1];
            pp1[1] = l[1];
        }
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            if (ok0) *(float2 *)(pp0 + 2 + dt * 8 + gc) = make_float2(o[dt][0], o[dt][1]);
            if (ok1) *(float2 *)(pp1 + 2 + dt * 8 + gc) = make_float2(o[dt][2], o[dt][3]);
        }
        return;
    }
    const float inv0 = l[0] > 0.0f ? 1.0f / (l[0] + p.eps) : 0.0f;
    const float inv1 = l[1] > 0.0f ? 1.0f / (l[1] + p.eps) : 0.0f;
    const size_t at0 = ((size_t)bb * p.t + r0 + gr) * qrow + (size_t)h * HD + gc, at1 = at0 + 8 * qrow;
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) {
        if (ok0) cu_st_pair(p.out, a.out16, a.out16_t, at0 + dt * 8, o[dt][0] * inv0, o[dt][1] * inv0);
        if (ok1) cu_st_pair(p.out, a.out16, a.out16_t, at1 + dt * 8, o[dt][2] * inv1, o[dt][3] * inv1);
    }
}

template <int HD>
static xo_status launch_mma(CuCtx *c, const AttnP16 &a, int batch) {
    dim3 grid((unsigned)a.p.nh, (unsigned)batch, (unsigned)((a.p.t + 127) / 128));
    k_attn_mma<HD, 8><<<grid, 256, 0, c->stream>>>(a);
    return cu_check_launch(c, "attention (mma)");
}

static xo_status launch_mma_hd(CuCtx *c, const AttnP16 &a, int batch) {
    switch (a.p.hd) {
    case 16: return launch_mma<16>(c, a, batch);
    case 32: return launch_mma<32>(c, a, batch);
    case 64: return launch_mma<64>(c, a, batch);
    default: return launch_mma<128>(c, a, batch);
    }
}

/* kv16[i, 0:W] = K[row i], kv16[i, W:2W] = V[row i] in float16, for the compact rows
 * i = b * kv_len + j of arrays whose rows are b * cap + j */
template <typename KT>
__global__ void k_kv_pack16(__half *kv16, const KT *__restrict__ K, const KT *__restrict__ V, size_t kstride,
                            int kv_len, int cap, int W, size_t rows) {
    const size_t total = rows * 2 * W;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        const size_t i = t / (2 * W);
        const int c = (int)(t - i * 2 * W);
        const size_t src = ((i / kv_len) * cap + i % kv_len) * kstride;
        kv16[t] = __float2half_rn(c < W ? cu_ld(K, src + c) : cu_ld(V, src + c - W));
    }
}

/* ------------------------------------------------------------------ entry */

/* The latent expansion of the keys [j0, j0 + len) of every row into kvbuf (compact rows
 * b * len + j - j0, [K | V], K rotated unless fuse_rope), through lat when rows are gathered. */
static xo_status expand_latent_block(xo_backend *be, CuCtx *c, const xo_attention_args *a, int j0, int len, float *kvbuf,
                                     float *lat, bool fuse_rope) {
    const int B = a->batch, W = a->num_kv_heads * a->head_dim;
    const xo_dtype wt = a->kv_b ? a->kv_b->dtype : XO_F32;
    const size_t krows = (size_t)B * len, es = a->latent_dtype == XO_F32 ? sizeof(float) : 2;
    const char *first = (const char *)a->latent + (size_t)j0 * a->rank * es; /* slot j0 of row 0 */
    /* a 16-bit latent of the weights' type feeds the expansion GEMM as it is (rows gathered) */
    const bool direct16 = a->latent_dtype == wt && wt != XO_F32 && krows > 8;
    xo_status rc = XO_OK;
    const float *src = (const float *)first;
    if (direct16) {
        const void *x16 = first;
        int batched = 0;
        if (B > 1) /* each row's slots straight from the cache, one strided-batch product */
            batched = cu_matmul16_batched(c, kvbuf, first, (long long)a->capacity * a->rank, a->kv_b, len, B, &rc);
        if (B > 1 && !batched) {
            const size_t rb = (size_t)a->rank * 2;
            rc = cu_check(c, cudaMemcpy2DAsync(lat, len * rb, first, (size_t)a->capacity * rb, len * rb, (size_t)B,
                                               cudaMemcpyDeviceToDevice, c->stream), "attention (gather latents)");
            x16 = lat;
        }
        if (rc == XO_OK && !batched) rc = cu_matmul16(c, kvbuf, x16, a->kv_b, (int)krows);
    } else if (a->latent_dtype != XO_F32) { /* widen a 16-bit latent while gathering */
        rc = cu_gather_rows(c, lat, first, a->latent_dtype, B, a->capacity, len, a->rank);
        src = lat;
    } else if (B > 1) {
        const size_t rb = (size_t)a->rank * sizeof(float);
        rc = cu_check(c, cudaMemcpy2DAsync(lat, len * rb, first, (size_t)a->capacity * rb, len * rb, (size_t)B,
                                           cudaMemcpyDeviceToDevice, c->stream), "attention (gather latents)");
        src = lat;
    }
    if (rc == XO_OK && !direct16) rc = cu_matmul(be, kvbuf, src, a->kv_b, (int)krows);
    if (rc == XO_OK && !fuse_rope)
        rc = cu_rope_rows(c, kvbuf, (size_t)2 * W, a->key_pos + j0, (int)krows, a->num_kv_heads, a->head_dim, a->inv_freq,
                          a->mscale, len, a->capacity);
    return rc;
}

/* whether expand_latent_block gathers rows through lat for `krows` key rows */
static bool latent_gathers(const xo_attention_args *a, size_t krows) {
    const xo_dtype wt = a->kv_b ? a->kv_b->dtype : XO_F32;
    const bool direct16 = a->latent_dtype == wt && wt != XO_F32 && krows > 8;
    return a->batch > 1 || (a->latent_dtype != XO_F32 && !direct16);
}

/* A prefill pass on attention_hopper.cu: the keys in blocks of as many as the float16 tiles'
 * scratch holds (option cuda_attention_keys; by default CU_HOPPER_SCRATCH bytes, every key of one
 * 128K-token sequence), one launch per block, the running state kept by the kernel across
 * blocks. A latent cache is expanded key_block keys at a time into float32 scratch and packed
 * (rotated) into the block's tiles; a K/V cache is packed from the cache. */
enum : size_t { CU_HOPPER_SCRATCH = (size_t)512 << 20 };

static xo_status hopper_prefill(xo_backend *be, CuCtx *c, const xo_attention_args *a, void *out16, xo_dtype out16_t) {
    const int t = a->new_tokens, nh = a->num_heads, nkv = a->num_kv_heads, hd = a->head_dim, B = a->batch;
    const int kv_len = a->past + t, W = nkv * hd, TK = CU_HOPPER_TILE_KEYS;
    const bool latent = a->format == XO_CACHE_LATENT;
    const size_t key_bytes = (size_t)B * 2 * W * sizeof(__half); /* one key of every row, K and V */
    long kb = c->attn_keys > 0 ? c->attn_keys : (long)(CU_HOPPER_SCRATCH / key_bytes);
    kb = kb / TK * TK;
    if (kb < TK) kb = TK;
    const long all = ((long)kv_len + TK - 1) / TK * TK;
    if (kb > all) kb = all;
    const int nblocks = (int)((kv_len + kb - 1) / kb), ntiles = (int)(kb / TK);
    /* the expansion of a latent cache: key_block keys (a multiple of the tile) at a time */
    int sub = a->key_block > 0 ? (a->key_block + TK - 1) / TK * TK : (int)kb;
    if (sub > kb) sub = (int)kb;
    const size_t srows = (size_t)B * sub;

    auto up = [](size_t b) { return (b + 255) & ~(size_t)255; };
    const size_t b_tiles = up((size_t)kb * key_bytes), b_mask = up((size_t)B * ntiles * CU_HOPPER_MASK_BYTES);
    const size_t b_state = nblocks > 1 ? up((size_t)B * t * nh * (hd + 2) * sizeof(float)) : 0;
    const size_t b_exp = latent ? up(srows * 2 * W * sizeof(float)) : 0;
    /* the gather buffer where some piece gathers (a short last piece of one row may, where a long one does not) */
    const size_t b_lat = latent && latent_gathers(a, (size_t)B) ? up(srows * (size_t)a->rank * sizeof(float)) : 0;
    char *blk = (char *)cu_alloc_raw(c, b_tiles + b_mask + b_state + b_exp + b_lat);
    if (!blk) return cu_fail_more(c, XO_ENOMEM, "attention scratch (%ld keys of %d rows)", kb, B);
    __half *tiles = (__half *)blk;
    uint8_t *tile_mask = (uint8_t *)(blk + b_tiles);
    float *state = nblocks > 1 ? (float *)(blk + b_tiles + b_mask) : NULL;
    float *kvbuf = (float *)(blk + b_tiles + b_mask + b_state), *lat = (float *)(blk + b_tiles + b_mask + b_state + b_exp);

    CuHopperAttn h;
    h.batch = B;
    h.t = t;
    h.past = a->past;
    h.nh = nh;
    h.nkv = nkv;
    h.group = nh / nkv;
    h.q = a->q;
    h.out = a->out;
    h.out16 = out16;
    h.out16_t = out16_t;
    h.tiles = tiles;
    h.tile_mask = tile_mask;
    h.scale = a->scale;
    h.eps = a->denom_eps;
    h.state = state;
    xo_status rc = XO_OK;
    for (int bi = 0; bi < nblocks && rc == XO_OK; bi++) {
        const int kbeg = (int)(bi * kb), kend = kbeg + kb < kv_len ? (int)(kbeg + kb) : kv_len;
        const int btiles = (kend - kbeg + TK - 1) / TK;
        CuHopperPack pk;
        pk.tiles = tiles;
        pk.batch = B;
        pk.nkv = nkv;
        pk.ntiles = btiles;
        pk.inv_freq = a->inv_freq;
        pk.mscale = a->mscale;
        for (int j0 = kbeg; j0 < kend && rc == XO_OK; j0 += latent ? sub : kend - kbeg) {
            const int len = latent && j0 + sub < kend ? sub : kend - j0;
            pk.tile0 = (j0 - kbeg) / TK;
            pk.len = len;
            if (latent) { /* compact rows b * len + jj, [K | V], K unrotated: rotated as packed */
                rc = expand_latent_block(be, c, a, j0, len, kvbuf, lat, true);
                pk.src_rows = len;
                pk.src_stride = (size_t)2 * W;
                pk.pos = a->key_pos + j0;
                pk.pos_rows = a->capacity;
                if (rc == XO_OK) rc = cu_attention_hopper_pack(c, pk, kvbuf, kvbuf + W, XO_F32);
            } else { /* the cache's rows b * capacity + j, K rotated when it was stored */
                const size_t es = a->kv_dtype == XO_F32 ? sizeof(float) : 2;
                pk.src_rows = a->capacity;
                pk.src_stride = (size_t)W;
                pk.pos = NULL;
                pk.pos_rows = 0;
                rc = cu_attention_hopper_pack(c, pk, (const char *)a->k + (size_t)j0 * W * es,
                                              (const char *)a->v + (size_t)j0 * W * es, a->kv_dtype);
            }
        }
        if (rc == XO_OK) rc = cu_attention_hopper_mask(c, tile_mask, a->key_mask, B, a->capacity, kbeg, kend, btiles);
        h.kbeg = kbeg;
        h.ntiles = btiles;
        h.first = bi == 0;
        h.last = bi + 1 == nblocks;
        c->prefill_counts[1]++;
        if (rc == XO_OK) rc = cu_attention_hopper(c, h);
    }
    cu_free(c, blk);
    return rc;
}

/* prefill of a 16-bit model on the tensor cores (mma.sync, or attention_hopper.cu); else the row-wise kernel */
static bool on_tensor_cores(const CuCtx *c, const xo_attention_args *a) {
    const int hd = a->head_dim;
    const xo_dtype wt = a->kv_b ? a->kv_b->dtype : XO_F32;
    const bool hd_ok = hd == 16 || hd == 32 || hd == 64 || hd == 128;
    return !c->attn_rows && !a->past_device && (wt == XO_BF16 || wt == XO_F16) && hd_ok && a->new_tokens >= 16;
}

template <typename O>
static void launch_fold(CuCtx *c, const AttnP &p, O *out, int rows, int nsplit, const float *part, float *state,
                        int first, int last) {
    cu_launch(c, k_attn_fold<O>, dim3((unsigned)rows, (unsigned)p.nh), p.hd >= 128 ? 128 : 64, 0, p, out, nsplit, part,
              state, first, last);
}

/* The attention into a->out, or (out16 not NULL, on the tensor-core kernels only) into out16 as
 * out16_t, each value the float32 one rounded */
static xo_status attention_to(xo_backend *be, const xo_attention_args *a, void *out16, xo_dtype out16_t) {
    CuCtx *c = cu_ctx(be);
    const int t = a->new_tokens, nh = a->num_heads, nkv = a->num_kv_heads, hd = a->head_dim;
    const int kv_len = a->past + t, rows = a->batch * t, B = a->batch;
    if (rows <= 0) return XO_OK;
    if (hd > 1024) return cu_fail(c, XO_EINVAL, "head_dim %d above the supported 1024", hd);
    if (nkv <= 0 || nh % nkv) return cu_fail(c, XO_EINVAL, "num_heads %d is not a multiple of num_kv_heads %d", nh, nkv);
    if (out16 && !on_tensor_cores(c, a))
        return cu_fail(c, XO_EINVAL, "attention: a 16-bit output needs the tensor-core kernels");
    if (a->format == XO_CACHE_LATENT && t == 1) {
        const bool fused = cu_latent_decode_chosen(c, a);
        c->decode_counts[fused]++;
        if (fused) return cu_latent_decode(c, a);
    }
    AttnP p;
    p.t = t;
    p.past = a->past;
    p.past_dev = a->past_device;
    p.nh = nh;
    p.hd = hd;
    p.cap = a->capacity;
    p.group = nh / nkv;
    p.q = a->q;
    p.out = a->out;
    p.mask = a->key_mask;
    p.scale = a->scale;
    p.eps = a->denom_eps;
    p.kpos = NULL;
    p.inv_freq = a->inv_freq;
    p.mscale = a->mscale;
    const int W = nkv * hd;
    const bool latent = a->format == XO_CACHE_LATENT;

    /* kernel choice: tensor cores for prefill of 16-bit models, the row-wise kernel otherwise */
    const bool tc = on_tensor_cores(c, a);
    const bool use_mma = tc;
    if (tc && cu_attention_hopper_fits(c, hd)) return hopper_prefill(be, c, a, out16, out16_t);

    /* keys per block (a multiple of the mma kernel's 64-key tile): every key at once unless a
     * prefill pass's keys need scratch (expanded from the latent, or f16 copies) and outnumber
     * key_block. A decode step (one query per row) takes every key at once: its scratch is one
     * row of keys per sequence, and folding blocks for a single query costs more than it saves. */
    int kb = kv_len;
    if ((latent || use_mma) && t > 1 && a->key_block > 0 && a->key_block < kv_len) {
        kb = (a->key_block + 63) / 64 * 64;
        if (kb > kv_len) kb = kv_len;
    }
    const int nblocks = (kv_len + kb - 1) / kb;
    const size_t krows = (size_t)B * kb; /* compact key rows b * kb + j - j0 of one block */

    /* scratch: f32 expanded [K | V] (latent), f16 copies (mma), split partials and the running
     * state of several blocks */
    auto up = [](size_t b) { return (b + 255) & ~(size_t)255; };
    const size_t b_exp = latent ? up(krows * 2 * W * sizeof(float)) : 0;
    const int last_len = kv_len - (nblocks - 1) * kb;
    const bool gather = latent && (latent_gathers(a, krows) || latent_gathers(a, (size_t)B * last_len));
    const size_t b_lat = gather ? up(krows * (size_t)a->rank * sizeof(float)) : 0;
    const size_t b_16 = use_mma ? up(krows * 2 * W * sizeof(__half)) : 0;
    int nsplit = 1;
    if (!tc) { /* enough blocks to fill the GPU, each with at least 32 keys (two steps of its warps) */
        const long blocks = (long)rows * nh, want = 8L * c->num_sms;
        if (blocks < want) {
            nsplit = (int)((want + blocks - 1) / blocks);
            const int by_len = kb / 32 > 1 ? kb / 32 : 1;
            if (nsplit > by_len) nsplit = by_len;
            if (nsplit > 64) nsplit = 64;
        }
    }
    /* the row-wise kernel rotates expanded keys as it loads them (lane pairs c, c + NC/2) */
    const bool fuse_rope = !tc && latent && (hd == 64 || hd == 128 || hd == 256 || hd == 512 || hd == 1024);
    const bool partials = nsplit > 1 || nblocks > 1;
    const size_t b_part = partials ? up((size_t)rows * nh * nsplit * (hd + 2) * sizeof(float)) : 0;
    const size_t b_state = nblocks > 1 ? up((size_t)rows * nh * (hd + 2) * sizeof(float)) : 0;
    const size_t total = b_exp + b_lat + b_16 + b_part + b_state;
    char *blk = NULL;
    if (total) {
        blk = (char *)cu_alloc_raw(c, total);
        if (!blk) return cu_fail_more(c, XO_ENOMEM, "attention scratch (%zu key rows)", krows);
    }
    float *kvbuf = (float *)blk, *lat = (float *)(blk + b_exp);
    __half *kv16 = (__half *)(blk + b_exp + b_lat);
    float *part = partials ? (float *)(blk + b_exp + b_lat + b_16) : NULL;
    float *state = nblocks > 1 ? (float *)(blk + b_exp + b_lat + b_16 + b_part) : NULL;
    const xo_dtype kt = latent ? XO_F32 : a->kv_dtype; /* the element type of p.K and p.V */
    /* a 16-bit K/V cache at head_dim 64 off the tensor cores (decode steps): k_attn_kv16 */
    const bool kv_rows16 = !tc && !latent && hd == KV16_HD && (kt == XO_BF16 || kt == XO_F16) &&
                      (((uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->q) & 15) == 0;
    xo_status rc = XO_OK;

    for (int blk_i = 0; blk_i < nblocks && rc == XO_OK; blk_i++) {
        const int j0 = blk_i * kb, len = blk_i + 1 < nblocks ? kb : last_len;
        const size_t brows = (size_t)B * len;
        p.kbeg = j0;
        p.kstop = j0 + len;
        if (latent) {
            rc = expand_latent_block(be, c, a, j0, len, kvbuf, lat, fuse_rope);
            p.K = kvbuf;
            p.V = kvbuf + W;
            p.kvs = (size_t)2 * W;
            p.kcap = len;
            if (fuse_rope) p.kpos = a->key_pos;
        } else { /* the cache itself: rows b * capacity + j */
            p.K = a->k;
            p.V = a->v;
            p.kvs = (size_t)W;
            p.kcap = a->capacity;
            p.kbeg = 0;
        }
        if (rc == XO_OK && use_mma) {
            /* f16 copies of the block's keys, compact rows b * len + j - j0 */
            const size_t n16 = brows * 2 * W, skip = (size_t)(j0 - p.kbeg) * p.kvs;
            unsigned nb = cu_blocks(n16, 256), cap = (unsigned)c->num_sms * 32;
            const unsigned grid = nb < cap ? nb : cap;
            if (kt == XO_BF16)
                k_kv_pack16<<<grid, 256, 0, c->stream>>>(kv16, (const __nv_bfloat16 *)p.K + skip,
                                                         (const __nv_bfloat16 *)p.V + skip, p.kvs, len, p.kcap, W, brows);
            else if (kt == XO_F16)
                k_kv_pack16<<<grid, 256, 0, c->stream>>>(kv16, (const __half *)p.K + skip, (const __half *)p.V + skip, p.kvs,
                                                         len, p.kcap, W, brows);
            else
                k_kv_pack16<<<grid, 256, 0, c->stream>>>(kv16, (const float *)p.K + skip, (const float *)p.V + skip, p.kvs,
                                                         len, p.kcap, W, brows);
            rc = cu_check_launch(c, "attention (f16 keys)");
            AttnP16 a16;
            a16.p = p;
            a16.p.kcap = len;
            a16.p.kbeg = j0;
            a16.p.kvs = (size_t)2 * W;
            a16.K16 = kv16;
            a16.V16 = kv16 + W;
            a16.part = part;
            a16.out16 = out16;
            a16.out16_t = out16_t;
            c->prefill_counts[0]++;
            if (rc == XO_OK) rc = launch_mma_hd(c, a16, B);
        } else if (rc == XO_OK) {
            const int split_len = (len + nsplit - 1) / nsplit;
            const dim3 grid((unsigned)rows, (unsigned)nh, (unsigned)nsplit);
            if (kv_rows16) {
                if (kt == XO_BF16) cu_launch(c, k_attn_kv16<__nv_bfloat16>, grid, 128, 0, p, split_len, part);
                else cu_launch(c, k_attn_kv16<__half>, grid, 128, 0, p, split_len, part);
            } else if (kt == XO_BF16) launch_rows_hd<__nv_bfloat16>(c, p, rows, nsplit, split_len, part);
            else if (kt == XO_F16) launch_rows_hd<__half>(c, p, rows, nsplit, split_len, part);
            else launch_rows_hd<float>(c, p, rows, nsplit, split_len, part);
            rc = cu_check_launch(c, "attention");
        }
        if (rc == XO_OK && partials) {
            const int first = blk_i == 0, last = blk_i + 1 == nblocks;
            if (out16 && out16_t == XO_BF16)
                launch_fold(c, p, (__nv_bfloat16 *)out16, rows, nsplit, part, state, first, last);
            else if (out16)
                launch_fold(c, p, (__half *)out16, rows, nsplit, part, state, first, last);
            else
                launch_fold(c, p, p.out, rows, nsplit, part, state, first, last);
            rc = cu_check_launch(c, "attention (fold)");
        }
    }
    cu_free(c, blk);
    return rc;
}

xo_status cu_attention(xo_backend *be, const xo_attention_args *a) { return attention_to(be, a, NULL, XO_F32); }

xo_status cu_attention_o_proj(xo_backend *be, float *y, const xo_attention_args *a, const xo_linear *o) {
    CuCtx *c = cu_ctx(be);
    const int n = a->batch * a->new_tokens, width = a->num_heads * a->head_dim;
    /* where cu_matmul would convert the float32 output for a 16-bit GEMM (the tensor-core kernels take
     * 16 rows and more), the kernels store it converted */
    if (on_tensor_cores(c, a) && cu_is16(o->dtype) && o->in == width && o->out > 0 && n > CU_SKINNY_MAX_M) {
        XO_TRY(cu_attn16_reserve(c, (size_t)n * width * 2));
        XO_TRY(attention_to(be, a, c->attn16, o->dtype));
        return cu_matmul16(c, y, c->attn16, o, n);
    }
    XO_TRY(cu_attention(be, a));
    return cu_matmul(be, y, a->out, o, n);
}
