// The bodies of the tasks a processor CTA runs. Every thread of the CTA calls one; the task
// descriptor (core/task.h) says which rows and columns. Each output element is written by exactly
// one task, with an arithmetic that does not depend on which CTA runs it.
#pragma once

#include <cstdint>

#include "core/activation.h"
#include "core/capacity.h"
#include "core/routing.h"
#include "core/task.h"
#include "cuda/kernel_params.h"
#include "cuda/storage.cuh"
#include "cuda/tile_mma.cuh"

namespace flashmoe::cuda {

// Typed views of the call's buffers.
template <Math M>
struct Buffers {
  using T = typename Storage<M>::Type;

  const KernelParams& params;
  uint8_t* base;

  FLASHMOE_DEVICE explicit Buffers(const KernelParams& p) : params(p), base(static_cast<uint8_t*>(p.pointers.workspace)) {}

  template <typename U>
  FLASHMOE_DEVICE U* at(int64_t offset) const { return reinterpret_cast<U*>(base + offset); }

  FLASHMOE_DEVICE const T* x() const { return static_cast<const T*>(params.pointers.x); }
  FLASHMOE_DEVICE const T* router_weight() const { return static_cast<const T*>(params.pointers.router_weight); }
  FLASHMOE_DEVICE const T* router_bias() const { return static_cast<const T*>(params.pointers.router_bias); }
  FLASHMOE_DEVICE const T* w1() const { return static_cast<const T*>(params.pointers.w1); }
  FLASHMOE_DEVICE const T* b1() const { return static_cast<const T*>(params.pointers.b1); }
  FLASHMOE_DEVICE const T* w2() const { return static_cast<const T*>(params.pointers.w2); }
  FLASHMOE_DEVICE const T* b2() const { return static_cast<const T*>(params.pointers.b2); }
  FLASHMOE_DEVICE T* y() const { return static_cast<T*>(params.pointers.y); }

  FLASHMOE_DEVICE int32_t* tile_counts() const { return at<int32_t>(params.workspace.tile_counts); }
  FLASHMOE_DEVICE int32_t* tile_base() const { return at<int32_t>(params.workspace.tile_base); }
  FLASHMOE_DEVICE int32_t* expert_offsets() const { return at<int32_t>(params.workspace.expert_offsets); }
  FLASHMOE_DEVICE int32_t* admitted() const { return at<int32_t>(params.workspace.admitted); }
  FLASHMOE_DEVICE float* scores() const { return at<float>(params.workspace.scores); }
  FLASHMOE_DEVICE int32_t* pick_row() const { return at<int32_t>(params.workspace.pick_row); }
  FLASHMOE_DEVICE T* h() const { return at<T>(params.workspace.h); }
  FLASHMOE_DEVICE const T* shared_w1() const { return static_cast<const T*>(params.pointers.shared_w1); }
  FLASHMOE_DEVICE const T* shared_w2() const { return static_cast<const T*>(params.pointers.shared_w2); }
  FLASHMOE_DEVICE const T* shared_gate() const { return static_cast<const T*>(params.pointers.shared_gate); }
  FLASHMOE_DEVICE T* shared_h() const { return at<T>(params.workspace.shared_h); }
  FLASHMOE_DEVICE T* shared_out() const { return at<T>(params.workspace.shared_out); }
  FLASHMOE_DEVICE float* shared_weight() const { return at<float>(params.workspace.shared_weight); }
  // Row `row` of the dispatch (tokens in) and return (expert outputs back) regions of the heap.
  FLASHMOE_DEVICE T* dispatch_row(int64_t row) const {
    return at<T>(params.workspace.heap + params.workspace.heap_layout().dispatch_row(0, row));
  }
  FLASHMOE_DEVICE T* return_row(int64_t row) const {
    return at<T>(params.workspace.heap + params.workspace.heap_layout().return_row(0, row));
  }
};

// Router GEMM of tokens [first, first + count) into router_logits, then scores and top-k per
// token (core/routing.h) into topk_ids and topk_weights.
template <Math M>
FLASHMOE_DEVICE void route_tokens(const Buffers<M>& buffers, uint8_t* smem, int64_t first, int64_t count) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts, H = problem.hidden, k = problem.top_k;
  float* logits = buffers.params.pointers.router_logits;
  const auto* bias = buffers.router_bias();
  const Operand tokens{buffers.x() + first * H, count, H};
  for (int64_t e0 = 0; e0 < E; e0 += kTileN) {
    const Operand experts{buffers.router_weight() + e0 * H, E - e0 < kTileN ? E - e0 : kTileN, H};
    gemm_tile<M, false>(smem, tokens, experts, experts, H, [&](int m, int n, float value, float) {
      if (m < count && e0 + n < E) {
        logits[(first + m) * E + e0 + n] = value + (bias ? S::load(bias[e0 + n]) : 0.0f);
      }
    });
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < count; t += kThreads) {
    const int64_t token = first + t;
    float* scores = buffers.scores() + token * E;
    score_experts<float>(logits + token * E, E, problem.scoring, scores);
    select_top_k<float>(scores, E, k, problem.normalize, buffers.params.pointers.topk_ids + token * k,
                        buffers.params.pointers.topk_weights + token * k);
  }
  __syncthreads();
}

// Gate of tokens [first, first + count): route_tokens, then this tile's expert histogram for the
// ordered prefix. With routing from outside (problem.routing_given) topk_ids is an input and the
// router is skipped: only the histogram is left.
//
// With a shared gate, also σ(x·shared_gateᵀ) of each token (fp32 accumulation, ascending h) for the combine.
template <Math M>
FLASHMOE_DEVICE void gate_task(const Buffers<M>& buffers, uint8_t* smem, int64_t first, int64_t count, int64_t tile) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  if (problem.has_shared_gate) {
    const int64_t H = problem.hidden;
    for (int64_t t = threadIdx.x; t < count; t += kThreads) {
      const auto* row = buffers.x() + (first + t) * H;
      float logit = 0.0f;
      for (int64_t n = 0; n < H; ++n) logit += S::load(row[n]) * S::load(buffers.shared_gate()[n]);
      buffers.shared_weight()[first + t] = 1.0f / (1.0f + std::exp(-logit));
    }
  }
  if (!problem.routing_given) route_tokens(buffers, smem, first, count);
  const int64_t E = problem.experts, k = problem.top_k;
  const int32_t* ids = buffers.params.pointers.topk_ids + first * k;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    int32_t picks = 0;
    for (int64_t p = 0; p < count * k; ++p) picks += ids[p] == int32_t(e) && routed_pick(ids + p / k * k, p % k, E);
    buffers.tile_counts()[tile * E + e] = picks;
  }
}

// The ordered prefix over gate tiles: each expert's slots in ascending token order, its admitted
// rows (capacity), and the expert offsets of the dispatch rows. No atomics: one pass per expert.
template <Math M>
FLASHMOE_DEVICE void route_task(const Buffers<M>& buffers, int64_t tiles) {
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts;
  int32_t* counts = buffers.params.pointers.expert_counts;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    int64_t running = 0;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      buffers.tile_base()[tile * E + e] = int32_t(running);
      running += buffers.tile_counts()[tile * E + e];
    }
    counts[e] = int32_t(running);
    buffers.admitted()[e] = int32_t(admitted_rows(running, problem.expert_capacity));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t offset = 0, dropped = 0;
    for (int64_t e = 0; e < E; ++e) {
      buffers.expert_offsets()[e] = int32_t(offset);
      offset += buffers.admitted()[e];
      dropped += counts[e] - buffers.admitted()[e];
    }
    *buffers.params.pointers.dropped = dropped;
  }
}

// Copies `bytes` from `source` to `destination` with the lanes of one warp.
FLASHMOE_DEVICE void warp_copy(void* destination, const void* source, int64_t bytes, int lane) {
  const bool vector = ((reinterpret_cast<uintptr_t>(destination) | reinterpret_cast<uintptr_t>(source) |
                        uintptr_t(bytes)) & 15) == 0;
  if (vector) {
    for (int64_t i = lane; i < bytes / 16; i += 32) {
      static_cast<uint4*>(destination)[i] = static_cast<const uint4*>(source)[i];
    }
  } else {
    for (int64_t i = lane; i < bytes / 2; i += 32) {
      static_cast<uint16_t*>(destination)[i] = static_cast<const uint16_t*>(source)[i];
    }
  }
}

// Dispatch of tokens [first, first + count): the row of every pick (its expert's offset plus its
// slot, or -1 past the capacity), and the admitted tokens copied into those rows. At world size 1
// this is the local write of the protocol; the scheduler signals the cells when every tile is done.
template <Math M>
FLASHMOE_DEVICE void dispatch_task(const Buffers<M>& buffers, int64_t first, int64_t count, int64_t tile) {
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts, H = problem.hidden, k = problem.top_k;
  const int32_t* ids = buffers.params.pointers.topk_ids + first * k;
  int32_t* rows = buffers.pick_row() + first * k;
  // A pick that goes to no expert (routing from outside: the sentinel) has no row; the loop over
  // experts below writes every other pick's row.
  for (int64_t p = threadIdx.x; p < count * k; p += kThreads) {
    if (!routed_pick(ids + p / k * k, p % k, E)) rows[p] = -1;
  }
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    int64_t slot = buffers.tile_base()[tile * E + e];
    const int64_t admitted = buffers.admitted()[e];
    const int64_t offset = buffers.expert_offsets()[e];
    for (int64_t p = 0; p < count * k; ++p) {
      if (ids[p] != int32_t(e) || !routed_pick(ids + p / k * k, p % k, E)) continue;
      rows[p] = slot < admitted ? int32_t(offset + slot) : -1;
      ++slot;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_bytes = H * int64_t(sizeof(typename Buffers<M>::T));
  for (int64_t p = warp; p < count * k; p += kThreads / 32) {
    const int32_t row = rows[p];
    if (row < 0) continue;
    warp_copy(buffers.dispatch_row(row), buffers.x() + (first + p / k) * H, row_bytes, lane);
  }
}

// GEMM0 of one row tile: h[rows, columns) = glu(x·gateᵀ + b1, x·upᵀ + b1') or act(x·W1ᵀ + b1), rounded to dtype.
// The shared expert's cell (local_expert E): rows are tokens read from x, its own weights, no bias, width S.
template <Math M>
FLASHMOE_DEVICE void gemm0_task(const Buffers<M>& buffers, uint8_t* smem, const Task& task) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const bool shared = task.local_expert == problem.experts;
  const int64_t H = problem.hidden, I = shared ? problem.shared_ffn : problem.ffn;
  const auto* w1 = shared ? buffers.shared_w1() : buffers.w1() + task.local_expert * problem.gemm0_cols() * H;
  const auto* b1 = !shared && buffers.b1() ? buffers.b1() + task.local_expert * problem.gemm0_cols() : nullptr;
  auto* h = shared ? buffers.shared_h() : buffers.h();
  const float limit = float(problem.swiglu_limit), alpha = float(problem.swiglu_alpha);
  const int64_t column_end = task.column_begin + task.columns;
  for (int64_t m0 = 0; m0 < task.rows; m0 += kTileM) {
    const int64_t row0 = task.first_row + m0;
    const int64_t rows = task.rows - m0 < kTileM ? task.rows - m0 : kTileM;
    const Operand a{shared ? buffers.x() + row0 * H : buffers.dispatch_row(row0), rows, H};
    for (int64_t n0 = task.column_begin; n0 < column_end; n0 += kTileN) {
      const int64_t columns = column_end - n0 < kTileN ? column_end - n0 : kTileN;
      const Operand gate{w1 + n0 * H, columns, H};
      if (problem.gated) {
        const Operand up{w1 + (I + n0) * H, columns, H};
        gemm_tile<M, true>(smem, a, gate, up, H, [&](int m, int n, float g, float u) {
          if (m < rows && n < columns) {
            g += b1 ? S::load(b1[n0 + n]) : 0.0f;
            u += b1 ? S::load(b1[I + n0 + n]) : 0.0f;
            h[(row0 + m) * I + n0 + n] = S::store(glu(problem.activation, g, u, limit, alpha));
          }
        });
      } else {
        gemm_tile<M, false>(smem, a, gate, gate, H, [&](int m, int n, float v, float) {
          if (m < rows && n < columns) {
            v += b1 ? S::load(b1[n0 + n]) : 0.0f;
            h[(row0 + m) * I + n0 + n] = S::store(activate(problem.activation, v));
          }
        });
      }
    }
  }
}

// GEMM1 of one row tile: out[rows, columns) = h·W2ᵀ + b2, rounded to dtype, into the return rows (the
// shared expert's: into shared_out, token by token).
template <Math M>
FLASHMOE_DEVICE void gemm1_task(const Buffers<M>& buffers, uint8_t* smem, const Task& task) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const bool shared = task.local_expert == problem.experts;
  const int64_t H = problem.hidden, I = shared ? problem.shared_ffn : problem.ffn;
  const auto* w2 = shared ? buffers.shared_w2() : buffers.w2() + task.local_expert * H * I;
  const auto* b2 = !shared && buffers.b2() ? buffers.b2() + task.local_expert * H : nullptr;
  const int64_t column_end = task.column_begin + task.columns;
  for (int64_t m0 = 0; m0 < task.rows; m0 += kTileM) {
    const int64_t row0 = task.first_row + m0;
    const int64_t rows = task.rows - m0 < kTileM ? task.rows - m0 : kTileM;
    const Operand a{(shared ? buffers.shared_h() : buffers.h()) + row0 * I, rows, I};
    auto* out = shared ? buffers.shared_out() + row0 * H : buffers.return_row(row0);
    for (int64_t n0 = task.column_begin; n0 < column_end; n0 += kTileN) {
      const int64_t columns = column_end - n0 < kTileN ? column_end - n0 : kTileN;
      const Operand down{w2 + n0 * I, columns, I};
      gemm_tile<M, false>(smem, a, down, down, I, [&](int m, int n, float v, float) {
        if (m < rows && n < columns) out[m * H + n0 + n] = S::store(v + (b2 ? S::load(b2[n0 + n]) : 0.0f));
      });
    }
  }
}

// Combine of tokens [first, first + count): y[t] = Σ_j weight[t, j] · out[row(t, j)], in
// ascending j with fp32 accumulation, then + g[t] · shared_out[t] with a shared expert (g = 1 without
// its gate); a dropped pick adds nothing. No atomics.
template <Math M>
FLASHMOE_DEVICE void combine_task(const Buffers<M>& buffers, int64_t first, int64_t count) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const int64_t H = problem.hidden, k = problem.top_k;
  const int32_t* rows = buffers.pick_row();
  const float* weights = buffers.params.pointers.topk_weights;
  const auto* outputs = buffers.return_row(0);  // the return rows are contiguous, H apart
  auto* y = buffers.y();
  for (int64_t i = threadIdx.x; i < count * H; i += kThreads) {
    const int64_t token = first + i / H, n = i % H;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t row = rows[token * k + j];
      if (row >= 0) sum += weights[token * k + j] * S::load(outputs[int64_t(row) * H + n]);
    }
    if (problem.has_shared_expert()) {
      const float weight = problem.has_shared_gate ? buffers.shared_weight()[token] : 1.0f;
      sum += weight * S::load(buffers.shared_out()[token * H + n]);
    }
    y[token * H + n] = S::store(sum);
  }
}

}  // namespace flashmoe::cuda
