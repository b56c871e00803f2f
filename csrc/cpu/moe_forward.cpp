#include "cpu/moe_forward.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "core/activation.h"
#include "core/capacity.h"
#include "core/routing.h"
#include "cpu/thread_pool.h"
#include "cpu/tile_gemm.h"

namespace flashmoe::cpu {
namespace {

// Task granularity. Fixed numbers, never derived from the thread count, so the arithmetic of
// every output element is the same however many threads run.
constexpr int64_t kTokenTile = 32;    // tokens per router / combine task
constexpr int64_t kRowTile = 64;      // expert-sorted rows per expert task (weight reuse factor)
constexpr int64_t kFfnChunk = 256;    // ffn columns produced per GEMM0 step
constexpr int64_t kHiddenChunk = 512; // hidden columns per GEMM1 task in the split schedule

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t count) {
  return std::unique_ptr<T[]>(new T[size_t(std::max<int64_t>(count, 1))]);
}

// A run of rows of one expert in the expert-sorted buffers.
struct RowTile {
  int32_t expert;
  int64_t row_begin;
  int64_t rows;
};

template <typename T>
class Forward {
  using Acc = accum_t<T>;

 public:
  Forward(const Problem& problem, const MoETensors& tensors, int num_threads)
      : p_(problem), threads_(std::max(1, num_threads)),
        x_(static_cast<const T*>(tensors.x)),
        router_weight_(static_cast<const T*>(tensors.router_weight)),
        router_bias_(static_cast<const T*>(tensors.router_bias)),
        w1_(static_cast<const T*>(tensors.w1)), b1_(static_cast<const T*>(tensors.b1)),
        w2_(static_cast<const T*>(tensors.w2)), b2_(static_cast<const T*>(tensors.b2)),
        y_(static_cast<T*>(tensors.y)), topk_ids_(tensors.topk_ids),
        topk_weights_(static_cast<Acc*>(tensors.topk_weights)), expert_counts_(tensors.expert_counts),
        router_logits_(static_cast<Acc*>(tensors.router_logits)), dropped_(tensors.dropped) {}

  void run(ExpertSchedule schedule) {
    route();
    assign();
    build_row_tiles();
    if (schedule == ExpertSchedule::automatic) {
      // Few fused tasks leave threads idle (decode): cut the ffn and hidden dimensions instead.
      const bool starved = threads_ > 1 && int64_t(tiles_.size()) < 2 * int64_t(threads_);
      schedule = starved ? ExpertSchedule::split : ExpertSchedule::fused;
    }
    expert_out_ = uninitialized<T>(rows_ * p_.hidden);
    if (schedule == ExpertSchedule::fused) run_fused(); else run_split();
    combine();
  }

 private:
  // Stage 1: logits = x·Wrᵀ (+ b) with fp32 accumulation, then scores and top-k per token.
  void route() {
    const int64_t E = p_.experts, H = p_.hidden, k = p_.top_k;
    std::vector<std::vector<Acc>> scores(static_cast<size_t>(threads_), std::vector<Acc>(static_cast<size_t>(E)));
    parallel_for(ceil_div(p_.tokens, kTokenTile), threads_, [&](int64_t task, int worker) {
      const int64_t t0 = task * kTokenTile, m = std::min(kTokenTile, p_.tokens - t0);
      const T* rows[kTokenTile];
      for (int64_t i = 0; i < m; ++i) rows[i] = x_ + (t0 + i) * H;
      Acc* logits = router_logits_ + t0 * E;
      tile_gemm_nt<T>(rows, m, router_weight_, H, E, H, logits, E, false);
      for (int64_t i = 0; i < m; ++i) {
        Acc* row = logits + i * E;
        if (router_bias_) for (int64_t e = 0; e < E; ++e) row[e] += load_value(router_bias_[e]);
        score_experts(row, E, p_.scoring, scores[worker].data());
        select_top_k(scores[worker].data(), E, k, p_.normalize, topk_ids_ + (t0 + i) * k,
                     topk_weights_ + (t0 + i) * k);
      }
    });
  }

  // Stage 2: token-order slot assignment under the expert capacity.
  void assign() {
    const int64_t picks = p_.tokens * p_.top_k;
    expert_offsets_.assign(size_t(p_.experts + 1), 0);
    pick_row_.resize(size_t(picks));
    row_token_.resize(size_t(picks));
    *dropped_ = assign_slots(topk_ids_, p_.tokens, p_.top_k, p_.experts, p_.expert_capacity,
                             SlotAssignment{expert_counts_, expert_offsets_.data(), pick_row_.data(),
                                            row_token_.data()});
    rows_ = expert_offsets_[size_t(p_.experts)];
  }

  void build_row_tiles() {
    for (int64_t e = 0; e < p_.experts; ++e) {
      for (int64_t r = expert_offsets_[e]; r < expert_offsets_[e + 1]; r += kRowTile) {
        tiles_.push_back(RowTile{int32_t(e), r, std::min(kRowTile, expert_offsets_[e + 1] - r)});
      }
    }
  }

  // GEMM0 for ffn columns [c0, c1) of a row tile, with bias and activation (and the gated
  // product), rounded to the compute dtype into h_rows[i][c0..c1), as torch rounds it.
  void gemm0_columns(const RowTile& tile, const T* const* x_rows, int64_t c0, int64_t c1,
                     T* const* h_rows, Acc* gate, Acc* up) const {
    const int64_t H = p_.hidden, I = p_.ffn, N0 = p_.gemm0_cols(), width = c1 - c0;
    const T* w1 = w1_ + tile.expert * N0 * H;
    const T* b1 = b1_ ? b1_ + tile.expert * N0 : nullptr;
    tile_gemm_nt<T>(x_rows, tile.rows, w1 + c0 * H, H, width, H, gate, width, false);
    if (p_.gated) tile_gemm_nt<T>(x_rows, tile.rows, w1 + (I + c0) * H, H, width, H, up, width, false);
    for (int64_t i = 0; i < tile.rows; ++i) {
      for (int64_t c = 0; c < width; ++c) {
        Acc g = gate[i * width + c] + (b1 ? load_value(b1[c0 + c]) : Acc(0));
        Acc h = activate(p_.activation, g);
        if (p_.gated) h *= up[i * width + c] + (b1 ? load_value(b1[I + c0 + c]) : Acc(0));
        h_rows[i][c0 + c] = store_value<T>(h);
      }
    }
  }

  // GEMM1 for hidden columns [n0, n1) of a row tile, plus bias, rounded into expert_out.
  void gemm1_columns(const RowTile& tile, const T* const* h_rows, int64_t n0, int64_t n1, Acc* out) const {
    const int64_t H = p_.hidden, I = p_.ffn, width = n1 - n0;
    const T* w2 = w2_ + tile.expert * H * I;
    const T* b2 = b2_ ? b2_ + tile.expert * H : nullptr;
    tile_gemm_nt<T>(h_rows, tile.rows, w2 + n0 * I, I, width, I, out, width, false);
    for (int64_t i = 0; i < tile.rows; ++i) {
      T* dst = expert_out_.get() + (tile.row_begin + i) * H + n0;
      for (int64_t n = 0; n < width; ++n) dst[n] = store_value<T>(out[i * width + n] + (b2 ? load_value(b2[n0 + n]) : Acc(0)));
    }
  }

  void gather_token_rows(const RowTile& tile, const T** rows) const {
    for (int64_t i = 0; i < tile.rows; ++i) rows[i] = x_ + int64_t(row_token_[size_t(tile.row_begin + i)]) * p_.hidden;
  }

  // Stage 3a: one task per row tile; the intermediate h never leaves the worker's scratch.
  void run_fused() {
    const int64_t H = p_.hidden, I = p_.ffn;
    struct Scratch { std::unique_ptr<T[]> h; std::unique_ptr<Acc[]> gate, up, out; };
    std::vector<Scratch> scratch(static_cast<size_t>(threads_));
    parallel_for(int64_t(tiles_.size()), threads_, [&](int64_t task, int worker) {
      Scratch& s = scratch[size_t(worker)];
      if (!s.h) {
        s.h = uninitialized<T>(kRowTile * I);
        s.gate = uninitialized<Acc>(kRowTile * kFfnChunk);
        s.up = uninitialized<Acc>(kRowTile * kFfnChunk);
        s.out = uninitialized<Acc>(kRowTile * H);
      }
      const RowTile& tile = tiles_[size_t(task)];
      const T* x_rows[kRowTile];
      T* h_rows[kRowTile];
      gather_token_rows(tile, x_rows);
      for (int64_t i = 0; i < tile.rows; ++i) h_rows[i] = s.h.get() + i * I;
      for (int64_t c0 = 0; c0 < I; c0 += kFfnChunk) {
        gemm0_columns(tile, x_rows, c0, std::min(I, c0 + kFfnChunk), h_rows, s.gate.get(), s.up.get());
      }
      gemm1_columns(tile, h_rows, 0, H, s.out.get());
    });
  }

  // Stage 3b: GEMM0 tasks over (row tile, ffn chunk), then GEMM1 tasks over (row tile, hidden
  // chunk) -- the task graph of the GPU kernel. h for all rows is small exactly when this runs.
  void run_split() {
    const int64_t H = p_.hidden, I = p_.ffn;
    const int64_t ffn_chunks = ceil_div(I, kFfnChunk), hidden_chunks = ceil_div(H, kHiddenChunk);
    auto h = uninitialized<T>(rows_ * I);
    std::vector<std::unique_ptr<Acc[]>> gate(static_cast<size_t>(threads_)), up(static_cast<size_t>(threads_)), out(static_cast<size_t>(threads_));
    parallel_for(int64_t(tiles_.size()) * ffn_chunks, threads_, [&](int64_t task, int worker) {
      if (!gate[size_t(worker)]) {
        gate[size_t(worker)] = uninitialized<Acc>(kRowTile * kFfnChunk);
        up[size_t(worker)] = uninitialized<Acc>(kRowTile * kFfnChunk);
      }
      const RowTile& tile = tiles_[size_t(task / ffn_chunks)];
      const int64_t c0 = (task % ffn_chunks) * kFfnChunk;
      const T* x_rows[kRowTile];
      T* h_rows[kRowTile];
      gather_token_rows(tile, x_rows);
      for (int64_t i = 0; i < tile.rows; ++i) h_rows[i] = h.get() + (tile.row_begin + i) * I;
      gemm0_columns(tile, x_rows, c0, std::min(I, c0 + kFfnChunk), h_rows, gate[size_t(worker)].get(),
                    up[size_t(worker)].get());
    });
    parallel_for(int64_t(tiles_.size()) * hidden_chunks, threads_, [&](int64_t task, int worker) {
      if (!out[size_t(worker)]) out[size_t(worker)] = uninitialized<Acc>(kRowTile * kHiddenChunk);
      const RowTile& tile = tiles_[size_t(task / hidden_chunks)];
      const int64_t n0 = (task % hidden_chunks) * kHiddenChunk;
      const T* h_rows[kRowTile];
      for (int64_t i = 0; i < tile.rows; ++i) h_rows[i] = h.get() + (tile.row_begin + i) * I;
      gemm1_columns(tile, h_rows, n0, std::min(H, n0 + kHiddenChunk), out[size_t(worker)].get());
    });
  }

  // Stage 4: y[t] = sum over admitted picks j, in ascending j, of weight[t, j] * expert_out[row].
  void combine() {
    const int64_t H = p_.hidden, k = p_.top_k;
    std::vector<std::vector<Acc>> acc(static_cast<size_t>(threads_), std::vector<Acc>(static_cast<size_t>(H)));
    parallel_for(ceil_div(p_.tokens, kTokenTile), threads_, [&](int64_t task, int worker) {
      Acc* sum = acc[size_t(worker)].data();
      for (int64_t t = task * kTokenTile; t < std::min(p_.tokens, (task + 1) * kTokenTile); ++t) {
        std::fill(sum, sum + H, Acc(0));
        for (int64_t j = 0; j < k; ++j) {
          const int32_t row = pick_row_[size_t(t * k + j)];
          if (row < 0) continue;
          const Acc weight = topk_weights_[t * k + j];
          const T* src = expert_out_.get() + int64_t(row) * H;
          for (int64_t n = 0; n < H; ++n) sum[n] += weight * load_value(src[n]);
        }
        T* dst = y_ + t * H;
        for (int64_t n = 0; n < H; ++n) dst[n] = store_value<T>(sum[n]);
      }
    });
  }

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

  const Problem& p_;
  const int threads_;
  const T *x_, *router_weight_, *router_bias_, *w1_, *b1_, *w2_, *b2_;
  T* y_;
  int32_t* topk_ids_;
  Acc* topk_weights_;
  int32_t* expert_counts_;
  Acc* router_logits_;
  int64_t* dropped_;

  std::vector<int64_t> expert_offsets_;
  std::vector<int32_t> pick_row_, row_token_;
  int64_t rows_ = 0;
  std::vector<RowTile> tiles_;
  std::unique_ptr<T[]> expert_out_;
};

}  // namespace

void moe_forward(const Problem& problem, const MoETensors& tensors, int num_threads, ExpertSchedule schedule) {
  switch (problem.dtype) {
    case DType::f32: Forward<float>(problem, tensors, num_threads).run(schedule); break;
    case DType::bf16: Forward<bfloat16>(problem, tensors, num_threads).run(schedule); break;
    case DType::f16: Forward<float16>(problem, tensors, num_threads).run(schedule); break;
    case DType::f64: Forward<double>(problem, tensors, num_threads).run(schedule); break;
  }
}

}  // namespace flashmoe::cpu
