// Checked CUDA and NVSHMEM calls: a failure throws std::runtime_error naming the call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flashmoe::nvshmem {

inline void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("flashmoe._nvshmem: ") + call + " failed: " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
}

// NVSHMEM's host API returns 0 on success.
inline void check_nvshmem(int status, const char* call) {
  if (status != 0) {
    throw std::runtime_error(std::string("flashmoe._nvshmem: ") + call + " failed with status " +
                             std::to_string(status) + " (NVSHMEM_DEBUG=WARN or INFO says more)");
  }
}

}  // namespace flashmoe::nvshmem

#define FLASHMOE_CUDA_CHECK(call) ::flashmoe::nvshmem::check_cuda((call), #call)
#define FLASHMOE_NVSHMEM_CHECK(call) ::flashmoe::nvshmem::check_nvshmem((call), #call)
