// The error words a persistent kernel leaves when it gives up on a peer (expert parallelism): a
// cross-rank wait that passes Ranks::peer_timeout_ns records what it waited for, the call stops
// every processor and exits, and the host turns the words into the RuntimeError the CPU transport
// raises. Plain C++: the host and the kernel share it.
//
//   status[0]  kind: 0 none, 1 a peer's dispatch flag, 2 a peer's return flag (the first to give up wins)
//   status[1]  the peer rank it waited for
//   status[2]  the local expert of that flag (the owner's local expert, for both kinds)
//   status[3]  the epoch it waited for
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace flashmoe::cuda {

enum KernelErrorKind : uint32_t { kNoError = 0, kDispatchFlagTimeout = 1, kReturnFlagTimeout = 2 };
constexpr int kStatusWords = 4;

// The message of a rank's status words; empty when the call was healthy.
inline std::string describe_kernel_error(const uint32_t* status, int64_t rank, double timeout_seconds) {
  if (status[0] == kNoError) return std::string();
  const bool dispatch = status[0] == kDispatchFlagTimeout;
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%g", timeout_seconds);
  std::string message = "flashmoe: the persistent kernel of rank " + std::to_string(rank) + " gave up after " +
                        seconds + " s waiting for the " +
                        (dispatch ? "dispatch flag of source rank " : "return flag of owner rank ") +
                        std::to_string(status[1]) + ", local expert " + std::to_string(status[2]) + " (epoch " +
                        std::to_string(status[3]) + "): that rank is gone, stuck, or not calling the layer";
  if (status[0] != kDispatchFlagTimeout && status[0] != kReturnFlagTimeout) {
    message = "flashmoe: the persistent kernel of rank " + std::to_string(rank) + " left an unknown error word " +
              std::to_string(status[0]);
  }
  return message + "; the heaps are in an unknown state: destroy the context";
}

}  // namespace flashmoe::cuda
