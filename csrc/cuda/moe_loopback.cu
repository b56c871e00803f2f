// A loopback world: W virtual ranks of the expert-parallel kernel in one cooperative launch on one
// GPU (docs/cuda_kernel.md "Loopback"). Its own file, so that nvcc builds it beside moe_kernel.cu.
#include "cuda/launch.cuh"

namespace flashmoe::cuda {

using namespace host;

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

const void* loopback_kernel_of(Math math) {
  switch (math) {
    case Math::bf16: return reinterpret_cast<const void*>(&moe_loopback_kernel<Math::bf16>);
    case Math::f16: return reinterpret_cast<const void*>(&moe_loopback_kernel<Math::f16>);
    case Math::tf32: return reinterpret_cast<const void*>(&moe_loopback_kernel<Math::tf32>);
    case Math::f32: return reinterpret_cast<const void*>(&moe_loopback_kernel<Math::f32>);
  }
  throw std::invalid_argument("flashmoe: unknown math");
}

}  // namespace

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
  const int ctas = launch_ctas(device, math, true, loopback_kernel_of(math));
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
