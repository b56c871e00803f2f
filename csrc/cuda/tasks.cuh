// The bodies of the tasks a processor CTA runs. Every thread of the CTA calls one; the task
// descriptor (core/task.h) says which rows and columns. Each output element is written by exactly
// one task, with an arithmetic that does not depend on which CTA runs it.
#pragma once

#include <cstdint>

#include "core/activation.h"
#include "core/capacity.h"
#include "core/routing.h"
#include "core/task.h"
#include "cuda/gate.cuh"
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
  FLASHMOE_DEVICE int32_t* gather_rows() const { return at<int32_t>(params.workspace.gather_rows); }
  // Whether this rank's own cells read their rows straight from x (gather_rows) instead of a copy
  // in its heap: always, unless each row is x scaled by its pick's weight (weight_on_input).
  FLASHMOE_DEVICE bool gathers_own_rows() const { return !params.problem.weight_on_input; }
  FLASHMOE_DEVICE T* h() const { return at<T>(params.workspace.h); }
  // The h rows of the cells whose rows `source` sent (Workspace::h_rows: region by region).
  FLASHMOE_DEVICE T* h_of(int64_t source) const { return h() + source * params.workspace.region_rows() * params.problem.ffn; }
  FLASHMOE_DEVICE const T* shared_w1() const { return static_cast<const T*>(params.pointers.shared_w1); }
  FLASHMOE_DEVICE const T* shared_w2() const { return static_cast<const T*>(params.pointers.shared_w2); }
  FLASHMOE_DEVICE const T* shared_gate() const { return static_cast<const T*>(params.pointers.shared_gate); }
  FLASHMOE_DEVICE T* shared_h() const { return at<T>(params.workspace.shared_h); }
  FLASHMOE_DEVICE T* shared_out() const { return at<T>(params.workspace.shared_out); }
  FLASHMOE_DEVICE float* shared_weight() const { return at<float>(params.workspace.shared_weight); }

  // Expert parallelism: this rank, the world, and the local experts L = E / W of each rank.
  FLASHMOE_DEVICE int64_t rank() const { return params.ranks.rank; }
  FLASHMOE_DEVICE int64_t local_experts() const { return params.workspace.local_experts(); }
  // Rank r's heap (HeapLayout): in this workspace at world size 1, else through the rank table
  // (kernel_params.h Ranks), the one way a task reaches a peer.
  FLASHMOE_DEVICE uint8_t* heap(int64_t r) const {
    return params.workspace.heap_in_workspace() ? base + params.workspace.heap : params.ranks.heaps[r];
  }
  // Row `row` of the rows `source` sent this rank (tokens in), and of the outputs `owner` returned
  // for this rank's tokens; both in this rank's heap.
  FLASHMOE_DEVICE T* dispatch_row(int64_t source, int64_t row) const {
    return reinterpret_cast<T*>(heap(rank()) + params.workspace.heap_layout().dispatch_row(source, row));
  }
  FLASHMOE_DEVICE T* return_row(int64_t owner, int64_t row) const {
    return reinterpret_cast<T*>(heap(rank()) + params.workspace.heap_layout().return_row(owner, row));
  }
  // Where this rank writes: row `row` of its dispatch region in `owner`'s heap, and of its return
  // region in `source`'s heap (the peer's own heap when it is this rank).
  FLASHMOE_DEVICE T* dispatch_row_at(int64_t owner, int64_t row) const {
    return reinterpret_cast<T*>(heap(owner) + params.workspace.heap_layout().dispatch_row(rank(), row));
  }
  FLASHMOE_DEVICE T* return_row_at(int64_t source, int64_t row) const {
    return reinterpret_cast<T*>(heap(source) + params.workspace.heap_layout().return_row(rank(), row));
  }
};

// Router logits of tokens [first, first + count) × gate columns [column_begin, column_end) (gate.cuh's
// order): column e < E is x·router_weight[e]ᵀ (+ router_bias[e]) into router_logits; column E is the
// shared gate, σ(x·shared_gateᵀ) into shared_weight. The router is LoadW (x's dtype, or fp32 with
// problem.router_f32: x upcast). A pass covers one column per warp: the warp carries kGateTokens
// tokens at a time through its column's weight chunks, its lanes' partials of every token meet in
// shared memory (`partials`: 4 warps · kGateTokenTile tokens · kPartialStride floats: a logit's 32
// lane partials padded to 33, so that the threads adding them, one logit each, read 32 different
// banks rather than one), and one thread per logit adds them. Two barriers per pass, which every
// thread reaches.
template <Math M, typename LoadW>
FLASHMOE_DEVICE void gate_logits(const Buffers<M>& buffers, float* partials, int64_t first, int64_t count,
                                 int64_t column_begin, int64_t column_end) {
  using S = Storage<M>;
  using T = typename S::Type;
  using W = typename LoadW::Type;
  constexpr int kWarps = kThreads / 32;
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts, H = problem.hidden;
  const T* x = buffers.x() + first * H;
  const W* router = static_cast<const W*>(buffers.params.pointers.router_weight);
  const W* bias = static_cast<const W*>(buffers.params.pointers.router_bias);
  const T* shared_gate = buffers.shared_gate();
  auto aligned = [](const void* pointer) { return (reinterpret_cast<uintptr_t>(pointer) & 15) == 0; };
  constexpr int kPartialStride = kLogitLanes + 1;
  static_assert(kWarps * kGateTokenTile * kPartialStride * sizeof(float) + sizeof(uint32_t) <= kTileSmemBytes,
                "the gate's partials and flag fit the tile's shared memory");
  const bool chunks = H % kLogitChunk == 0 && aligned(x);
  const bool router_vector = chunks && aligned(router), gate_vector = chunks && aligned(shared_gate);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  for (int64_t e0 = column_begin; e0 < column_end; e0 += kWarps) {
    const int64_t e = e0 + warp;
    if (e < column_end) {
      for (int64_t t0 = 0; t0 < count; t0 += kGateTokens) {
        const int tokens = int(count - t0 < kGateTokens ? count - t0 : kGateTokens);
        float partial[kGateTokens];
        if (e == E) {
          logit_partials<S, S, kGateTokens>(x + t0 * H, tokens, shared_gate, H, lane, gate_vector, partial);
        } else {
          logit_partials<S, LoadW, kGateTokens>(x + t0 * H, tokens, router + e * H, H, lane, router_vector, partial);
        }
        FLASHMOE_UNROLL
        for (int t = 0; t < kGateTokens; ++t) {
          if (t < tokens) partials[((warp * kGateTokenTile) + t0 + t) * kPartialStride + lane] = partial[t];
        }
      }
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < kWarps * count; i += kThreads) {
      const int64_t column = i / count, t = i - column * count, c = e0 + column, token = first + t;
      if (c >= column_end) continue;
      const float logit = sum_lane_partials(partials + (column * kGateTokenTile + t) * kPartialStride);
      if (c == E) {
        buffers.shared_weight()[token] = 1.0f / (1.0f + std::exp(-logit));
      } else {
        buffers.params.pointers.router_logits[token * E + c] = bias ? logit + LoadW::load(bias[c]) : logit;
      }
    }
    __syncthreads();
  }
}

// route_token (core/routing.h) of tokens [first, first + count) by the whole CTA, with its exact
// arithmetic: the order-free parts (each expert's score, each group's score and rank, each pick's
// place) one thread per (token, item); the ordered sums (the softmax's max and denominator, the
// pick weights) one thread per token, in route_token's order. A pick's place is its rank, the
// number of experts picked_before it, so the k picks land in pick order with no sort.
// `per_token`: 2·count floats of shared memory.
template <Math M>
FLASHMOE_DEVICE void route_tile(const Buffers<M>& buffers, float* per_token, int64_t first, int64_t count) {
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts, k = problem.top_k, G = problem.num_groups;
  const int64_t stride = buffers.params.workspace.scores_per_token;
  const float* logits = buffers.params.pointers.router_logits + first * E;
  float* scratch = buffers.scores() + first * stride;
  const bool topk_softmax = problem.scoring == Scoring::softmax_topk;
  const int64_t items = count * E;
  if (problem.scoring == Scoring::sigmoid) {
    for (int64_t i = threadIdx.x; i < items; i += kThreads) {
      const int64_t t = i / E, e = i - t * E;
      scratch[t * stride + e] = 1.0f / (1.0f + std::exp(-logits[t * E + e]));
    }
  } else if (!topk_softmax) {  // score_experts' softmax
    for (int64_t t = threadIdx.x; t < count; t += kThreads) {
      const float* row = logits + t * E;
      float max_logit = row[0];
      for (int64_t e = 1; e < E; ++e) max_logit = row[e] > max_logit ? row[e] : max_logit;
      per_token[t] = max_logit;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < items; i += kThreads) {
      const int64_t t = i / E, e = i - t * E;
      scratch[t * stride + e] = std::exp(logits[t * E + e] - per_token[t]);
    }
    __syncthreads();
    for (int64_t t = threadIdx.x; t < count; t += kThreads) {
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += scratch[t * stride + e];
      per_token[count + t] = sum;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < items; i += kThreads) {
      const int64_t t = i / E, e = i - t * E;
      scratch[t * stride + e] /= per_token[count + t];
    }
  }
  __syncthreads();
  auto keys_of = [&](int64_t t) {
    const float* scores = topk_softmax ? logits + t * E : scratch + t * stride;
    return SelectionKeys<float>{scores, buffers.params.pointers.selection_bias, nullptr, E / G};
  };
  if (group_limited(problem)) {  // keep_best_groups, a thread per (token, group)
    for (int64_t i = threadIdx.x; i < count * G; i += kThreads) {
      const int64_t t = i / G, g = i - t * G;
      scratch[t * stride + E + g] = group_score(problem, keys_of(t), g);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < count * G; i += kThreads) {
      const int64_t t = i / G, g = i - t * G;
      scratch[t * stride + E + G + g] = group_kept(problem, scratch + t * stride + E, g);
    }
    __syncthreads();
  }
  int32_t* ids = buffers.params.pointers.topk_ids + first * k;
  for (int64_t i = threadIdx.x; i < items; i += kThreads) {
    const int64_t t = i / E;
    const int32_t e = int32_t(i - t * E);
    SelectionKeys<float> keys = keys_of(t);
    if (group_limited(problem)) keys.kept = scratch + t * stride + E + G;
    int64_t rank = 0;
    for (int32_t other = 0; other < E && rank < k; ++other) rank += picked_before(keys, other, e);
    if (rank < k) ids[t * k + rank] = e;
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < count; t += kThreads) {
    weigh_picks(problem, topk_softmax ? logits + t * E : scratch + t * stride, ids + t * k,
                buffers.params.pointers.topk_weights + (first + t) * k);
  }
  __syncthreads();
}

// One gate task: the logits of token tile `tile` (tokens [first, first + count)) × gate column tile
// task.row_tile (gate.cuh GateColumns). The task that completes the tile's last column tile (a
// counter per tile in the workspace, acq_rel) then routes the tile (route_tile) and writes its
// expert histogram for the ordered prefix. With routing from outside (problem.routing_given)
// topk_ids is an input and the router is skipped: only the shared gate and the histogram are left.
// Returns whether this task routed its tile (every thread gets the same answer).
template <Math M>
FLASHMOE_DEVICE bool gate_task(const Buffers<M>& buffers, uint8_t* smem, const Task& task, int64_t tile) {
  const Problem& problem = buffers.params.problem;
  const int64_t first = task.column_begin, count = task.columns;
  if (count > kGateTokenTile) __trap();  // the shared partials hold kGateTokenTile tokens (gpu_tiling().token_tile)
  const GateColumns columns(problem);
  float* scratch = reinterpret_cast<float*>(smem);  // partials, then the per-token values
  uint32_t* last = reinterpret_cast<uint32_t*>(smem + kTileSmemBytes) - 1;
  const int64_t begin = columns.tile_begin(task.row_tile), end = columns.tile_end(task.row_tile);
  if (problem.router_f32) {
    gate_logits<M, FloatStorage<M>>(buffers, scratch, first, count, begin, end);
  } else {
    gate_logits<M, Storage<M>>(buffers, scratch, first, count, begin, end);
  }
  if (columns.tiles() > 1) {
    // The barrier orders the CTA's logits before thread 0's release; its acquire, before the
    // barrier that lets every thread read the other tasks' logits.
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t* done = buffers.template at<uint32_t>(buffers.params.workspace.gate_done) + tile;
      *last = atomic_add_acq_rel(done, 1u) + 1u == uint32_t(columns.tiles());
    }
    __syncthreads();
    if (!*last) return false;
  }
  if (!problem.routing_given) route_tile(buffers, scratch, first, count);
  const int64_t E = problem.experts, k = problem.top_k;
  const int32_t* ids = buffers.params.pointers.topk_ids + first * k;
  for (int64_t e = threadIdx.x; e < E; e += kThreads) {
    int32_t picks = 0;
    for (int64_t p = 0; p < count * k; ++p) picks += ids[p] == int32_t(e) && routed_pick(ids + p / k * k, p % k, E);
    buffers.tile_counts()[tile * E + e] = picks;
  }
  return true;
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
// slot, less the first offset of the expert's owner: the row in this rank's region of the owner's
// heap, protocol.md §2; -1 past the capacity), and the admitted tokens copied into those rows of
// the owner's heap, by load/store (kernel_params.h Ranks). A row this rank sends itself is not
// copied: its token goes into gather_rows, and the cell's GEMM0 reads x. Returns whether any row
// went to a peer.
// The scheduler signals the cells (a peer's by its dispatch flag, its own directly) when every
// tile is done.
template <Math M>
FLASHMOE_DEVICE bool dispatch_task(const Buffers<M>& buffers, int64_t first, int64_t count, int64_t tile) {
  const Problem& problem = buffers.params.problem;
  const int64_t E = problem.experts, H = problem.hidden, k = problem.top_k, L = buffers.local_experts();
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
    const int64_t offset = buffers.expert_offsets()[e] - buffers.expert_offsets()[e / L * L];
    for (int64_t p = 0; p < count * k; ++p) {
      if (ids[p] != int32_t(e) || !routed_pick(ids + p / k * k, p % k, E)) continue;
      rows[p] = slot < admitted ? int32_t(offset + slot) : -1;
      ++slot;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_bytes = H * int64_t(sizeof(typename Buffers<M>::T));
  const float* weights = buffers.params.pointers.topk_weights + first * k;
  bool remote = false;
  for (int64_t p = warp; p < count * k; p += kThreads / 32) {
    const int32_t row = rows[p];
    if (row < 0) continue;
    const int64_t owner = ids[p] / L;
    if (owner == buffers.rank() && buffers.gathers_own_rows()) {
      if (lane == 0) buffers.gather_rows()[row] = int32_t(first + p / k);
      continue;
    }
    remote = remote || owner != buffers.rank();
    auto* destination = buffers.dispatch_row_at(owner, row);
    if (problem.weight_on_input) {  // round(x · w), the product in fp32 (cpu/source_steps.h dispatch_row)
      using S = Storage<M>;
      const auto* x = buffers.x() + (first + p / k) * H;
      for (int64_t n = lane; n < H; n += 32) destination[n] = S::store(S::load(x[n]) * weights[p]);
    } else {
      warp_copy(destination, buffers.x() + (first + p / k) * H, row_bytes, lane);
    }
  }
  return remote;
}

// The cell of a GEMM task (task.local_expert, the scheduler's cell id): the rank whose rows these
// are and the local expert, or the shared expert's (cell E = W·L).
struct CellOf {
  bool shared;
  int64_t source, expert;
  template <Math M>
  FLASHMOE_DEVICE CellOf(const Buffers<M>& buffers, const Task& task) {
    const int64_t L = buffers.local_experts();
    shared = task.local_expert == buffers.params.problem.experts;
    source = shared ? buffers.rank() : task.local_expert / L;
    expert = shared ? 0 : task.local_expert % L;
  }
};

// GEMM0 of one row tile: h[rows, columns) = glu(x·gateᵀ + b1, x·upᵀ + b1') or act(x·W1ᵀ + b1), rounded to dtype.
// An expert cell (source s, local expert l) reads the rows s sent (this heap's dispatch region s) and
// writes h rows s·region_rows + row. The shared expert's cell (E): rows are tokens read from x, its
// own weights, no bias, width S.
template <Math M>
FLASHMOE_DEVICE void gemm0_task(const Buffers<M>& buffers, uint8_t* smem, const Task& task) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const CellOf cell(buffers, task);
  const bool shared = cell.shared;
  const int64_t H = problem.hidden, I = shared ? problem.shared_ffn : problem.ffn;
  const auto* w1 = shared ? buffers.shared_w1() : buffers.w1() + cell.expert * problem.gemm0_cols() * H;
  const auto* b1 = !shared && buffers.b1() ? buffers.b1() + cell.expert * problem.gemm0_cols() : nullptr;
  auto* h = shared ? buffers.shared_h() : buffers.h_of(cell.source);
  // The rows of a cell this rank sent itself are its tokens in x (dispatch_task's gather_rows).
  const bool gather = !shared && cell.source == buffers.rank() && buffers.gathers_own_rows();
  const float limit = float(problem.swiglu_limit), alpha = float(problem.swiglu_alpha);
  const int64_t column_end = task.column_begin + task.columns;
  for (int64_t m0 = 0; m0 < task.rows; m0 += kTileM) {
    const int64_t row0 = task.first_row + m0;
    const int64_t rows = task.rows - m0 < kTileM ? task.rows - m0 : kTileM;
    const Operand a = shared   ? Operand{buffers.x() + row0 * H, rows, H}
                      : gather ? Operand{buffers.x(), rows, H, buffers.gather_rows() + row0}
                               : Operand{buffers.dispatch_row(cell.source, row0), rows, H};
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

// GEMM1 of one row tile: out[rows, columns) = h·W2ᵀ + b2, rounded to dtype, into the return rows of
// the cell's source (this rank's return region in its heap, by load/store; the shared expert's:
// into shared_out, token by token). Returns whether the rows went to a peer.
template <Math M>
FLASHMOE_DEVICE bool gemm1_task(const Buffers<M>& buffers, uint8_t* smem, const Task& task) {
  using S = Storage<M>;
  const Problem& problem = buffers.params.problem;
  const CellOf cell(buffers, task);
  const bool shared = cell.shared;
  const int64_t H = problem.hidden, I = shared ? problem.shared_ffn : problem.ffn;
  const auto* w2 = shared ? buffers.shared_w2() : buffers.w2() + cell.expert * H * I;
  const auto* b2 = !shared && buffers.b2() ? buffers.b2() + cell.expert * H : nullptr;
  const auto* h = shared ? buffers.shared_h() : buffers.h_of(cell.source);
  const int64_t column_end = task.column_begin + task.columns;
  for (int64_t m0 = 0; m0 < task.rows; m0 += kTileM) {
    const int64_t row0 = task.first_row + m0;
    const int64_t rows = task.rows - m0 < kTileM ? task.rows - m0 : kTileM;
    const Operand a{h + row0 * I, rows, I};
    auto* out = shared ? buffers.shared_out() + row0 * H : buffers.return_row_at(cell.source, row0);
    for (int64_t n0 = task.column_begin; n0 < column_end; n0 += kTileN) {
      const int64_t columns = column_end - n0 < kTileN ? column_end - n0 : kTileN;
      const Operand down{w2 + n0 * I, columns, I};
      gemm_tile<M, false>(smem, a, down, down, I, [&](int m, int n, float v, float) {
        if (m < rows && n < columns) out[m * H + n0 + n] = S::store(v + (b2 ? S::load(b2[n0 + n]) : 0.0f));
      });
    }
  }
  return !shared && cell.source != buffers.rank();
}

// Adds weight · chunk h0.. of `row` (kLogitChunk elements, those at or past `valid` as zeros) to sum,
// element by element as sum += weight · value: the combine's one expression.
template <typename S>
FLASHMOE_DEVICE void add_weighted_chunk(float (&sum)[kLogitChunk], float weight, const typename S::Type* row,
                                        bool vector, int64_t valid) {
  float values[kLogitChunk];
  load_chunk<S>(row, vector, valid, values);
  FLASHMOE_UNROLL
  for (int i = 0; i < kLogitChunk; ++i) sum[i] += weight * values[i];
}

// Picks of a token the combine keeps in registers; a token with more reads the rest from memory.
constexpr int kCombinePicks = 16;

// Combine of tokens [first, first + count): y[t] = Σ_j weight[t, j] · out[row(t, j)], in
// ascending j with fp32 accumulation, then + g[t] · shared_out[t] with a shared expert (g = 1 without
// its gate); a dropped pick adds nothing. No atomics.
//
// Each thread owns 8-element chunks of one token's row (16-byte loads and stores when H % 8 == 0
// and the rows are aligned; element by element otherwise): `lanes` threads per token, and
// tokens_per_pass tokens side by side when a row has fewer chunks than the CTA has threads. The
// index arithmetic is per task, not per element. A token's pick rows (each in the return region of
// its expert's owner) and weights sit in registers.
template <Math M>
FLASHMOE_DEVICE void combine_task(const Buffers<M>& buffers, int64_t first, int64_t count) {
  using S = Storage<M>;
  using T = typename S::Type;
  const Problem& problem = buffers.params.problem;
  const int64_t H = problem.hidden, k = problem.top_k;
  const int32_t* rows = buffers.pick_row();
  const int32_t* ids = buffers.params.pointers.topk_ids;
  const float* weights = buffers.params.pointers.topk_weights;
  const int64_t L = buffers.local_experts();
  const bool one_rank = buffers.params.ranks.world == 1;
  // Pick p's output row: in the return region of its expert's owner, at its row there; null when dropped.
  auto output_of = [&](int64_t p) -> const T* {
    const int32_t row = rows[p];
    return row < 0 ? nullptr : buffers.return_row(one_rank ? 0 : ids[p] / L, row);
  };
  const T* outputs = buffers.return_row(0, 0);  // every owner's return region starts 128-byte aligned
  const T* shared_out = problem.has_shared_expert() ? buffers.shared_out() : nullptr;
  const float* shared_weight = problem.has_shared_gate ? buffers.shared_weight() : nullptr;
  T* y = buffers.y();
  auto aligned = [](const void* pointer) { return (reinterpret_cast<uintptr_t>(pointer) & 15) == 0; };
  const bool vector = H % kLogitChunk == 0 && aligned(outputs) && aligned(y) && (!shared_out || aligned(shared_out));
  const int64_t chunks = (H + kLogitChunk - 1) / kLogitChunk;
  const int64_t lanes = chunks < kThreads ? chunks : kThreads;
  const int64_t tokens_per_pass = kThreads / lanes;
  const int64_t slot = int64_t(threadIdx.x) / lanes, lane = int64_t(threadIdx.x) - slot * lanes;
  if (slot >= tokens_per_pass) return;
  for (int64_t token = first + slot; token < first + count; token += tokens_per_pass) {
    const T* pick_outputs[kCombinePicks];
    float pick_weights[kCombinePicks];
    FLASHMOE_UNROLL
    for (int j = 0; j < kCombinePicks; ++j) {
      pick_outputs[j] = j < k ? output_of(token * k + j) : nullptr;
      pick_weights[j] = j < k && !problem.weight_on_input ? weights[token * k + j] : 1.0f;
    }
    const float shared = shared_weight ? shared_weight[token] : 1.0f;
    for (int64_t chunk = lane; chunk < chunks; chunk += lanes) {
      const int64_t h0 = chunk * kLogitChunk, valid = H - h0;
      float sum[kLogitChunk];
      FLASHMOE_UNROLL
      for (int i = 0; i < kLogitChunk; ++i) sum[i] = 0.0f;
      FLASHMOE_UNROLL
      for (int j = 0; j < kCombinePicks; ++j) {
        if (pick_outputs[j]) add_weighted_chunk<S>(sum, pick_weights[j], pick_outputs[j] + h0, vector, valid);
      }
      for (int64_t j = kCombinePicks; j < k; ++j) {
        const T* output = output_of(token * k + j);
        const float weight = problem.weight_on_input ? 1.0f : weights[token * k + j];
        if (output) add_weighted_chunk<S>(sum, weight, output + h0, vector, valid);
      }
      if (shared_out) add_weighted_chunk<S>(sum, shared, shared_out + token * H + h0, vector, valid);
      alignas(16) T values[kLogitChunk];
      FLASHMOE_UNROLL
      for (int i = 0; i < kLogitChunk; ++i) values[i] = S::store(sum[i]);
      T* destination = y + token * H + h0;
      if (vector) {
        constexpr int kPerVector = 16 / int(sizeof(T));
        FLASHMOE_UNROLL
        for (int v = 0; v < kLogitChunk / kPerVector; ++v) {
#if defined(__CUDACC__)
          reinterpret_cast<uint4*>(destination)[v] = reinterpret_cast<const uint4*>(values)[v];
#else
          std::memcpy(destination + v * kPerVector, values + v * kPerVector, 16);
#endif
        }
      } else {
        for (int64_t i = 0; i < valid && i < kLogitChunk; ++i) destination[i] = values[i];
      }
    }
  }
}

}  // namespace flashmoe::cuda
