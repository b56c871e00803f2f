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

// A loopback launch's parameter block: every virtual rank's KernelParams, by value (no device buffer
// to fill, so a graph captures the launch alone). Within the 32 764 bytes a launch may pass.
struct LoopbackParams {
  KernelParams ranks[kMaxLoopbackWorld];
  int32_t world = 0;
  int32_t ctas_per_rank = 0;
};
static_assert(sizeof(LoopbackParams) <= 32764, "a loopback launch's parameters exceed the kernel parameter limit");

// W virtual ranks on one GPU: CTA i is CTA i % ctas_per_rank of rank i / ctas_per_rank, and runs the
// same kernel_body as a rank of its own GPU; a peer's heap is the other rank's allocation here.
template <Math M>
__global__ void __launch_bounds__(kThreads, 1) moe_loopback_kernel(const __grid_constant__ LoopbackParams params) {
  extern __shared__ uint8_t dynamic_smem[];
  __shared__ alignas(alignof(Task)) uint8_t task_storage[sizeof(Task)];
  __shared__ uint32_t sequence;
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(dynamic_smem));
  uint8_t* smem = dynamic_smem + ((kSmemAlignment - raw % kSmemAlignment) % kSmemAlignment);
  const int32_t rank = int32_t(blockIdx.x) / params.ctas_per_rank;
  const int32_t block = int32_t(blockIdx.x) % params.ctas_per_rank;
  kernel_body<M>(params.ranks[rank], block, smem, *reinterpret_cast<Task*>(task_storage), sequence);
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

const void* kernel_of(Math math, bool loopback) {
  switch (math) {
    case Math::bf16:
      return loopback ? reinterpret_cast<const void*>(&moe_loopback_kernel<Math::bf16>)
                      : reinterpret_cast<const void*>(&moe_persistent_kernel<Math::bf16>);
    case Math::f16:
      return loopback ? reinterpret_cast<const void*>(&moe_loopback_kernel<Math::f16>)
                      : reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f16>);
    case Math::tf32:
      return loopback ? reinterpret_cast<const void*>(&moe_loopback_kernel<Math::tf32>)
                      : reinterpret_cast<const void*>(&moe_persistent_kernel<Math::tf32>);
    case Math::f32:
      return loopback ? reinterpret_cast<const void*>(&moe_loopback_kernel<Math::f32>)
                      : reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f32>);
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
int resident_ctas(int device, Math math, bool loopback) {
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
  const void* kernel = kernel_of(math, loopback);
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
int launch_ctas(int device, Math math, bool loopback = false) {
  const int resident = resident_ctas(device, math, loopback);
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

[[noreturn]] void invalid(const std::string& message) { throw std::invalid_argument("flashmoe: " + message); }

void require(bool ok, const char* message) {
  if (!ok) invalid(message);
}

// The pointers agree with the problem. A call without tokens needs no token tensors (at world size 1
// it is not launched; under expert parallelism it launches without reading them).
void check_pointers(const Problem& problem, const Pointers& pointers) {
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

void check_workspace(const KernelParams& params, int64_t workspace_bytes, const std::string& what) {
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
void apply_wait_timeout(KernelParams& params) {
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

void check_world(int64_t world, int64_t max_tokens) {
  if (world < 1 || world > kMaxWorld) {
    invalid("world_size must be 1.." + std::to_string(kMaxWorld) + ", got " + std::to_string(world));
  }
  if (max_tokens < 1) invalid("max_tokens must be >= 1, got " + std::to_string(max_tokens));
}

// The kernel's rank table of a host RankTable, every field checked.
Ranks ranks_of(const RankTable& table) {
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
KernelParams ep_params(const Problem& problem, const Pointers& pointers, const RankTable& table, int processors) {
  check_problem(problem);
  check_pointers(problem, pointers);
  const Ranks ranks = ranks_of(table);
  KernelParams params = make_params(problem, pointers, processors, ranks, table.max_tokens);
  apply_wait_timeout(params);
  return params;
}

// One cooperative launch of `kernel` on `ctas` CTAs: co-residency of every CTA is guaranteed, or it fails.
template <typename Params>
void launch_cooperative(void (*kernel)(Params), const Params& params, int ctas, cudaStream_t stream) {
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
  check_pointers(problem, pointers);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceScope scope(device);
  if (problem.tokens == 0) {
    FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.expert_counts, 0, sizeof(int32_t) * problem.experts, stream));
    FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.dropped, 0, sizeof(int64_t), stream));
    return;
  }
  const int ctas = launch_ctas(device, math);
  KernelParams params = make_params(problem, pointers, ctas - 1);
  apply_wait_timeout(params);
  check_workspace(params, workspace_bytes, "workspace");
  FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.workspace, 0, size_t(params.workspace.zeroed_bytes()), stream));
  switch (math) {
    case Math::bf16: launch_cooperative(moe_persistent_kernel<Math::bf16>, params, ctas, stream); break;
    case Math::f16: launch_cooperative(moe_persistent_kernel<Math::f16>, params, ctas, stream); break;
    case Math::tf32: launch_cooperative(moe_persistent_kernel<Math::tf32>, params, ctas, stream); break;
    case Math::f32: launch_cooperative(moe_persistent_kernel<Math::f32>, params, ctas, stream); break;
  }
}

int64_t ep_heap_bytes(const Problem& problem, int64_t world, int64_t max_tokens) {
  check_problem(problem);
  check_world(world, max_tokens);
  if (problem.experts % world != 0) {
    invalid("world_size " + std::to_string(world) + " must divide experts (" + std::to_string(problem.experts) + ")");
  }
  const HeapLayout layout{ExpertPlacement{world, problem.experts}, max_tokens, problem.top_k, problem.hidden,
                          dtype_size(problem.dtype)};
  layout.check();
  return layout.total_bytes();
}

int64_t ep_workspace_bytes(const Problem& problem, int64_t world, int64_t max_tokens, int device, Fp32Math fp32_math) {
  check_problem(problem);
  check_world(world, max_tokens);
  const Math math = math_of(problem.dtype, fp32_math);
  // Stand-in heap and status addresses: only the layout is wanted here.
  RankTable table;
  table.world = int32_t(world);
  table.max_tokens = max_tokens;
  table.heaps.assign(size_t(world), uintptr_t(HeapLayout::kAlignment));
  uint32_t words[kStatusWords + 1] = {};
  table.epoch = &words[0];
  table.status = &words[1];
  return make_params(problem, Pointers{}, launch_ctas(device, math) - 1, ranks_of(table), max_tokens).workspace.total;
}

void moe_forward_ep(const Problem& problem, const Pointers& pointers, const RankTable& table, int64_t workspace_bytes,
                    Fp32Math fp32_math, int device, uintptr_t stream_handle) {
  check_problem(problem);
  const Math math = math_of(problem.dtype, fp32_math);
  if (table.world == 1) {  // the single-GPU kernel: nothing to reach, nothing kept across calls
    check_world(table.world, table.max_tokens);
    if (table.rank != 0) invalid("rank must be 0 at world_size 1, got " + std::to_string(table.rank));
    moe_forward(problem, pointers, workspace_bytes, fp32_math, device, stream_handle);
    return;
  }
  check_pointers(problem, pointers);
  ranks_of(table);  // every argument is checked before the device is touched
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceScope scope(device);
  const int ctas = launch_ctas(device, math);
  // A rank without tokens launches too: it owns experts, and every peer waits for its flags.
  KernelParams params = ep_params(problem, pointers, table, ctas - 1);
  check_workspace(params, workspace_bytes, "workspace");
  FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.workspace, 0, size_t(params.workspace.zeroed_bytes()), stream));
  switch (math) {
    case Math::bf16: launch_cooperative(moe_persistent_kernel<Math::bf16>, params, ctas, stream); break;
    case Math::f16: launch_cooperative(moe_persistent_kernel<Math::f16>, params, ctas, stream); break;
    case Math::tf32: launch_cooperative(moe_persistent_kernel<Math::tf32>, params, ctas, stream); break;
    case Math::f32: launch_cooperative(moe_persistent_kernel<Math::f32>, params, ctas, stream); break;
  }
}

void moe_forward_loopback(const std::vector<Problem>& problems, const std::vector<Pointers>& pointers,
                          const std::vector<RankTable>& ranks, const std::vector<int64_t>& workspace_bytes,
                          Fp32Math fp32_math, int device, uintptr_t stream_handle) {
  const int64_t world = int64_t(problems.size());
  if (world < 2 || world > kMaxLoopbackWorld) {
    invalid("a loopback world holds 2.." + std::to_string(kMaxLoopbackWorld) + " virtual ranks, got " +
            std::to_string(world));
  }
  if (int64_t(pointers.size()) != world || int64_t(ranks.size()) != world || int64_t(workspace_bytes.size()) != world) {
    invalid("problems, pointers, ranks and workspace_bytes must each hold world_size=" + std::to_string(world) +
            " entries");
  }
  const Problem& first = problems[0];
  const Math math = math_of(first.dtype, fp32_math);
  for (int64_t r = 0; r < world; ++r) {
    const Problem& p = problems[size_t(r)];
    const RankTable& t = ranks[size_t(r)];
    const std::string which = "rank " + std::to_string(r) + "'s ";
    if (p.dtype != first.dtype || p.hidden != first.hidden || p.ffn != first.ffn || p.experts != first.experts ||
        p.top_k != first.top_k || p.gated != first.gated || p.activation != first.activation ||
        p.shared_ffn != first.shared_ffn || p.routing_given != first.routing_given) {
      invalid(which + "problem differs from rank 0's in shape (every rank runs one layer: only tokens and "
              "expert_capacity may differ)");
    }
    if (t.world != world || t.rank != r) {
      invalid(which + "rank table must say rank " + std::to_string(r) + " of world_size " + std::to_string(world) +
              ", got rank " + std::to_string(t.rank) + " of " + std::to_string(t.world));
    }
    if (t.heaps != ranks[0].heaps || t.max_tokens != ranks[0].max_tokens) {
      invalid(which + "rank table differs from rank 0's in heaps or max_tokens (every rank reaches the same heaps)");
    }
    // Every argument is checked before the device is touched.
    check_problem(p);
    check_pointers(p, pointers[size_t(r)]);
    ranks_of(t);
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  DeviceScope scope(device);
  const int ctas = launch_ctas(device, math, true);
  const int ctas_per_rank = ctas / int(world);
  if (ctas_per_rank < 2) {
    invalid("a loopback world of " + std::to_string(world) + " ranks needs " + std::to_string(2 * world) +
            " co-resident CTAs (an OS CTA and a processor per rank); this launch holds " + std::to_string(ctas) +
            " (device " + std::to_string(device) + ", FLASHMOE_CUDA_MAX_CTAS caps it)");
  }
  LoopbackParams params;
  params.world = int32_t(world);
  params.ctas_per_rank = ctas_per_rank;
  for (int64_t r = 0; r < world; ++r) {
    params.ranks[r] = ep_params(problems[size_t(r)], pointers[size_t(r)], ranks[size_t(r)], ctas_per_rank - 1);
    check_workspace(params.ranks[r], workspace_bytes[size_t(r)], "rank " + std::to_string(r) + "'s workspace");
  }
  for (int64_t r = 0; r < world; ++r) {
    FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers[size_t(r)].workspace, 0,
                                        size_t(params.ranks[r].workspace.zeroed_bytes()), stream));
  }
  const int grid = ctas_per_rank * int(world);
  switch (math) {
    case Math::bf16: launch_cooperative(moe_loopback_kernel<Math::bf16>, params, grid, stream); break;
    case Math::f16: launch_cooperative(moe_loopback_kernel<Math::f16>, params, grid, stream); break;
    case Math::tf32: launch_cooperative(moe_loopback_kernel<Math::tf32>, params, grid, stream); break;
    case Math::f32: launch_cooperative(moe_loopback_kernel<Math::f32>, params, grid, stream); break;
  }
}

}  // namespace flashmoe::cuda
