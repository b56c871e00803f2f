// The CPU backend's single-rank MoE forward: the dataflow runtime (cpu/dataflow.h) at world
// size 1, on a cached cluster. One code path for one rank and for many.
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

void moe_forward(const Problem& problem, const MoETensors& tensors, int num_threads);

}  // namespace flashmoe::cpu
