// Poll/fence/release primitives at GPU scope and the spin-wait of every actor. Waits are bounded in
// debug builds (FLASHMOE_BOUNDED_WAITS): a wait that cannot end prints its name and traps instead
// of hanging the process.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cuda/platform.h"

#if !defined(__CUDACC__)
#include <chrono>
#endif

namespace flashmoe::cuda {

#if defined(__CUDACC__)

// A poll: a relaxed load, which (unlike ld.acquire) leaves the SM's L1 alone. Once a poll sees
// what it waits for, one acquire_fence() makes it an acquire (the PTX model's fence pattern).
__device__ __forceinline__ uint32_t ld_poll(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t ld_poll(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void acquire_fence() { asm volatile("fence.acq_rel.gpu;" : : : "memory"); }

// Before a broadcast: one fence, then st_relaxed of each flag. The fence's release pattern orders
// every write before it (this thread's, and what a CTA barrier made it see) before each of the
// relaxed stores, for whoever polls one and fences: one membar instead of one per flag.
__device__ __forceinline__ void release_fence() { asm volatile("fence.acq_rel.gpu;" : : : "memory"); }

__device__ __forceinline__ void st_relaxed(uint32_t* address, uint32_t value) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" : : "l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ void st_relaxed(uint64_t* address, uint64_t value) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void st_release(uint32_t* address, uint32_t value) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" : : "l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ void st_release(uint64_t* address, uint64_t value) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

// System scope, for the flags and rows of peers (expert parallelism): another GPU's heap reached by
// load/store over NVLink, or this GPU's loopback ranks (where .gpu would do; .sys is never wrong).
__device__ __forceinline__ uint64_t ld_poll_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void acquire_fence_sys() { asm volatile("fence.acq_rel.sys;" : : : "memory"); }
__device__ __forceinline__ void release_fence_sys() { asm volatile("fence.acq_rel.sys;" : : : "memory"); }

__device__ __forceinline__ void st_relaxed_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ void st_release_sys(uint32_t* address, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" : : "l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(now));
  return now;
}

#else  // host emulation: the same orderings through the compiler's atomics

// Polls acquire directly here: ThreadSanitizer does not model standalone fences.
inline uint32_t ld_poll(const uint32_t* address) {
  emulation::chaos_point();
  return __atomic_load_n(address, __ATOMIC_ACQUIRE);
}
inline uint64_t ld_poll(const uint64_t* address) {
  emulation::chaos_point();
  return __atomic_load_n(address, __ATOMIC_ACQUIRE);
}
inline void acquire_fence() { FLASHMOE_COUNT(acquire_fences, 1); }
// The fence of a broadcast is counted; its relaxed stores are release stores here, for the same
// reason (to ThreadSanitizer they carry the ordering the fence gives them on the GPU).
inline void release_fence() { FLASHMOE_COUNT(release_fences, 1); }
inline void st_relaxed(uint32_t* address, uint32_t value) { __atomic_store_n(address, value, __ATOMIC_RELEASE); }
inline void st_relaxed(uint64_t* address, uint64_t value) { __atomic_store_n(address, value, __ATOMIC_RELEASE); }
inline void st_release(uint32_t* address, uint32_t value) {
  FLASHMOE_COUNT(release_stores, 1);
  __atomic_store_n(address, value, __ATOMIC_RELEASE);
}
inline void st_release(uint64_t* address, uint64_t value) {
  FLASHMOE_COUNT(release_stores, 1);
  __atomic_store_n(address, value, __ATOMIC_RELEASE);
}
// System scope: the same, counted apart (the emulation's ranks are thread teams of one process).
inline uint64_t ld_poll_sys(const uint64_t* address) {
  emulation::chaos_point();
  return __atomic_load_n(address, __ATOMIC_ACQUIRE);
}
inline void acquire_fence_sys() { FLASHMOE_COUNT(acquire_fences, 1); }
inline void release_fence_sys() { FLASHMOE_COUNT(release_fences, 1); }
inline void st_relaxed_sys(uint64_t* address, uint64_t value) { __atomic_store_n(address, value, __ATOMIC_RELEASE); }
inline void st_release_sys(uint32_t* address, uint32_t value) {
  FLASHMOE_COUNT(release_stores, 1);
  __atomic_store_n(address, value, __ATOMIC_RELEASE);
}
inline uint64_t global_timer_ns() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch()).count());
}

#endif

#ifndef FLASHMOE_BOUNDED_WAITS
#define FLASHMOE_BOUNDED_WAITS 0
#endif

// Spins until `ready()` (which polls with ld_poll) holds, sleeping `sleep_ns` between polls
// (0: poll flat out), with no fence: the caller acquires what it then reads. Debug builds give up
// after `limit_ns` (KernelParams::wait_limit_ns), naming the wait, instead of hanging.
template <typename Ready>
FLASHMOE_DEVICE void wait_until(Ready ready, const char* what, unsigned sleep_ns, uint64_t limit_ns) {
#if FLASHMOE_BOUNDED_WAITS
  const uint64_t start = global_timer_ns();
#endif
  while (!ready()) {
    if (sleep_ns) __nanosleep(sleep_ns);
#if FLASHMOE_BOUNDED_WAITS
    if (global_timer_ns() - start > limit_ns) {
      printf("flashmoe: wait '%s' timed out after %llu ns (block %d, thread %d)\n", what,
             static_cast<unsigned long long>(limit_ns), int(blockIdx.x), int(threadIdx.x));
      __trap();
    }
#else
    (void)what;
    (void)limit_ns;
#endif
  }
}

// wait_until, then one fence so that what follows reads as after an acquire.
template <typename Ready>
FLASHMOE_DEVICE void spin_until(Ready ready, const char* what, unsigned sleep_ns, uint64_t limit_ns) {
  wait_until(ready, what, sleep_ns, limit_ns);
  acquire_fence();
}

}  // namespace flashmoe::cuda
