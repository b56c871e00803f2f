// A bounded spin wait on a 64-bit signal word written by another GPU (or this one): the clock
// is read only every `spins_per_check` polls, and past `timeout_ns` the wait gives up instead
// of hanging, so the caller can write an error word and exit.
#pragma once

#include <cstdint>

namespace flashmoe::nvshmem {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Acquire at system scope: the payload a peer put before its signal is visible after this load.
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

struct WaitOutcome {
  bool arrived;
  uint64_t last_value;  // what the word held at the last poll
};

__device__ __forceinline__ WaitOutcome wait_until_equal_bounded(const uint64_t* signal, uint64_t expected,
                                                                uint64_t timeout_ns, uint32_t spins_per_check) {
  const uint64_t start = global_timer_ns();
  uint32_t spins = 0;
  for (;;) {
    const uint64_t value = load_acquire_sys(signal);
    if (value == expected) return {true, value};
    if (++spins >= spins_per_check) {
      spins = 0;
      if (global_timer_ns() - start > timeout_ns) return {false, value};
    }
  }
}

}  // namespace flashmoe::nvshmem
