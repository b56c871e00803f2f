// A source rank's own arithmetic, shared by every schedule of the CPU backend (the dataflow
// runtime and the all_to_all transport), so that both produce the same bits:
//
//   gate_tile      router GEMM (fp32 accumulation) + bias, then route_token (core/routing.h) for
//                  each token of a tile
//   dispatch_row   the row an expert receives: x[t], or round(x[t] · w) with weight_on_input
//   combine_token  y[t] = Σ_j weight[t,j] · (expert output of pick j), ascending j, fp32 sum
//                  (weight 1 with weight_on_input)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "core/problem.h"
#include "core/routing.h"
#include "cpu/tile_gemm.h"

namespace flashmoe::cpu {

// Tokens [t0, t0 + m) of x [T, H]: logits rows [T, E], topk_ids / topk_weights rows [T, k].
// router_weight [E, H] and router_bias [E] are T, or float with p.router_f32 (bf16/f16 x): the tile's
// x rows are then upcast to float for the fp32 tile GEMM. selection_bias: [E] accumulation values
// or null. scratch: route_scratch(p) values.
template <typename T>
void gate_tile(const Problem& p, const T* x, int64_t t0, int64_t m, const void* router_weight, const void* router_bias,
               const accum_t<T>* selection_bias, accum_t<T>* router_logits, int32_t* topk_ids,
               accum_t<T>* topk_weights, accum_t<T>* scratch) {
  using Acc = accum_t<T>;
  const int64_t E = p.experts, H = p.hidden, k = p.top_k;
  Acc* logits = router_logits + t0 * E;
  bool upcast = false;
  if constexpr (std::is_same_v<Acc, float> && !std::is_same_v<T, float>) {
    if (p.router_f32) {
      upcast = true;
      std::vector<float> rows32(static_cast<size_t>(m * H));
      std::vector<const float*> rows(static_cast<size_t>(m));
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t h = 0; h < H; ++h) rows32[size_t(i * H + h)] = load_value(x[(t0 + i) * H + h]);
        rows[size_t(i)] = rows32.data() + i * H;
      }
      tile_gemm_nt<float>(rows.data(), m, static_cast<const float*>(router_weight), H, E, H, logits, E, false);
    }
  }
  if (!upcast) {
    std::vector<const T*> rows(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) rows[size_t(i)] = x + (t0 + i) * H;
    tile_gemm_nt<T>(rows.data(), m, static_cast<const T*>(router_weight), H, E, H, logits, E, false);
  }
  for (int64_t i = 0; i < m; ++i) {
    Acc* row = logits + i * E;
    if (router_bias) {
      for (int64_t e = 0; e < E; ++e) {
        row[e] += upcast ? Acc(static_cast<const float*>(router_bias)[e]) : load_value(static_cast<const T*>(router_bias)[e]);
      }
    }
    route_token(p, row, selection_bias, scratch, topk_ids + (t0 + i) * k, topk_weights + (t0 + i) * k);
  }
}

// The row expert topk_ids[t, j] = expert receives for token t (x_row: x[t], H values): the token
// itself, or with p.weight_on_input round(x[t] · topk_weights[t, j]), the product in the
// accumulation dtype. The pick's slot j is the first of its row naming `expert` (a repeat is never
// routed: core/capacity.h).
template <typename T>
void dispatch_row(const Problem& p, const T* x_row, const int32_t* topk_ids_row, const accum_t<T>* topk_weights_row,
                  int64_t expert, T* destination) {
  if (!p.weight_on_input) {
    std::memcpy(destination, x_row, size_t(p.hidden) * sizeof(T));
    return;
  }
  int64_t slot = 0;
  while (slot + 1 < p.top_k && topk_ids_row[slot] != int32_t(expert)) ++slot;
  const accum_t<T> weight = topk_weights_row[slot];
  for (int64_t n = 0; n < p.hidden; ++n) destination[n] = store_value<T>(load_value(x_row[n]) * weight);
}

// y_row = Σ_{j : pick_row[j] >= 0} weights[j] · output_row(j), in ascending j (weight 1 for every
// pick when weight_on_input: the weight went into the expert's input row), then + shared_weight ·
// shared_row (the shared expert's output, when given), one fp32 sum rounded once; sum: H scratch.
template <typename T, typename OutputRow>
void combine_token(int64_t hidden, int64_t top_k, const int32_t* pick_row, const accum_t<T>* weights,
                   bool weight_on_input, OutputRow output_row, accum_t<T>* sum, T* y_row,
                   const T* shared_row = nullptr, accum_t<T> shared_weight = accum_t<T>(1)) {
  using Acc = accum_t<T>;
  std::fill(sum, sum + hidden, Acc(0));
  for (int64_t j = 0; j < top_k; ++j) {
    if (pick_row[j] < 0) continue;
    const T* src = output_row(j);
    const Acc weight = weight_on_input ? Acc(1) : weights[j];
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
