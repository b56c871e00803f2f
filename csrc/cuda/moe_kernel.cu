// The persistent MoE kernel and its host launcher: gate, dispatch, expert GEMMs and combine of a
// whole forward in one cooperative launch on the caller's stream.
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

namespace flashmoe::cuda {

constexpr int kDynamicSmemBytes = kTileSmemBytes + kSmemAlignment;

template <Math M>
__global__ void __launch_bounds__(kThreads, 1) moe_persistent_kernel(const __grid_constant__ KernelParams params) {
  extern __shared__ uint8_t dynamic_smem[];
  // Raw storage: a __shared__ variable cannot run Task's member initializers.
  __shared__ alignas(alignof(Task)) uint8_t task_storage[sizeof(Task)];
  __shared__ uint32_t sequence;
  // Aligned in the shared window, the address space the wgmma descriptors encode.
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(dynamic_smem));
  uint8_t* smem = dynamic_smem + ((kSmemAlignment - raw % kSmemAlignment) % kSmemAlignment);
  kernel_body<M>(params, int32_t(blockIdx.x), smem, *reinterpret_cast<Task*>(task_storage), sequence);
}

namespace {

[[noreturn]] void cuda_failure(cudaError_t error, const char* call) {
  throw std::runtime_error(std::string("flashmoe: ") + call + " failed: " + cudaGetErrorName(error) + " (" +
                           cudaGetErrorString(error) + ")");
}

#define FLASHMOE_CUDA_CHECK(call)                   \
  do {                                              \
    const cudaError_t flashmoe_error = (call);      \
    if (flashmoe_error != cudaSuccess) cuda_failure(flashmoe_error, #call); \
  } while (0)

Math math_of(DType dtype, Fp32Math fp32_math) {
  switch (dtype) {
    case DType::bf16: return Math::bf16;
    case DType::f16: return Math::f16;
    case DType::f32: return fp32_math == Fp32Math::tf32 ? Math::tf32 : Math::f32;
    default: throw std::invalid_argument("flashmoe: the CUDA backend takes bf16, fp16 or fp32 inputs, not fp64");
  }
}

const void* kernel_of(Math math) {
  switch (math) {
    case Math::bf16: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::bf16>);
    case Math::f16: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f16>);
    case Math::tf32: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::tf32>);
    case Math::f32: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f32>);
  }
  throw std::invalid_argument("flashmoe: unknown math");
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
int resident_ctas(int device, Math math) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, int> cache;
  const int64_t key = int64_t(device) * 8 + int64_t(math);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  DeviceScope scope(device);
  int cooperative = 0, sms = 0, per_sm = 0;
  FLASHMOE_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) throw std::runtime_error("flashmoe: device does not support cooperative launches");
  FLASHMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const void* kernel = kernel_of(math);
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
int launch_ctas(int device, Math math) {
  const int resident = resident_ctas(device, math);
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

void check_problem(const Problem& problem) {
  if (const char* error = validate(problem)) throw std::invalid_argument(std::string("flashmoe: ") + error);
  if (CheckedInt(problem.tokens) * CheckedInt(std::min(problem.top_k, problem.experts)) > CheckedInt(SignalWord::kMaxRows)) {
    throw std::invalid_argument("flashmoe: tokens * min(top_k, experts) must be < 2^24 rows per call");
  }
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  std::string archs = FLASHMOE_CUDA_ARCHS_STRING;
  for (size_t begin = 0; begin <= archs.size();) {
    const size_t end = std::min(archs.find(';', begin), archs.size());
    if (end > begin) info.archs.push_back(archs.substr(begin, end - begin));
    begin = end + 1;
  }
  info.cuda_version = FLASHMOE_CUDA_VERSION_STRING;
  info.cutlass_version = FLASHMOE_CUTLASS_VERSION;
  return info;
}

int64_t workspace_bytes(const Problem& problem, int device, Fp32Math fp32_math) {
  check_problem(problem);
  const Math math = math_of(problem.dtype, fp32_math);
  return make_params(problem, Pointers{}, launch_ctas(device, math) - 1).workspace.total;
}

void moe_forward(const Problem& problem, const Pointers& pointers, int64_t workspace_bytes, Fp32Math fp32_math,
                 int device, uintptr_t stream_handle) {
  check_problem(problem);
  const Math math = math_of(problem.dtype, fp32_math);
  auto require = [](bool ok, const char* message) {
    if (!ok) throw std::invalid_argument(std::string("flashmoe: ") + message);
  };
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
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceScope scope(device);
  if (problem.tokens == 0) {
    FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.expert_counts, 0, sizeof(int32_t) * problem.experts, stream));
    FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.dropped, 0, sizeof(int64_t), stream));
    return;
  }
  require(pointers.x && pointers.y && pointers.topk_ids && pointers.topk_weights &&
              (pointers.router_logits || problem.routing_given) && pointers.workspace,
          "a required token tensor or workspace pointer is null");
  require((reinterpret_cast<uintptr_t>(pointers.workspace) % Workspace::kAlignment) == 0,
          "workspace must be 256-byte aligned");
  const int ctas = launch_ctas(device, math);
  KernelParams params = make_params(problem, pointers, ctas - 1);
  if (const char* timeout = std::getenv("FLASHMOE_CUDA_WAIT_TIMEOUT_S"); timeout && *timeout) {
    char* end = nullptr;
    const double seconds = std::strtod(timeout, &end);
    if (*end != '\0' || !(seconds > 0) || seconds > 1e6) {
      throw std::invalid_argument(std::string("flashmoe: FLASHMOE_CUDA_WAIT_TIMEOUT_S must be a number of seconds in "
                                              "(0, 1e6], got '") + timeout + "'");
    }
    params.wait_limit_ns = uint64_t(seconds * 1e9);
  }
  if (workspace_bytes < params.workspace.total) {
    throw std::invalid_argument("flashmoe: workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
                                std::to_string(params.workspace.total));
  }
  FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.workspace, 0, size_t(params.workspace.zeroed_bytes()), stream));

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kDynamicSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeCooperative;  // co-residency of every CTA is guaranteed, or the launch fails
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  switch (math) {
    case Math::bf16: FLASHMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, moe_persistent_kernel<Math::bf16>, params)); break;
    case Math::f16: FLASHMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, moe_persistent_kernel<Math::f16>, params)); break;
    case Math::tf32: FLASHMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, moe_persistent_kernel<Math::tf32>, params)); break;
    case Math::f32: FLASHMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, moe_persistent_kernel<Math::f32>, params)); break;
  }
}

}  // namespace flashmoe::cuda
