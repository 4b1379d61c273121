/* The latent-cache decode attention of decode_attention.cu (k_latent_decode, see there for the
 * contract) for 4 heads per block on Hopper's warpgroup tensor cores (wgmma, sm_90a): the key
 * splits' partial results (LatP: part_ml, part_acc) exactly as that kernel writes them, merged
 * by the same k_latent_combine. Taken where decode_attention.cu would run 4 heads per block
 * (the long contexts) and cu_latent_decode_hopper_fits.
 *
 * A block: one batch row, heads h0 .. h0+3 (absent ones, past num_heads, have zero Wk rows and
 * unused results), its split's key tiles of 128. The shared-memory tiles are those of the
 * mma.sync kernel, from a 1024-byte aligned base so that swz() is the K-major 128-byte-swizzle
 * layout (wgmma.h): the C tile [128 keys x rank] as rank/64 chunks of [128][64], resident for the
 * whole tile (P.C reads it after the softmax); Wk streams through a ring of NSTAGE stages.
 *
 * The Wk pipeline keeps the tensor cores fed: waiting for each chunk's wgmmas before a barrier
 * and its refill would drain the pipe, and a refill issued only then would have one chunk's time
 * to arrive from L2. So a tile's K expansion is 2 x rank/64 pieces, piece s = 2 kc + hh the
 * [128 rows x 64] of Wk for latent chunk kc and heads 2 hh, 2 hh + 1, one 16 KB stage of a ring of
 * NSTAGE.
 * The piece sequence is the same for every key tile, so the ring streams on across tiles: the
 * block's first NSTAGE - 1 pieces are requested before CU_PDL_ENTRY (weights), and each piece's
 * step refills the stage of the piece before with the piece NSTAGE - 1 ahead (the next tile's
 * first pieces arrive while this tile's rotation, softmax and P.C run). After issuing piece s a
 * warpgroup waits for piece s - 1 only, so piece s keeps the tensor pipe busy through the one block
 * barrier per piece (stage of s - 1 free in both warpgroups, the copies of s + 1 visible) and
 * the refill.
 *
 * Per key tile:
 *   K expansion: warpgroup g (threads 128 g ..) takes keys 64 g .. 64 g + 63 and all 256 columns
 *   (4 heads x 64 dims): per piece 4 wgmma m64n128k16 into columns 128 hh .., A = C rows by
 *   descriptor, B = the ring stage by descriptor, both K-major SW128 (k-step ks starts 32 ks bytes
 *   in); per column the k order is that of one m64n256k16 per chunk.
 *   Rotation and scores in registers. The accumulator fragment (mma.sync m16n8 layout): thread
 *   lane of warp w (of 4 in the warpgroup) holds keys ra = 64 g + 16 w + lane/4 (acc[4 i],
 *   acc[4 i + 1]) and rb = ra + 8 (acc[4 i + 2], acc[4 i + 3]), columns 8 i + 2 (lane % 4) + {0, 1}
 *   for n8 block i = 0..31; column c of head h is in block 8 h + c/8 (piece half hh: acc[64 hh ..
 *   64 hh + 63]). Rotary pairs dims c and c + 32 (blocks 8 h + j and 8 h + j + 4, the same thread),
 *   so a thread needs sin/cos of its two keys at its 8 frequencies 8 j + 2 (lane % 4) + {0, 1}
 *   (j < 4) only: 16 per tile, shared by the 4 heads. A quad's partial dot products are summed by
 *   shuffles; S[head][key] in shared memory.
 *   Softmax and P.C as k_latent_decode: warp h < nvalid the online softmax of head h (P as a hi +
 *   lo pair of 16-bit values), warps w < rank/64 acc_o[dims 64 w ..][head] += C^T P (mma.sync). */
#include <math.h>

#include <type_traits>

#include "backends/cuda/common.h"
#include "backends/cuda/latent_decode.h"
#include "backends/cuda/mma.h"
#include "backends/cuda/wgmma.h"

#ifndef XO_CUDA_SM90A /* setup.py: 1 when this file is built with its sm_90a image */
#define XO_CUDA_SM90A 0
#endif

namespace {

constexpr int HEADS = 4, COLS = HEADS * 64;              /* Wk rows per chunk */
constexpr int NSTAGE = 5;                                /* Wk ring stages, one piece each */
constexpr int PIECE_ROWS = COLS / 2;                     /* a piece: 2 heads' rows, the N of the wgmma */
constexpr int C_CHUNK_BYTES = LD_KEYS * LD_CHUNK * 2;    /* [128 keys][64] */
constexpr int W_STAGE_BYTES = PIECE_ROWS * LD_CHUNK * 2; /* [128 rows][64] */
/* byte offsets from the 1024-aligned base; every wgmma operand tile starts on a 1024 multiple */
constexpr int OFF_C = 0;
constexpr int OFF_W = OFF_C + (LD_MAX_RANK / LD_CHUNK) * C_CHUNK_BYTES;
constexpr int OFF_PT = OFF_W + NSTAGE * W_STAGE_BYTES; /* P hi, P lo: [8 heads][LD_PT_LD keys] each */
constexpr int OFF_S = OFF_PT + 2 * 8 * LD_PT_LD * 2;  /* [4 heads][128 keys] scores */
constexpr int OFF_Q = OFF_S + HEADS * LD_KEYS * 4;    /* [4 heads][64] q * qscale */
constexpr int OFF_F = OFF_Q + HEADS * 64 * 4;         /* [32] inv_freq */
constexpr int OFF_CORR = OFF_F + 32 * 4;              /* [8] per-head rescale of acc_o */
constexpr int OFF_POS = OFF_CORR + 8 * 4;             /* [128] key positions */
constexpr int OFF_VIS = OFF_POS + LD_KEYS * 4;        /* [128] 1: key visible */
constexpr int SMEM_BYTES = OFF_VIS + LD_KEYS + 1024;  /* + the slack that aligns the base */
static_assert(OFF_W % 1024 == 0 && W_STAGE_BYTES % 1024 == 0 && C_CHUNK_BYTES % 2048 == 0, "SW128 atoms are 1024-aligned");
static_assert(SMEM_BYTES <= 232448, "one block per SM (227 KB)");
static_assert(NSTAGE == 5, "the cp.async group counts of the piece loop assume NSTAGE - 1 = 4 pieces in flight");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define XO_WGMMA_SS_M64N128K16(TYPE)                                                                                 \
    asm volatile("{\n"                                                                                               \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                    \
                 "{"                                                                                                 \
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                             \
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                   \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                   \
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                    \
                 "}, %64, %65, 1, 1, 1, 0, 0;\n}\n"                                                                  \
                 :                                                                                                   \
                   "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),               \
                   "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),           \
                   "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),        \
                   "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),        \
                   "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),        \
                   "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),        \
                   "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),        \
                   "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),        \
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),        \
                   "+f"(d[63])                                                                                       \
                 : "l"(desc_a), "l"(desc_b))

/* D[64 x 128] += A[64 x 16] * B[16 x 128], both K-major in shared memory (descriptors); d: 64
 * accumulator registers (the n8 blocks 4 i .. 4 i + 3 as in any wgmma N) */
template <typename T> __device__ __forceinline__ void wgmma_n128(float *d, uint64_t desc_a, uint64_t desc_b) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        XO_WGMMA_SS_M64N128K16("bf16");
    else
        XO_WGMMA_SS_M64N128K16("f16");
}
#undef XO_WGMMA_SS_M64N128K16

#endif

/* grid (head groups of 4, key splits, batch) */
template <typename T>
__global__ __launch_bounds__(LD_THREADS, 1) void k_latent_decode_wgmma(LatP p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    T *Cs = (T *)(smem + OFF_C);  /* [rank/64][128 keys][64] */
    T *Ws = (T *)(smem + OFF_W);  /* the ring: [NSTAGE][128 rows][64] */
    /* P as hi + lo, two values of T (rows HEADS..7 stay 0): the product with C then weighs the
     * keys as exactly as float32 weights would */
    T *Pt = (T *)(smem + OFF_PT);
    T *Ptl = Pt + 8 * LD_PT_LD;
    float *S = (float *)(smem + OFF_S);
    float *qs = (float *)(smem + OFF_Q);
    float *fq = (float *)(smem + OFF_F);
    float *corr = (float *)(smem + OFF_CORR);
    int *posb = (int *)(smem + OFF_POS);
    uint8_t *vis = smem + OFF_VIS;
    const uint32_t c_sh = smem_addr(Cs), w_sh = smem_addr(Ws);

    const int hg = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gr = lane >> 2, gc = (lane & 3) * 2;
    const int wg = warp >> 2;                        /* warpgroup: key half of the tile */
    const int ra = wg * 64 + (warp & 3) * 16 + gr;   /* this thread's keys ra, ra + 8 of the tile */
    const int rank = p.rank, nch = rank / LD_CHUNK;
    const int h0 = hg * HEADS, nvalid = min(HEADS, p.nh - h0);
    const T *wk = (const T *)p.w + (size_t)h0 * 64 * rank;

    for (int i = tid; i < 2 * 8 * LD_PT_LD; i += LD_THREADS) Pt[i] = to16<T>(0.0f);
    if (tid < 8) corr[tid] = 0.0f;

    /* W piece ps (chunk ps / 2, heads 2 (ps % 2) ..) -> ring stage st: 128 rows x 8 units, 4 per
     * thread; rows of absent heads zero (their source address, unread, is head h0's first row) */
    auto load_w = [&](int ps, int st) {
        const int kc = ps >> 1, n0 = (ps & 1) * PIECE_ROWS;
        T *dst = Ws + st * PIECE_ROWS * LD_CHUNK;
#pragma unroll
        for (int i = 0; i < PIECE_ROWS * 8 / LD_THREADS; i++) {
            const int e = tid + i * LD_THREADS, n = e >> 3, u = e & 7;
            const bool ok = ((n0 + n) >> 6) < nvalid;
            cp_async16(dst + swz(n, u), wk + (size_t)(ok ? n0 + n : 0) * rank + kc * LD_CHUNK + u * 8, ok);
        }
    };
    /* the block's first NSTAGE - 1 pieces (of the sequence 0 .. 2 nch - 1, 0 .., the same for every
     * key tile) need nothing from the earlier kernels: in flight while they finish (a block
     * without keys leaves them unused). One cp.async group. */
    const int npc = 2 * nch; /* pieces per key tile */
    int ld_ps = 0;           /* the next piece to request, of the tile sequence */
#pragma unroll
    for (int st = 0; st < NSTAGE - 1; st++) {
        load_w(ld_ps, st);
        if (++ld_ps == npc) ld_ps = 0;
    }
    cp_commit();

    CU_PDL_ENTRY();
    const int past = p.past_dev ? *p.past_dev : p.past;
    const int kv_len = past + 1;
    const int nblk = (kv_len + LD_KEYS - 1) / LD_KEYS;
    const int bps = (nblk + p.nsplit - 1) / p.nsplit;
    const int blk0 = split * bps, blk1 = min(blk0 + bps, nblk);
    int ld_left = max(blk1 - blk0, 0) * npc - (NSTAGE - 1); /* pieces the block still needs requested */
    int ld_st = NSTAGE - 1, cu_st = 0;                       /* the stages of the next piece requested, issued */

    /* the block's queries (scale and mscale folded in; absent heads 0) and frequencies, read by
     * the rotation after the first tile's barriers */
    {
        const int h = tid >> 6;
        qs[tid] = h < nvalid ? p.q[((size_t)b * p.nh + h0 + h) * 64 + (tid & 63)] * p.qscale : 0.0f;
        if (tid < 32) fq[tid] = p.inv_freq[tid];
    }

    const T *lat = (const T *)p.latent + (size_t)b * p.cap * rank; /* slot k0 of the current key block */
    const uint8_t *mrow = p.mask + (size_t)b * p.cap;
    const int32_t *prow = p.kpos + (size_t)b * p.cap;
    /* C chunk kc of the key block whose slots start at `lat`: 128 rows x 8 units, 4 per thread;
     * invisible keys are zero-filled (their source address, unread, is the block's first slot) */
    bool row_ok[4];
    auto load_c = [&](int kc) {
        T *dst = Cs + kc * LD_KEYS * LD_CHUNK;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int e = tid + i * LD_THREADS, r = e >> 3, u = e & 7;
            cp_async16(dst + swz(r, u), lat + (size_t)(row_ok[i] ? r : 0) * rank + kc * LD_CHUNK + u * 8, row_ok[i]);
        }
    };

    float acc_o[4][4]; /* P.C: cd (warp*64 + mt*16 + row) x head (col) */
#pragma unroll
    for (int mt = 0; mt < 4; mt++) acc_o[mt][0] = acc_o[mt][1] = acc_o[mt][2] = acc_o[mt][3] = 0.0f;
    float m_run = -INFINITY, l_run = 0.0f; /* the softmax state of head `warp` (warps 0..HEADS-1) */
    for (int blk = blk0; blk < blk1; blk++) {
        const int k0 = blk * LD_KEYS, nkeys = min(LD_KEYS, kv_len - k0);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = (tid >> 3) + 32 * i, j = k0 + r;
            row_ok[i] = r < nkeys && mrow[j];
        }
        lat = (const T *)p.latent + ((size_t)b * p.cap + k0) * rank;
        load_c(0);
        cp_commit();
        if (nch > 1) load_c(1);
        cp_commit();
        if (tid < LD_KEYS) {
            const int j = k0 + tid;
            const bool ok = tid < nkeys && mrow[j];
            vis[tid] = ok;
            posb[tid] = ok ? prow[j] : 0;
        }

        /* K of keys 64 wg .. + 63 x 256 columns; zeroed here (the wgmmas accumulate), so it is
         * dead after the scores */
        float acc[128];
#pragma unroll
        for (int i = 0; i < 128; i++) acc[i] = 0.0f;
        const bool wg_busy = wg * 64 < nkeys; /* some of the warpgroup's keys are in the tile */

        /* cp.async groups, per thread, in commit order: the prologue's (the first NSTAGE - 1
         * pieces), then per tile X0 (C chunk 0), X1 (C chunk 1 or nothing), then G(s) for each piece
         * s of the tile, committed after its barrier: W piece s + NSTAGE - 1 of the block's sequence
         * (or nothing past its last tile) and, for s = 2 kc, C chunk kc + 2 (when kc + 2 < nch).
         * Piece s + 1 needs W piece s + 1, in G(s - 3), or, for s + 1 < 4, in a group older than
         * X0 (the previous tile's or the prologue's), and for s + 1 = 2 kc C chunk kc: in G(s - 3)
         * as well for kc >= 2, X1 for kc = 1, X0 for kc = 0.
         *   - here: all but X1 done (cp_wait<1>): C chunk 0, pieces 0 .. 3 and every older group.
         *   - step s = 1: X1 (C chunk 1; empty for nch = 1), with only G(0) newer: cp_wait<1>.
         *   - other steps s: G(s - 3) with G(s - 2), G(s - 1) newer: cp_wait<2> (for s = 0, 2 the
         *     groups it covers were complete already; for s = 2 nch - 1 it covers the next tile's
         *     W piece 0, whose C chunk 0 the next tile's start waits for). */
        cp_wait<1>();        /* this thread's copies of C chunk 0 and of the first pieces have landed */
        fence_proxy_async(); /* ... and are visible to the wgmmas, which read through the async proxy */
        __syncthreads();
        for (int kc = 0; kc < nch; kc++) {
#pragma unroll
            for (int hh = 0; hh < 2; hh++) { /* piece s = 2 kc + hh: columns 128 hh .. = acc[64 hh ..] */
                /* both warpgroups always (a warpgroup past the tile's keys multiplies zero rows of
                 * C): a wgmma and its wait on paths of their own would be serialized by ptxas */
                const uint32_t a = c_sh + kc * C_CHUNK_BYTES + wg * (C_CHUNK_BYTES / 2);
                const uint32_t w = w_sh + cu_st * W_STAGE_BYTES;
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < LD_CHUNK / 16; ks++)
                    wgmma_n128<T>(acc + 64 * hh, smem_desc_sw128(a + 32 * ks), smem_desc_sw128(w + 32 * ks));
                wgmma_commit();
                /* C chunk kc + 2 has a buffer of its own: requested while the products run (G(s)) */
                if (hh == 0 && kc + 2 < nch) load_c(kc + 2);
                wgmma_wait<1>(); /* this warpgroup's piece s - 1 is done; piece s still runs */
                if (hh == 1 && kc == 0) cp_wait<1>();
                else cp_wait<2>(); /* this thread's copies of piece s + 1 (W, C) have landed */
                fence_proxy_async();
                __syncthreads(); /* piece s - 1 done in both warpgroups; piece s + 1 visible to both */
                if (ld_left > 0) { /* the stage of piece s - 1 takes piece s + NSTAGE - 1 */
                    load_w(ld_ps, ld_st);
                    if (++ld_ps == npc) ld_ps = 0;
                    ld_st = ld_st == NSTAGE - 1 ? 0 : ld_st + 1;
                    ld_left--;
                }
                cp_commit(); /* G(s) */
                cu_st = cu_st == NSTAGE - 1 ? 0 : cu_st + 1;
            }
        }
        wgmma_wait<0>(); /* the tile's last piece */
#pragma unroll
        for (int i = 0; i < 128; i++) reg_fence(acc[i]);

        /* rotate K, scores with the queries: per frequency the sin/cos of both keys once, then
         * the 4 heads (the summation order per (key, head) as k_latent_decode's) */
        if (wg_busy) {
            const float pos[2] = { (float)posb[ra], (float)posb[ra + 8] };
            float s[HEADS][2];
#pragma unroll
            for (int h = 0; h < HEADS; h++) s[h][0] = s[h][1] = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 fr = *(const float2 *)(fq + 8 * j + gc);
                float sn[2][2], cs[2][2]; /* [key][e1] */
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++) {
                    sincos_reduced(pos[e2] * fr.x, &sn[e2][0], &cs[e2][0]);
                    sincos_reduced(pos[e2] * fr.y, &sn[e2][1], &cs[e2][1]);
                }
#pragma unroll
                for (int h = 0; h < HEADS; h++) {
                    const float2 q1 = *(const float2 *)(qs + h * 64 + 8 * j + gc);
                    const float2 q2 = *(const float2 *)(qs + h * 64 + 8 * j + gc + 32);
#pragma unroll
                    for (int e2 = 0; e2 < 2; e2++) {
#pragma unroll
                        for (int e1 = 0; e1 < 2; e1++) {
                            const float x1 = acc[4 * (8 * h + j) + 2 * e2 + e1], x2 = acc[4 * (8 * h + j + 4) + 2 * e2 + e1];
                            const float c = cs[e2][e1], si = sn[e2][e1];
                            s[h][e2] = fmaf(e1 ? q1.y : q1.x, x1 * c - x2 * si, s[h][e2]);
                            s[h][e2] = fmaf(e1 ? q2.y : q2.x, x2 * c + x1 * si, s[h][e2]);
                        }
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < HEADS; h++) {
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++) {
                    s[h][e2] += __shfl_xor_sync(0xffffffffu, s[h][e2], 1);
                    s[h][e2] += __shfl_xor_sync(0xffffffffu, s[h][e2], 2);
                }
                if ((lane & 3) == h) { /* each lane of the quad stores one head */
                    S[h * LD_KEYS + ra] = s[h][0];
                    S[h * LD_KEYS + ra + 8] = s[h][1];
                }
            }
        }
        __syncthreads();
        ld_softmax(S, vis, Pt, Ptl, corr, nvalid, m_run, l_run);
        __syncthreads();
        ld_accumulate(acc_o, Cs, Pt, Ptl, corr, nch, nkeys);
        __syncthreads();
    }
    cp_wait<0>();

    ld_write_partials(p, b, h0, split, nvalid, nch, m_run, l_run, acc_o);
#else
    /* an image without wgmma: never launched (cu_latent_decode_hopper_fits) */
    (void)p;
    __trap();
#endif
}

/* the kernel of this build's 9.0 image is the sm_90a one, and may have its shared memory */
template <typename T> bool allow_smem() {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, k_latent_decode_wgmma<T>) != cudaSuccess || fa.binaryVersion != 90 ||
        cudaFuncSetAttribute(k_latent_decode_wgmma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) != cudaSuccess) {
        (void)cudaGetLastError(); /* a failed query leaves no error for the next launch check */
        return false;
    }
    return true;
}

} // namespace

bool cu_latent_decode_hopper_fits(CuCtx *c) {
    if (!c->hopper_latent) { /* once per backend: compute capability 9.0 and this file's sm_90a image */
        int major = 0, minor = 0;
        bool ok = XO_CUDA_SM90A && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device) == cudaSuccess &&
                  major == 9 && minor == 0;
        if (!ok) (void)cudaGetLastError();
        ok = ok && allow_smem<__nv_bfloat16>() && allow_smem<__half>();
        c->hopper_latent = ok ? 1 : 2;
    }
    return c->hopper_latent == 1;
}

xo_status cu_latent_decode_hopper(CuCtx *c, const LatP &p, int batch, xo_dtype t) {
    const dim3 grid((unsigned)((p.nh + HEADS - 1) / HEADS), (unsigned)p.nsplit, (unsigned)batch);
    if (t == XO_BF16) cu_launch(c, k_latent_decode_wgmma<__nv_bfloat16>, grid, LD_THREADS, SMEM_BYTES, p);
    else cu_launch(c, k_latent_decode_wgmma<__half>, grid, LD_THREADS, SMEM_BYTES, p);
    return cu_check_launch(c, "latent decode attention (hopper)");
}
