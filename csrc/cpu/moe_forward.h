// The CPU backend's MoE forward: route, assign capacity slots, expert tile GEMMs over the
// slotted tokens, then combine in fixed order. The same stages as the GPU kernel.
#pragma once

#include <cstdint>

#include "core/problem.h"

namespace flashmoe::cpu {

// Raw views of the operator's tensors, all contiguous. "acc" is float32, or float64 when
// the problem's dtype is f64. Optional inputs are nullptr when absent.
struct MoETensors {
  const void* x;              // [T, H]        dtype
  const void* router_weight;  // [E, H]        dtype
  const void* router_bias;    // [E]           dtype, optional
  const void* w1;             // [E, N0, H]    dtype, N0 = 2I when gated else I
  const void* b1;             // [E, N0]       dtype, optional
  const void* w2;             // [E, H, I]     dtype
  const void* b2;             // [E, H]        dtype, optional
  void* y;                    // [T, H]        dtype                 (output)
  int32_t* topk_ids;          // [T, k]                              (output)
  void* topk_weights;         // [T, k]        acc                   (output)
  int32_t* expert_counts;     // [E]           picks before dropping (output)
  void* router_logits;        // [T, E]        acc                   (output)
  int64_t* dropped;           // [1]                                 (output)
};

// How expert work is cut into tasks. Both give bit-identical results (the tile GEMM is
// batch-invariant), so the choice is purely about parallelism.
enum class ExpertSchedule : int32_t {
  automatic = 0,
  fused = 1,  // one task per (expert, row tile): GEMM0 -> activation -> GEMM1, h stays per worker
  split = 2,  // GEMM0 tasks per (expert, row tile, ffn chunk), then GEMM1 tasks per (.., hidden chunk)
};

void moe_forward(const Problem& problem, const MoETensors& tensors, int num_threads,
                 ExpertSchedule schedule = ExpertSchedule::automatic);

}  // namespace flashmoe::cpu
