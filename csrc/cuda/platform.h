// What the kernel code needs from the platform, so that one source builds for the GPU and, for
// the host tests, as plain C++ where a CTA is a team of threads (tests/cpp/test_cuda_emulation.cpp).
// The emulation runs every actor, task and signal of the kernel; only the MMA is a host loop.
#pragma once

#if defined(__CUDACC__)

#define FLASHMOE_DEVICE __device__ inline
// Counts one event of the emulation's cost counters (below); nothing on the GPU.
#define FLASHMOE_COUNT(counter, n) ((void)0)

#else  // host emulation

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

#define FLASHMOE_DEVICE inline

namespace flashmoe::cuda::emulation {

struct Index { unsigned x = 0; };

// A reusable barrier for the threads of one emulated CTA.
class Barrier {
 public:
  explicit Barrier(int threads) : threads_(threads) {}
  void arrive_and_wait() { arrive_and_wait_or(0); }
  // __syncthreads_or: the barrier, and whether any thread passed a non-zero value. The result stays
  // until every thread has read it: the next generation cannot complete without each of them.
  int arrive_and_wait_or(int value) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    any_ = any_ || value != 0;
    if (++waiting_ == threads_) {
      waiting_ = 0;
      result_ = any_;
      any_ = false;
      ++generation_;
      ready_.notify_all();
      return result_;
    }
    ready_.wait(lock, [&] { return generation_ != generation; });
    return result_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  int threads_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
  bool any_ = false;
  int result_ = 0;
};

// What the synchronization costs, counted while the emulation runs (tests/cpp/test_cuda_emulation.cpp
// prints them per task and asserts the scheduler's budget). Each counts what the GPU code issues:
//   acquire_fences   fence.acq_rel after a poll saw its value (acquire_fence)
//   release_fences   fence.acq_rel before a batch of relaxed stores (release_fence)
//   release_stores   st.release (a membar and a strong store each)
//   thread_fences    __threadfence(), per thread that executes it
//   tasks            tasks run by the processors
//   handouts         tasks handed to a processor (a doorbell rung), stops excluded
//   scheduler_global global-memory loads and stores by the scheduler thread: every word or Task
//                    it reads or writes there, and each poll that found a message; empty polls
//                    are not counted (they wait, they do not add work), nor its own state's
//                    arrays, which live in shared memory unless the tests move them
struct Counters {
  std::atomic<uint64_t> acquire_fences{0}, release_fences{0}, release_stores{0}, thread_fences{0};
  std::atomic<uint64_t> tasks{0}, handouts{0}, scheduler_global{0};
  void reset() {
    for (auto* counter : {&acquire_fences, &release_fences, &release_stores, &thread_fences, &tasks, &handouts,
                          &scheduler_global}) {
      counter->store(0);
    }
  }
};
inline Counters counters;

// Chaos for the tests: with a seed set, every poll (memory_order.cuh) may yield or sleep a little,
// so each launch runs another interleaving of the actors; results must not change by a bit.
inline std::atomic<uint64_t> chaos_seed{0};  // 0: off
inline void chaos_point() {
  const uint64_t seed = chaos_seed.load(std::memory_order_relaxed);
  if (seed == 0) return;
  thread_local uint64_t state = 0;
  if (state == 0) state = seed ^ (uint64_t(std::hash<std::thread::id>{}(std::this_thread::get_id())) | 1);
  state ^= state << 13, state ^= state >> 7, state ^= state << 17;  // xorshift64
  if (state % 2048 == 0) std::this_thread::sleep_for(std::chrono::microseconds(10 + state / 2048 % 50));
  else if (state % 8 == 0) std::this_thread::yield();
}

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline thread_local Barrier* block_barrier = nullptr;

}  // namespace flashmoe::cuda::emulation

#define FLASHMOE_COUNT(counter, n) \
  (::flashmoe::cuda::emulation::counters.counter.fetch_add(uint64_t(n), std::memory_order_relaxed))

#if !defined(__VECTOR_TYPES_H__)  // CUDA's uint4, for 16-byte copies, unless its headers are in
struct alignas(16) uint4 { uint32_t x, y, z, w; };
#endif
#define threadIdx (::flashmoe::cuda::emulation::thread_index)
#define blockIdx (::flashmoe::cuda::emulation::block_index)

inline void __syncthreads() { ::flashmoe::cuda::emulation::block_barrier->arrive_and_wait(); }
inline int __syncthreads_or(int value) { return ::flashmoe::cuda::emulation::block_barrier->arrive_and_wait_or(value); }
inline void __threadfence() {
  FLASHMOE_COUNT(thread_fences, 1);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline uint32_t atomicAdd(uint32_t* address, uint32_t value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
[[noreturn]] inline void __trap() { std::abort(); }

#endif
