// A source rank's own arithmetic, shared by every schedule of the CPU backend (the dataflow
// runtime and the all_to_all transport), so that both produce the same bits:
//
//   gate_tile      router GEMM (fp32 accumulation) + bias, scores, top-k of a tile of tokens
//   combine_token  y[t] = Σ_j weight[t,j] · (expert output of pick j), ascending j, fp32 sum
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/problem.h"
#include "core/routing.h"
#include "cpu/tile_gemm.h"

namespace flashmoe::cpu {

// Tokens [t0, t0 + m) of x [T, H]: logits rows [T, E], topk_ids / topk_weights rows [T, k].
// scores: E scratch values.
template <typename T>
void gate_tile(const Problem& p, const T* x, int64_t t0, int64_t m, const T* router_weight, const T* router_bias,
               accum_t<T>* router_logits, int32_t* topk_ids, accum_t<T>* topk_weights, accum_t<T>* scores) {
  using Acc = accum_t<T>;
  const int64_t E = p.experts, H = p.hidden, k = p.top_k;
  std::vector<const T*> rows(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) rows[size_t(i)] = x + (t0 + i) * H;
  Acc* logits = router_logits + t0 * E;
  tile_gemm_nt<T>(rows.data(), m, router_weight, H, E, H, logits, E, false);
  for (int64_t i = 0; i < m; ++i) {
    Acc* row = logits + i * E;
    if (router_bias) for (int64_t e = 0; e < E; ++e) row[e] += load_value(router_bias[e]);
    score_experts(row, E, p.scoring, scores);
    select_top_k(scores, E, k, p.normalize, topk_ids + (t0 + i) * k, topk_weights + (t0 + i) * k);
  }
}

// y_row = Σ_{j : pick_row[j] >= 0} weights[j] · output_row(j), in ascending j, then + shared_weight ·
// shared_row (the shared expert's output, when given), one fp32 sum rounded once; sum: H scratch.
template <typename T, typename OutputRow>
void combine_token(int64_t hidden, int64_t top_k, const int32_t* pick_row, const accum_t<T>* weights,
                   OutputRow output_row, accum_t<T>* sum, T* y_row, const T* shared_row = nullptr,
                   accum_t<T> shared_weight = accum_t<T>(1)) {
  using Acc = accum_t<T>;
  std::fill(sum, sum + hidden, Acc(0));
  for (int64_t j = 0; j < top_k; ++j) {
    if (pick_row[j] < 0) continue;
    const T* src = output_row(j);
    const Acc weight = weights[j];
    for (int64_t n = 0; n < hidden; ++n) sum[n] += weight * load_value(src[n]);
  }
  if (shared_row) for (int64_t n = 0; n < hidden; ++n) sum[n] += shared_weight * load_value(shared_row[n]);
  for (int64_t n = 0; n < hidden; ++n) y_row[n] = store_value<T>(sum[n]);
}

// The shared expert's weight of tokens [t0, t0 + m) of x [T, H]: σ(x·shared_gateᵀ) with the logit
// accumulated in fp32 (fp64 for f64) by the router's GEMM, or 1 without a gate. weights: m values.
template <typename T>
void shared_weights(const Problem& p, const T* x, int64_t t0, int64_t m, const T* shared_gate, accum_t<T>* weights) {
  using Acc = accum_t<T>;
  if (!p.has_shared_gate) {
    std::fill(weights, weights + m, Acc(1));
    return;
  }
  std::vector<const T*> rows(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) rows[size_t(i)] = x + (t0 + i) * p.hidden;
  tile_gemm_nt<T>(rows.data(), m, shared_gate, p.hidden, 1, p.hidden, weights, 1, false);
  for (int64_t i = 0; i < m; ++i) weights[i] = Acc(1) / (Acc(1) + std::exp(-weights[i]));
}

}  // namespace flashmoe::cpu
