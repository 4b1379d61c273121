/* The Hopper primitives the sm_90a kernels share (attention_hopper.cu, grouped_gemm_hopper.cu,
 * latent_decode_hopper.cu): shared-memory matrix descriptors, the fences and waits around
 * wgmma.mma_async, mbarriers, and the bulk and tensor (TMA) copies that complete on them.
 * Defined only in the sm_90a image (__CUDA_ARCH_FEAT_SM90_ALL); kernels that use them guard
 * their bodies the same way.
 *
 * A descriptor: bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset
 * 0, 62-63 the layout (0 none, 1 128-byte swizzle). Without swizzle LBO is the byte stride
 * between core matrices (8 rows of 16 bytes, 128 contiguous bytes) along K and SBO the stride
 * along M or N, in both majors. With the 128-byte swizzle (K-major, rows of 64 16-bit values,
 * 16-byte unit u of row r stored at unit u ^ (r % 8), 1024-byte aligned 8-row atoms, as TMA's
 * CU_TENSOR_MAP_SWIZZLE_128B writes them) SBO is the 1024 bytes between 8-row groups, LBO is
 * unused, and the k-step of 16 values starts 32 bytes further. */
#ifndef XO_CU_WGMMA_H
#define XO_CU_WGMMA_H

#include <stdint.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
    return smem_desc(addr, 16, 1024) | ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* until at most N of this warp's committed groups are still running */
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* this thread's earlier writes to shared memory through the generic proxy (stores, cp.async)
 * ordered before later reads through the async proxy (wgmma operands); a barrier after it then
 * orders every thread's writes before the wgmma of any */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/* an accumulator register is redefined here, so no read of it moves above the wait before */
__device__ __forceinline__ void reg_fence(float &x) { asm volatile("" : "+f"(x)::"memory"); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
/* the initialised barriers become visible to the async proxy (the copies complete on them) */
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
/* until the barrier's phase of this parity has completed */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
/* bytes (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, counted on bar */
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
/* the box of a 2-D tensor map (a CUtensorMap in parameter or global memory) at element
 * coordinates (inner, outer) into shared memory, its bytes counted on bar; the parts of the box
 * outside the tensor are zero */
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void *map, int inner, int outer, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(map), "r"(inner), "r"(outer), "r"(bar)
                 : "memory");
}

#endif

#endif
