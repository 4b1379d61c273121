/* The Hopper warpgroup tensor-core primitives the sm_90a kernels share (attention_hopper.cu,
 * grouped_gemm_hopper.cu): shared-memory matrix descriptors for the no-swizzle ("interleaved")
 * core-matrix layout, and the fences and waits around wgmma.mma_async. Defined only in the
 * sm_90a image (__CUDA_ARCH_FEAT_SM90_ALL); kernels that use them guard their bodies the same way.
 *
 * A descriptor: bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base
 * offset 0, 62-63 swizzle 0 (none). For no-swizzle layouts LBO is the byte stride between core
 * matrices (8 rows of 16 bytes, 128 contiguous bytes) along K and SBO the stride along M or N, in
 * both majors (the PTX ISA's canonical layouts). */
#ifndef XO_CU_WGMMA_H
#define XO_CU_WGMMA_H

#include <stdint.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* until at most N of this warpgroup's committed groups are still running */
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* an accumulator register is redefined here, so no read of it moves above the wait before */
__device__ __forceinline__ void reg_fence(float &x) { asm volatile("" : "+f"(x)::"memory"); }
/* this thread's generic-proxy writes to shared memory (st.shared, cp.async) become visible to the
 * async proxy that wgmma reads its shared-memory operands through */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#endif

#endif
