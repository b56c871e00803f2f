#include "cpu/transport_all_to_all.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/capacity.h"
#include "core/tiling.h"
#include "cpu/expert_tiles.h"
#include "cpu/source_steps.h"
#include "cpu/thread_pool.h"

namespace flashmoe::cpu {
namespace {

// Runs work(item) for item in [0, items) on a team of `threads`, items taken in turn.
template <typename Work>
void for_each_item(int threads, int64_t items, Work work) {
  const int team = int(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  std::atomic<int64_t> next{0};
  run_team(team, [&](int) {
    for (int64_t item; (item = next.fetch_add(1)) < items;) work(item);
  });
}

template <typename T>
void route(const Problem& p, const ExpertWeights& weights, const RankIO& io, int64_t* expert_offsets, int32_t* pick_row,
           int32_t* row_token, int threads) {
  using Acc = accum_t<T>;
  const Tiling tiling;
  const int64_t tile = tiling.token_tile;
  for_each_item(threads, tiling.token_tiles(io.tokens), [&](int64_t task) {
    std::vector<Acc> scratch(static_cast<size_t>(route_scratch(p)));
    const int64_t t0 = task * tile, m = std::min(tile, io.tokens - t0);
    gate_tile<T>(p, static_cast<const T*>(io.x), t0, m, weights.router_weight, weights.router_bias,
                 static_cast<const Acc*>(weights.selection_bias), static_cast<Acc*>(io.router_logits), io.topk_ids,
                 static_cast<Acc*>(io.topk_weights), scratch.data());
  });
  *io.dropped = assign_slots(io.topk_ids, io.tokens, p.top_k, p.experts, io.expert_capacity,
                             SlotAssignment{io.expert_counts, expert_offsets, pick_row, row_token});
}

template <typename T>
void expert_rows(const Problem& p, const ExpertWeights& weights, const T* rows, const int64_t* cell_rows,
                 int64_t cells, int64_t local_experts, T* out, int threads) {
  using Acc = accum_t<T>;
  const Tiling tiling;
  const int64_t H = p.hidden, I = p.ffn, N0 = p.gemm0_cols();
  struct RowTile { int64_t local_expert, first_row, rows; };
  std::vector<RowTile> tiles;
  int64_t first = 0;
  for (int64_t cell = 0; cell < cells; ++cell) {
    for (int64_t begin = 0; begin < cell_rows[cell]; begin += tiling.row_tile) {
      tiles.push_back({cell % local_experts, first + begin, std::min(tiling.row_tile, cell_rows[cell] - begin)});
    }
    first += cell_rows[cell];
  }
  const T* w1 = static_cast<const T*>(weights.w1);
  const T* b1 = static_cast<const T*>(weights.b1);
  const T* w2 = static_cast<const T*>(weights.w2);
  const T* b2 = static_cast<const T*>(weights.b2);
  for_each_item(threads, int64_t(tiles.size()), [&](int64_t item) {
    const RowTile& tile = tiles[size_t(item)];
    const int64_t l = tile.local_expert;
    std::vector<Acc> gate(static_cast<size_t>(tiling.row_tile * tiling.ffn_tile)), up(gate.size()),
        acc(size_t(tiling.row_tile * tiling.hidden_tile));
    std::vector<T> h(static_cast<size_t>(tile.rows * I));
    std::vector<const T*> x_rows(size_t(tile.rows)), h_in(size_t(tile.rows));
    std::vector<T*> h_rows(size_t(tile.rows)), out_rows(size_t(tile.rows));
    for (int64_t i = 0; i < tile.rows; ++i) {
      x_rows[size_t(i)] = rows + (tile.first_row + i) * H;
      h_rows[size_t(i)] = h.data() + i * I;
      h_in[size_t(i)] = h_rows[size_t(i)];
      out_rows[size_t(i)] = out + (tile.first_row + i) * H;
    }
    // The dataflow's GEMM0 and GEMM1 tasks of one row tile, column tile by column tile.
    for (int64_t column = 0; column < I; column += tiling.ffn_tile) {
      gemm0_tile<T>(p, x_rows.data(), tile.rows, w1 + l * N0 * H, b1 ? b1 + l * N0 : nullptr, column,
                    std::min(I, column + tiling.ffn_tile), h_rows.data(), gate.data(), up.data());
    }
    for (int64_t column = 0; column < H; column += tiling.hidden_tile) {
      gemm1_tile<T>(p, h_in.data(), tile.rows, w2 + l * H * I, b2 ? b2 + l * H : nullptr, column,
                    std::min(H, column + tiling.hidden_tile), out_rows.data(), acc.data());
    }
  });
}

template <typename T>
void combine(const Problem& p, int64_t tokens, const int32_t* pick_row, const void* topk_weights,
             const void* rows_home, void* y, int threads, const SharedRows& shared) {
  using Acc = accum_t<T>;
  const Tiling tiling;
  const int64_t H = p.hidden, k = p.top_k, tile = tiling.token_tile;
  const T* home = static_cast<const T*>(rows_home);
  const T* shared_rows = static_cast<const T*>(shared.rows);
  for_each_item(threads, tiling.token_tiles(tokens), [&](int64_t task) {
    std::vector<Acc> sum(static_cast<size_t>(H)), shared_weight(static_cast<size_t>(tile));
    const int64_t t0 = task * tile, m = std::min(tile, tokens - t0);
    if (p.has_shared_expert()) {
      shared_weights<T>(p, static_cast<const T*>(shared.x), t0, m, static_cast<const T*>(shared.gate),
                        shared_weight.data());
    }
    for (int64_t t = t0; t < t0 + m; ++t) {
      const auto output_row = [&](int64_t j) { return home + int64_t(pick_row[t * k + j]) * H; };
      combine_token<T>(H, k, pick_row + t * k, static_cast<const Acc*>(topk_weights) + t * k, p.weight_on_input,
                       output_row, sum.data(), static_cast<T*>(y) + t * H,
                       p.has_shared_expert() ? shared_rows + t * H : nullptr,
                       p.has_shared_expert() ? shared_weight[size_t(t - t0)] : Acc(1));
    }
  });
}

template <typename Fn>
void by_dtype(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::bf16: return fn(bfloat16{});
    case DType::f16: return fn(float16{});
    case DType::f64: return fn(double{});
  }
}

}  // namespace

void route_tokens(const Problem& problem, const ExpertWeights& weights, const RankIO& io, int64_t* expert_offsets,
                  int32_t* pick_row, int32_t* row_token, int threads) {
  by_dtype(problem.dtype, [&](auto tag) {
    route<decltype(tag)>(problem, weights, io, expert_offsets, pick_row, row_token, threads);
  });
}

void run_expert_rows(const Problem& problem, const ExpertWeights& local_weights, const void* rows,
                     const int64_t* cell_rows, int64_t cells, int64_t local_experts, void* out, int threads) {
  by_dtype(problem.dtype, [&](auto tag) {
    using T = decltype(tag);
    expert_rows<T>(problem, local_weights, static_cast<const T*>(rows), cell_rows, cells, local_experts,
                   static_cast<T*>(out), threads);
  });
}

void combine_tokens(const Problem& problem, int64_t tokens, const int32_t* pick_row, const void* topk_weights,
                    const void* rows_home, void* y, int threads, const SharedRows& shared) {
  by_dtype(problem.dtype, [&](auto tag) {
    combine<decltype(tag)>(problem, tokens, pick_row, topk_weights, rows_home, y, threads, shared);
  });
}

}  // namespace flashmoe::cpu
