// The device self-test of the NVSHMEM module: each PE puts a payload with a signal to the next
// PE (itself at W = 1) from one CTA, then waits, bounded, for the previous PE's signal and
// checks the payload it received.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <stdexcept>
#include <string>

#include "nvshmem/bounded_wait.cuh"
#include "nvshmem/check.h"
#include "nvshmem/runtime.h"

namespace flashmoe::nvshmem {

constexpr int kSelftestThreads = 256;

// What the kernel reports back; error != 0 means the wait timed out.
struct SelftestStatus {
  int32_t error;
  int32_t waited_for_pe;
  uint64_t last_signal;
  unsigned long long mismatched_words;
};

__host__ __device__ inline uint64_t payload_word(int pe, uint64_t index, uint64_t signal_value) {
  return (uint64_t(pe + 1) << 48) ^ (signal_value << 32) ^ (index * 0x9E3779B97F4A7C15ull);
}

static uint64_t selftest_round = 0;  // the signal value of each round is new, so a stale flag never matches



__global__ void __launch_bounds__(kSelftestThreads)
put_signal_selftest_kernel(uint64_t* send, uint64_t* receive, size_t words, uint64_t* signal, uint64_t signal_value,
                           int target_pe, int source_pe, uint64_t timeout_ns, uint32_t spins_per_check, bool put,
                           SelftestStatus* status) {
  __shared__ int timed_out;
  const int me = nvshmem_my_pe();
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) send[i] = payload_word(me, i, signal_value);
  __syncthreads();  // the whole payload is written before the block's put reads it
  if (put) {
    nvshmemx_putmem_signal_nbi_block(receive, send, words * sizeof(uint64_t), signal, signal_value,
                                     NVSHMEM_SIGNAL_SET, target_pe);
  }
  if (threadIdx.x == 0) {
    const WaitOutcome outcome = wait_until_equal_bounded(signal, signal_value, timeout_ns, spins_per_check);
    timed_out = outcome.arrived ? 0 : 1;
    status->last_signal = outcome.last_value;
    status->waited_for_pe = source_pe;
    status->error = timed_out;
    nvshmem_quiet();  // this PE's own put has completed before the kernel ends
  }
  __syncthreads();
  if (timed_out) return;
  unsigned long long bad = 0;
  for (size_t i = threadIdx.x; i < words; i += blockDim.x) bad += receive[i] != payload_word(source_pe, i, signal_value);
  if (bad) atomicAdd(&status->mismatched_words, bad);
}

SelftestResult put_signal_selftest(size_t bytes, uint64_t timeout_ns, uint32_t spins_per_check, bool put) {
  if (bytes == 0 || bytes % sizeof(uint64_t) != 0) {
    throw std::invalid_argument("flashmoe._nvshmem.put_signal_selftest: bytes must be a positive multiple of 8 (got " +
                                std::to_string(bytes) + ")");
  }
  if (spins_per_check == 0) {
    throw std::invalid_argument("flashmoe._nvshmem.put_signal_selftest: spins_per_check must be positive");
  }
  SelftestResult result;
  const int me = my_pe();
  const int pes = n_pes();
  result.target_pe = (me + 1) % pes;
  result.source_pe = (me + pes - 1) % pes;
  result.signal_value = ++selftest_round;

  auto* send = reinterpret_cast<uint64_t*>(malloc_symmetric(bytes));
  auto* receive = reinterpret_cast<uint64_t*>(malloc_symmetric(bytes));
  auto* signal = reinterpret_cast<uint64_t*>(malloc_symmetric(sizeof(uint64_t)));
  SelftestStatus* status = nullptr;
  SelftestStatus host_status{};
  std::string failure;
  try {
    FLASHMOE_CUDA_CHECK(cudaMalloc(&status, sizeof(SelftestStatus)));
    FLASHMOE_CUDA_CHECK(cudaMemset(status, 0, sizeof(SelftestStatus)));
    FLASHMOE_CUDA_CHECK(cudaMemset(signal, 0, sizeof(uint64_t)));
    FLASHMOE_CUDA_CHECK(cudaDeviceSynchronize());
    barrier_all();  // every PE's signal is cleared before any PE puts
    put_signal_selftest_kernel<<<1, kSelftestThreads>>>(send, receive, bytes / sizeof(uint64_t), signal,
                                                        result.signal_value, result.target_pe, result.source_pe,
                                                        timeout_ns, spins_per_check, put, status);
    FLASHMOE_CUDA_CHECK(cudaGetLastError());
    FLASHMOE_CUDA_CHECK(cudaDeviceSynchronize());
    FLASHMOE_CUDA_CHECK(cudaMemcpy(&host_status, status, sizeof(host_status), cudaMemcpyDeviceToHost));
  } catch (const std::exception& error) {
    failure = error.what();
  }
  if (status != nullptr) {
    const cudaError_t freed = cudaFree(status);
    if (failure.empty() && freed != cudaSuccess) failure = "flashmoe._nvshmem: cudaFree(status) failed: " +
                                                           std::string(cudaGetErrorString(freed));
  }
  if (failure.empty() && host_status.error != 0) {
    // A peer that never signalled may still put later: keep its target buffers alive (leak them)
    // rather than free symmetric memory collectively with a PE that is gone.
    throw std::runtime_error(
        "flashmoe._nvshmem.put_signal_selftest: PE " + std::to_string(me) + " timed out after " +
        std::to_string(timeout_ns / 1e9) + " s waiting for the put-with-signal flag from PE " +
        std::to_string(host_status.waited_for_pe) + " (signal word expected " + std::to_string(result.signal_value) +
        ", last seen " + std::to_string(host_status.last_signal) + ")");
  }
  if (!failure.empty()) throw std::runtime_error(failure);
  barrier_all();  // every PE has read its payload before the buffers are freed
  free_symmetric(reinterpret_cast<uintptr_t>(signal));
  free_symmetric(reinterpret_cast<uintptr_t>(receive));
  free_symmetric(reinterpret_cast<uintptr_t>(send));
  result.mismatched_words = host_status.mismatched_words;
  return result;
}

}  // namespace flashmoe::nvshmem
