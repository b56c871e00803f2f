// Host side shared by the launchers of the persistent kernel (moe_kernel.cu) and of a loopback
// world (moe_loopback.cu): checked CUDA calls, the occupancy-sized grid, argument checks, the
// rank table of a host RankTable, and the cooperative launch. Included by .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "cuda/actors.cuh"
#include "cuda/kernel_params.h"
#include "cuda/moe_cuda.h"
#include "cuda/workspace.h"

namespace flashmoe::cuda::host {

constexpr int kDynamicSmemBytes = kTileSmemBytes + kSmemAlignment;

[[noreturn]] inline void cuda_failure(cudaError_t error, const char* call) {
  throw std::runtime_error(std::string("flashmoe: ") + call + " failed: " + cudaGetErrorName(error) + " (" +
                           cudaGetErrorString(error) + ")");
}

#define FLASHMOE_CUDA_CHECK(call)                   \
  do {                                              \
    const cudaError_t flashmoe_error = (call);      \
    if (flashmoe_error != cudaSuccess) cuda_failure(flashmoe_error, #call); \
  } while (0)

inline Math math_of(DType dtype, Fp32Math fp32_math) {
  switch (dtype) {
    case DType::bf16: return Math::bf16;
    case DType::f16: return Math::f16;
    case DType::f32: return fp32_math == Fp32Math::tf32 ? Math::tf32 : Math::f32;
    default: throw std::invalid_argument("flashmoe: the CUDA backend takes bf16, fp16 or fp32 inputs, not fp64");
  }
}

// Sets the CUDA device for a scope and restores the caller's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    FLASHMOE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) FLASHMOE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// CTAs one launch may hold, all co-resident: the occupancy API's blocks per SM times the SMs.
// Queried once per (device, kernel), outside any graph capture after the first call.
inline int resident_ctas(int device, Math math, bool loopback, const void* kernel) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, int> cache;
  const int64_t key = (int64_t(device) * 8 + int64_t(math)) * 2 + int64_t(loopback);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  DeviceScope scope(device);
  int cooperative = 0, sms = 0, per_sm = 0;
  FLASHMOE_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) throw std::runtime_error("flashmoe: device does not support cooperative launches");
  FLASHMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FLASHMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDynamicSmemBytes));
  FLASHMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kDynamicSmemBytes));
  if (per_sm < 1) throw std::runtime_error("flashmoe: the persistent kernel does not fit on an SM of this device");
  const int ctas = per_sm * sms;
  if (ctas < 2) throw std::runtime_error("flashmoe: the persistent kernel needs two co-resident CTAs");
  cache.emplace(key, ctas);
  return ctas;
}

// The CTAs of one launch: every resident one, or fewer when FLASHMOE_CUDA_MAX_CTAS (>= 2) caps
// them — for compute-sanitizer, whose instrumented kernel fits fewer per SM, and for the tests
// that check results do not depend on the grid.
inline int launch_ctas(int device, Math math, bool loopback, const void* kernel) {
  const int resident = resident_ctas(device, math, loopback, kernel);
  const char* cap = std::getenv("FLASHMOE_CUDA_MAX_CTAS");
  if (cap == nullptr || *cap == '\0') return resident;
  char* end = nullptr;
  const long value = std::strtol(cap, &end, 10);
  if (*end != '\0' || value < 2) {
    throw std::invalid_argument(std::string("flashmoe: FLASHMOE_CUDA_MAX_CTAS must be an integer >= 2 (the OS CTA "
                                            "and one processor), got '") + cap + "'");
  }
  return int(std::min<long>(value, resident));
}

inline void check_problem(const Problem& problem) {
  if (const char* error = validate(problem)) throw std::invalid_argument(std::string("flashmoe: ") + error);
  if (CheckedInt(problem.tokens) * CheckedInt(std::min(problem.top_k, problem.experts)) > CheckedInt(SignalWord::kMaxRows)) {
    throw std::invalid_argument("flashmoe: tokens * min(top_k, experts) must be < 2^24 rows per call");
  }
}

[[noreturn]] inline void invalid(const std::string& message) { throw std::invalid_argument("flashmoe: " + message); }

inline void require(bool ok, const char* message) {
  if (!ok) invalid(message);
}

// The pointers agree with the problem. A call without tokens needs no token tensors (at world size 1
// it is not launched; under expert parallelism it launches without reading them).
inline void check_pointers(const Problem& problem, const Pointers& pointers) {
  require((pointers.router_weight || problem.routing_given) && pointers.w1 && pointers.w2 && pointers.expert_counts &&
              pointers.dropped, "a required weight or output pointer is null");
  require(!problem.routing_given || (!pointers.router_weight && !pointers.router_bias && !pointers.router_logits),
          "with routing_given there is no router: router_weight, router_bias and router_logits must be null");
  require(problem.has_router_bias == (pointers.router_bias != nullptr), "has_router_bias disagrees with router_bias");
  require(problem.has_b1 == (pointers.b1 != nullptr), "has_b1 disagrees with b1");
  require(problem.has_b2 == (pointers.b2 != nullptr), "has_b2 disagrees with b2");
  require(problem.has_shared_expert() == (pointers.shared_w1 != nullptr) &&
              problem.has_shared_expert() == (pointers.shared_w2 != nullptr),
          "shared_ffn disagrees with shared_w1/shared_w2");
  require(problem.has_shared_gate == (pointers.shared_gate != nullptr), "has_shared_gate disagrees with shared_gate");
  require(problem.has_selection_bias == (pointers.selection_bias != nullptr),
          "has_selection_bias disagrees with selection_bias");
  require(problem.tokens == 0 || (pointers.x && pointers.y && pointers.topk_ids && pointers.topk_weights &&
                                  (pointers.router_logits || problem.routing_given)),
          "a required token tensor pointer is null");
}

inline void check_workspace(const KernelParams& params, int64_t workspace_bytes, const std::string& what) {
  if (params.pointers.workspace == nullptr) invalid(what + " is null");
  if (reinterpret_cast<uintptr_t>(params.pointers.workspace) % Workspace::kAlignment != 0) {
    invalid(what + " must be " + std::to_string(Workspace::kAlignment) + "-byte aligned");
  }
  if (workspace_bytes < params.workspace.total) {
    invalid(what + " has " + std::to_string(workspace_bytes) + " bytes, needs " +
            std::to_string(params.workspace.total));
  }
}

// Debug builds' per-wait limit (KernelParams::wait_limit_ns), from FLASHMOE_CUDA_WAIT_TIMEOUT_S.
inline void apply_wait_timeout(KernelParams& params) {
  const char* timeout = std::getenv("FLASHMOE_CUDA_WAIT_TIMEOUT_S");
  if (timeout == nullptr || *timeout == '\0') return;
  char* end = nullptr;
  const double seconds = std::strtod(timeout, &end);
  if (*end != '\0' || !(seconds > 0) || seconds > 1e6) {
    throw std::invalid_argument(std::string("flashmoe: FLASHMOE_CUDA_WAIT_TIMEOUT_S must be a number of seconds in "
                                            "(0, 1e6], got '") + timeout + "'");
  }
  params.wait_limit_ns = uint64_t(seconds * 1e9);
}

inline void check_world(int64_t world, int64_t max_tokens) {
  if (world < 1 || world > kMaxWorld) {
    invalid("world_size must be 1.." + std::to_string(kMaxWorld) + ", got " + std::to_string(world));
  }
  if (max_tokens < 1) invalid("max_tokens must be >= 1, got " + std::to_string(max_tokens));
}

// The kernel's rank table of a host RankTable, every field checked.
inline Ranks ranks_of(const RankTable& table) {
  check_world(table.world, table.max_tokens);
  if (table.rank < 0 || table.rank >= table.world) {
    invalid("rank must be in [0, world_size=" + std::to_string(table.world) + "), got " + std::to_string(table.rank));
  }
  if (int64_t(table.heaps.size()) != int64_t(table.world)) {
    invalid("heaps must hold world_size=" + std::to_string(table.world) + " addresses, got " +
            std::to_string(table.heaps.size()));
  }
  if (!(table.peer_timeout_s > 0) || !(table.peer_timeout_s <= 1e6)) {
    invalid("peer_timeout_s must be a number of seconds in (0, 1e6], got " + std::to_string(table.peer_timeout_s));
  }
  Ranks ranks;
  ranks.rank = table.rank;
  ranks.world = table.world;
  if (table.world == 1) return ranks;  // the single-GPU kernel: its heap lives in the workspace
  for (int32_t r = 0; r < table.world; ++r) {
    if (table.heaps[size_t(r)] == 0) invalid("heaps[" + std::to_string(r) + "] is null (not reachable by load/store)");
    if (table.heaps[size_t(r)] % uintptr_t(HeapLayout::kAlignment) != 0) {
      invalid("heaps[" + std::to_string(r) + "] must be " + std::to_string(HeapLayout::kAlignment) + "-byte aligned");
    }
    ranks.heaps[r] = reinterpret_cast<uint8_t*>(table.heaps[size_t(r)]);
  }
  if (table.epoch == nullptr) invalid("epoch is null: a world of several ranks needs its epoch word");
  if (table.status == nullptr) invalid("status is null: a world of several ranks needs its status words");
  ranks.epoch = table.epoch;
  ranks.status = table.status;
  ranks.peer_timeout_ns = uint64_t(table.peer_timeout_s * 1e9);
  if (ranks.peer_timeout_ns == 0) ranks.peer_timeout_ns = 1;
  return ranks;
}

// One rank's parameters with `processors` processor CTAs; make_params checks the rest (E % W, max_tokens).
inline KernelParams ep_params(const Problem& problem, const Pointers& pointers, const RankTable& table, int processors) {
  check_problem(problem);
  check_pointers(problem, pointers);
  const Ranks ranks = ranks_of(table);
  KernelParams params = make_params(problem, pointers, processors, ranks, table.max_tokens);
  apply_wait_timeout(params);
  return params;
}

// One cooperative launch of `kernel` on `ctas` CTAs: co-residency of every CTA is guaranteed, or it fails.
template <typename Params>
inline void launch_cooperative(void (*kernel)(Params), const Params& params, int ctas, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kDynamicSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  FLASHMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
}

}  // namespace flashmoe::cuda::host
