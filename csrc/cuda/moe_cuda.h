// Host API of the CUDA backend. Plain C++ (no CUDA headers), so the pybind11 module includes it
// whether or not it links the backend, and a CPU-only torch imports flashmoe unchanged.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/problem.h"

namespace flashmoe::cuda {

// What this library was compiled with.
struct BuildInfo {
  std::vector<std::string> archs;  // e.g. {"sm_90a", "sm_80"}
  std::string cuda_version;        // nvcc's CUDA version, "13.0"
  std::string cutlass_version;     // the CuTe/CUTLASS headers, "4.2.0"
};
BuildInfo build_info();

// Raw device pointers of one call. Optional inputs are null when absent.
struct Pointers {
  const void* x = nullptr;              // [T, H] dtype
  const void* router_weight = nullptr;  // [E, H] dtype, or fp32 with problem.router_f32; null when routing_given
  const void* router_bias = nullptr;    // [E] dtype, or fp32 with problem.router_f32
  const void* w1 = nullptr;             // [E, I or 2I, H] dtype
  const void* b1 = nullptr;             // [E, I or 2I] dtype
  const void* w2 = nullptr;             // [E, H, I] dtype
  const void* b2 = nullptr;             // [E, H] dtype
  void* y = nullptr;                    // [T, H] dtype
  int32_t* topk_ids = nullptr;          // [T, k]; an input when problem.routing_given
  float* topk_weights = nullptr;        // [T, k]; an input when problem.routing_given
  int32_t* expert_counts = nullptr;     // [E]
  float* router_logits = nullptr;       // [T, E]; null when problem.routing_given
  int64_t* dropped = nullptr;           // []
  void* workspace = nullptr;            // workspace_bytes(...) bytes, 256-byte aligned, any contents
  // The shared expert (problem.shared_ffn > 0), null otherwise.
  const void* shared_w1 = nullptr;      // [2S or S, H] dtype
  const void* shared_w2 = nullptr;      // [H, S] dtype
  const void* shared_gate = nullptr;    // [1, H] dtype, when problem.has_shared_gate
  const float* selection_bias = nullptr;  // [E] fp32; null unless problem.has_selection_bias
};

// fp32 inputs: exact fp32 FMA math, or TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32).
enum class Fp32Math : int32_t { exact = 0, tf32 = 1 };

// Bytes of workspace one call of `problem` needs on `device`. Host-only: no allocation, no sync.
int64_t workspace_bytes(const Problem& problem, int device, Fp32Math fp32_math);

// Enqueues the whole forward on `stream` (a cudaStream_t): one memset of the control block and
// one cooperative persistent-kernel launch. No allocation, no synchronization: graph-capturable.
// Throws std::invalid_argument for a bad problem or pointer, std::runtime_error for a CUDA error.
void moe_forward(const Problem& problem, const Pointers& pointers, int64_t workspace_bytes, Fp32Math fp32_math,
                 int device, uintptr_t stream);

// Expert parallelism (docs/cuda_kernel.md "Loopback", kernel_params.h Ranks): this rank's place in
// a world of `world` ranks whose heaps it reaches by load and store.
struct RankTable {
  int32_t rank = 0;
  int32_t world = 1;
  std::vector<uintptr_t> heaps;  // [world] device addresses: rank r's heap as this GPU reaches it
  uint32_t* epoch = nullptr;     // 1 word of device memory, zero before the first call, kept across calls
  uint32_t* status = nullptr;    // kStatusWords words of device memory, zeroed once with the heap (sticky)
  double peer_timeout_s = 60.0;  // how long a wait for a peer's flag may last before the call gives up
  int64_t max_tokens = 0;        // the most tokens any rank brings to one call; the same on every rank
};

// Bytes of one rank's heap (HeapLayout of the world): allocated once, its first 2·flags_bytes zeroed
// once, kept across calls. Host-only.
int64_t ep_heap_bytes(const Problem& problem, int64_t world, int64_t max_tokens);

// Bytes of workspace one rank's call needs (per call, any contents), on the whole grid of `device`.
// A loopback launch gives each rank fewer CTAs, so this bounds its ranks' workspaces too.
int64_t ep_workspace_bytes(const Problem& problem, int64_t world, int64_t max_tokens, int device, Fp32Math fp32_math);

// Enqueues this rank's part of an expert-parallel forward on `stream`: `pointers` hold this rank's
// tokens and its L = E / world experts' weights (problem.experts is E). Unlike moe_forward, a rank
// without tokens still launches: it owns experts and every peer waits for its flags.
void moe_forward_ep(const Problem& problem, const Pointers& pointers, const RankTable& ranks, int64_t workspace_bytes,
                    Fp32Math fp32_math, int device, uintptr_t stream);

// The most virtual ranks one loopback launch holds (its parameter block carries every rank's).
constexpr int64_t kMaxLoopbackWorld = 16;

// W virtual ranks on one GPU in one cooperative launch: the grid's CTAs split evenly among the ranks,
// CTA 0 of each share its OS CTA; rank r's problem, pointers, rank table and workspace are entry r.
// Every rank needs 2 co-resident CTAs (its OS CTA and one processor). Graph-capturable.
void moe_forward_loopback(const std::vector<Problem>& problems, const std::vector<Pointers>& pointers,
                          const std::vector<RankTable>& ranks, const std::vector<int64_t>& workspace_bytes,
                          Fp32Math fp32_math, int device, uintptr_t stream);

}  // namespace flashmoe::cuda
