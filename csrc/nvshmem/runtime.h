// flashmoe._nvshmem's C++ side: NVSHMEM bootstrap, symmetric memory and the device self-test.
// No CUDA or NVSHMEM header here, so the pybind11 binding compiles with the host compiler alone.
// Every function throws std::runtime_error naming the failed call (and std::invalid_argument
// naming a bad argument); nothing exits the process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flashmoe::nvshmem {

constexpr size_t kUniqueIdBytes = 128;  // sizeof(nvshmemx_uniqueid_t), checked in bootstrap.cu

struct Version {
  int major = 0, minor = 0, patch = 0;
};

Version compiled_version();  // the headers this module was built against
Version runtime_version();   // the libnvshmem_host loaded in this process
int compiled_cuda_major();

// One PE's part of the unique id, made by one rank and broadcast to the others.
std::string get_unique_id();
// Collective over the `n_pes` processes that share `unique_id`; `device` becomes current first.
// Refuses when NVSHMEM is already initialised in the process (by flashmoe or by anyone else).
void init(const std::string& unique_id, int rank, int n_pes, int device);
bool initialized();         // by this module, and not finalised since
int init_status();          // nvshmemx_init_status(): 0 not initialised, 2 initialised, ...
int my_pe();
int n_pes();
uintptr_t malloc_symmetric(size_t bytes);  // collective; throws when the symmetric heap is full
void free_symmetric(uintptr_t address);    // collective
uintptr_t peer_pointer(uintptr_t address, int pe);  // 0 when load/store cannot reach pe
void barrier_all();
void finalize();            // collective

struct SelftestResult {
  int target_pe = -1;       // the PE this one put to
  int source_pe = -1;       // the PE whose put-with-signal this one waited for
  uint64_t signal_value = 0;
  uint64_t mismatched_words = 0;  // of the received payload
};

// A put-with-signal of `bytes` (a multiple of 8) to the next PE, and a bounded wait for the
// previous PE's signal: past `timeout_ns` (checked every `spins_per_check` polls) the kernel
// writes an error word and exits, and this throws naming the PE and the flag. put = false skips
// the put (the test of the timeout: no PE then signals anyone).
SelftestResult put_signal_selftest(size_t bytes, uint64_t timeout_ns, uint32_t spins_per_check, bool put = true);

}  // namespace flashmoe::nvshmem
