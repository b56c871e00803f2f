// The native steps of the all_to_all transport (python/flashmoe/distributed/all_to_all.py moves the
// rows between them with torch.distributed.all_to_all_single):
//
//   route_tokens     source: gate every token, assign slots under the source's capacity
//   run_expert_rows  owner: the expert FFN of every row it received, cell by cell
//   combine_tokens   source: y from the rows that came home, in the contract's order
//
// Each step computes what the dataflow runtime computes for the same rows, with the same helpers
// (cpu/source_steps.h, cpu/expert_tiles.h) and the same tiles, so the two transports agree bit
// for bit, and both equal the single-rank operator on the rank's tokens.
#pragma once

#include <cstdint>

#include "core/problem.h"
#include "cpu/dataflow.h"

namespace flashmoe::cpu {

// Routing of the source's io.tokens tokens into io's outputs (y is not touched), plus the slot
// assignment: expert_offsets [E + 1], pick_row [T·k] (−1 when dropped), row_token [T·k] (the first
// expert_offsets[E] entries are used: the token of each admitted row, in expert-sorted order).
void route_tokens(const Problem& problem, const ExpertWeights& weights, const RankIO& io, int64_t* expert_offsets,
                  int32_t* pick_row, int32_t* row_token, int threads);

// rows [R, H]: the rows this owner received, grouped in cells (source s, local expert l) in the order
// s·L + l, cell c holding cell_rows[c] rows. out [R, H] gets each row's expert output. The weights
// hold this owner's L local experts only (w1 [L, N0, H], w2 [L, H, I], b1 [L, N0], b2 [L, H]).
void run_expert_rows(const Problem& problem, const ExpertWeights& local_weights, const void* rows,
                     const int64_t* cell_rows, int64_t cells, int64_t local_experts, void* out, int threads);

// The shared expert's part of a source's combine (problem.shared_ffn > 0): its outputs of the
// source's tokens, computed locally by run_expert_rows on x with the shared weights as one local
// expert of one cell (problem.shared_expert()), and what its weight needs.
struct SharedRows {
  const void* rows = nullptr;  // [T, H], the shared expert's output of every token
  const void* x = nullptr;     // [T, H], the source's tokens (for the gate)
  const void* gate = nullptr;  // [1, H] shared_gate, when problem.has_shared_gate
};

// y [T, H] = Σ_j topk_weights[t, j] · rows_home[pick_row[t, j]] over admitted picks, ascending j, then
// + g[t] · shared.rows[t] with a shared expert (as the dataflow's combine).
// rows_home [R, H]: the expert outputs of the source's admitted rows, in expert-sorted order.
void combine_tokens(const Problem& problem, int64_t tokens, const int32_t* pick_row, const void* topk_weights,
                    const void* rows_home, void* y, int threads, const SharedRows& shared = {});

}  // namespace flashmoe::cpu
