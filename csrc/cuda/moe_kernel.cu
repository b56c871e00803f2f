// The persistent MoE kernel and its host launcher: gate, dispatch, expert GEMMs and combine of a
// whole forward in one cooperative launch on the caller's stream.
#include "cuda/launch.cuh"

namespace flashmoe::cuda {

using namespace host;

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

const void* persistent_kernel_of(Math math) {
  switch (math) {
    case Math::bf16: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::bf16>);
    case Math::f16: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f16>);
    case Math::tf32: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::tf32>);
    case Math::f32: return reinterpret_cast<const void*>(&moe_persistent_kernel<Math::f32>);
  }
  throw std::invalid_argument("flashmoe: unknown math");
}

// The persistent kernel's grid on `device` (launch.cuh launch_ctas).
int persistent_ctas(int device, Math math) { return launch_ctas(device, math, false, persistent_kernel_of(math)); }

// The persistent kernel of `math`, cooperatively, on `ctas` CTAs.
void launch_persistent(Math math, const KernelParams& params, int ctas, cudaStream_t stream) {
  switch (math) {
    case Math::bf16: launch_cooperative(moe_persistent_kernel<Math::bf16>, params, ctas, stream); break;
    case Math::f16: launch_cooperative(moe_persistent_kernel<Math::f16>, params, ctas, stream); break;
    case Math::tf32: launch_cooperative(moe_persistent_kernel<Math::tf32>, params, ctas, stream); break;
    case Math::f32: launch_cooperative(moe_persistent_kernel<Math::f32>, params, ctas, stream); break;
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
  return make_params(problem, Pointers{}, persistent_ctas(device, math) - 1).workspace.total;
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
  const int ctas = persistent_ctas(device, math);
  KernelParams params = make_params(problem, pointers, ctas - 1);
  apply_wait_timeout(params);
  check_workspace(params, workspace_bytes, "workspace");
  FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.workspace, 0, size_t(params.workspace.zeroed_bytes()), stream));
  launch_persistent(math, params, ctas, stream);
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
  return make_params(problem, Pointers{}, persistent_ctas(device, math) - 1, ranks_of(table), max_tokens).workspace.total;
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
  const int ctas = persistent_ctas(device, math);
  // A rank without tokens launches too: it owns experts, and every peer waits for its flags.
  KernelParams params = ep_params(problem, pointers, table, ctas - 1);
  check_workspace(params, workspace_bytes, "workspace");
  FLASHMOE_CUDA_CHECK(cudaMemsetAsync(pointers.workspace, 0, size_t(params.workspace.zeroed_bytes()), stream));
  launch_persistent(math, params, ctas, stream);
}

}  // namespace flashmoe::cuda
