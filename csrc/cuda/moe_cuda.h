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

}  // namespace flashmoe::cuda
