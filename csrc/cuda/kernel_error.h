// The error words a persistent kernel leaves when it gives up on a peer (expert parallelism): a
// cross-rank wait that passes Ranks::peer_timeout_ns, a flag of another epoch than this call's or
// the previous one, or a signal whose rows cannot fit records what it saw; the call stops every
// processor, fills y with NaN and exits, and the host turns the words into the RuntimeError the CPU
// transport raises. The words are sticky: zeroed once with the heap, never per call, and a launch
// that finds them set aborts at once (a graph replay after an error never yields plausible y).
// Plain C++: the host and the kernel share it.
//
//   status[0]  kind (KernelErrorKind; the first actor to give up wins)
//   status[1]  the peer rank of the flag
//   status[2]  the local expert of that flag (the owner's local expert, for both flag kinds)
//   status[3]  bits 0..15: the epoch this rank waited for; bits 16..31: the epoch the flag held
//              (epoch mismatch), or its rows (bad signal)
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace flashmoe::cuda {

enum KernelErrorKind : uint32_t {
  kNoError = 0,
  kDispatchFlagTimeout = 1,  // a peer's dispatch flag did not come within the timeout
  kReturnFlagTimeout = 2,    // a peer's return flag did not come within the timeout
  kEpochMismatch = 3,        // a peer's flag holds an epoch that is neither this call's nor the previous
  kBadSignal = 4,            // a peer's dispatch flag announces rows past this rank's region
};
constexpr int kStatusWords = 4;

// The message of a rank's status words; empty when the call was healthy.
inline std::string describe_kernel_error(const uint32_t* status, int64_t rank, double timeout_seconds) {
  if (status[0] == kNoError) return std::string();
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%g", timeout_seconds);
  const std::string who = "flashmoe: the persistent kernel of rank " + std::to_string(rank);
  const std::string peer = std::to_string(status[1]), expert = std::to_string(status[2]);
  const std::string epoch = std::to_string(status[3] & 0xffffu), seen = std::to_string(status[3] >> 16);
  const char* tail = "; the heaps are in an unknown state: destroy the context";
  switch (status[0]) {
    case kDispatchFlagTimeout:
    case kReturnFlagTimeout:
      return who + " gave up after " + seconds + " s waiting for the " +
             (status[0] == kDispatchFlagTimeout ? "dispatch flag of source rank " : "return flag of owner rank ") +
             peer + ", local expert " + expert + " (epoch " + epoch + "): that rank is gone, stuck, or not calling the layer" +
             tail;
    case kEpochMismatch:
      return who + " found the flag of rank " + peer + ", local expert " + expert + " at epoch " + seen + " while at epoch " +
             epoch + ": the ranks' calls are out of step (a rank skipped or repeated a call)" + tail;
    case kBadSignal:
      return who + " got a dispatch flag from rank " + peer + ", local expert " + expert + " announcing " + seen +
             " rows past its region (epoch " + epoch + "): the ranks disagree on the heap layout (max_tokens)" + tail;
    default:
      return who + " left an unknown error word " + std::to_string(status[0]) + tail;
  }
}

}  // namespace flashmoe::cuda
