// The task-count bound: how a rank knows its last task is its last, with no global barrier.
//
// Before any signal arrives, a rank counts every cell (source, local expert) at its largest
// possible size, plus the combine of its own tokens. Each arriving SignalWord carries the cell's
// real row count and lowers the bound by the difference. A cell not yet signalled still counts
// at its largest (at least two tasks), so while any signal is missing the bound stays above what
// can have completed; completed ==
// bound therefore means every signal has arrived and every task has run.
//
// The combine counts at least one task, even for a rank with no tokens, and is released only when
// every return flag has arrived. Return flags are the owners' acknowledgement that they consumed
// this rank's dispatch signals, so when a rank finishes a call, overwriting its dispatch flags in
// the next epoch can no longer hide one the owner has not read yet.
#pragma once

#include <cstdint>

#include "core/checked.h"
#include "core/expert_placement.h"
#include "core/tiling.h"

namespace flashmoe {

struct TaskBound {
  Tiling tiling;
  ExpertPlacement placement;
  int64_t max_cell_rows = 0;  // rows one source can send one expert: its token count at most
  int64_t ffn = 0;
  int64_t hidden = 0;
  int64_t shared_ffn = 0;     // S of the shared expert, 0 for none

  template <typename N = int64_t>
  FLASHMOE_HD N cell_tasks(Number<N> rows) const { return tiling.cell_tasks<N>(rows, N(ffn), N(hidden)); }
  // Combine tasks of a rank with `own_tokens` tokens: one per token tile, and never none.
  template <typename N = int64_t>
  FLASHMOE_HD N combine_tasks(Number<N> own_tokens) const {
    const N tiles = tiling.token_tiles<N>(own_tokens);
    return tiles > N(0) ? tiles : N(1);
  }
  // The shared expert's tile tasks on a rank's own tokens (its rows are known before any signal):
  // GEMM0 over (row tile, S tile), then GEMM1 over (row tile, hidden tile); none without one.
  template <typename N = int64_t>
  FLASHMOE_HD N shared_tasks(Number<N> own_tokens) const {
    return shared_ffn > 0 ? tiling.cell_tasks<N>(own_tokens, N(shared_ffn), N(hidden)) : N(0);
  }
  // Upper bound for a rank that will combine `own_tokens` tokens.
  template <typename N = int64_t>
  FLASHMOE_HD N initial(Number<N> own_tokens) const {
    return N(placement.world_size) * N(placement.local_experts()) * cell_tasks<N>(N(max_cell_rows)) +
           shared_tasks<N>(own_tokens) + combine_tasks<N>(own_tokens);
  }

  // Host: throws SizeError when the bound of a rank with max_cell_rows tokens overflows.
  void check() const {
    require_size(initial<CheckedInt>(CheckedInt(max_cell_rows)), "max_tokens", max_cell_rows,
                 "the task-count bound (world size * local experts * tile tasks of a full cell)");
  }
  // How much the bound drops when a cell turns out to have `rows` rows.
  FLASHMOE_HD int64_t correction(int64_t rows) const { return cell_tasks(max_cell_rows) - cell_tasks(rows); }
};

}  // namespace flashmoe
