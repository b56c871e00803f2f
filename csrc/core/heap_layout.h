// HeapLayout: byte offsets of every cell of one rank's symmetric heap. Every rank has the same
// layout, so a sender computes the address of a cell on any peer with its own arithmetic.
//
//   [dispatch flags]  SignalWord [W sources][L local experts]   written by sources, read here
//   [return flags]    SignalWord [W owners][L local experts]    written by owners, read here
//   [dispatch rows]   dtype [W sources][region_rows][H]         tokens sent here, per source
//   [return rows]     dtype [W owners][region_rows][H]          expert outputs coming home
//
// A source packs the rows it sends one owner in that owner's local-expert order: the cell of
// local expert l starts at first_row = the rows of the owner's experts l' < l. The owner writes the
// outputs back at the same first_row in the source's return region for that owner, so both sides
// use one row number per pick, and it travels in the SignalWord. region_rows bounds what one source
// can send one owner: each of its tokens picks at most min(k, L) of that owner's experts.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/expert_placement.h"
#include "core/signal_word.h"

namespace flashmoe {

struct HeapLayout {
  static constexpr int64_t kAlignment = 128;

  ExpertPlacement placement;
  int64_t max_tokens = 0;  // per rank, per call
  int64_t top_k = 1;
  int64_t hidden = 0;
  int64_t element_size = 0;

  FLASHMOE_HD static int64_t align(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

  FLASHMOE_HD int64_t world() const { return placement.world_size; }
  FLASHMOE_HD int64_t local_experts() const { return placement.local_experts(); }
  FLASHMOE_HD int64_t region_rows() const { return max_tokens * placement.max_picks_per_owner(top_k); }
  FLASHMOE_HD int64_t row_bytes() const { return hidden * element_size; }

  FLASHMOE_HD int64_t flags_bytes() const { return align(world() * local_experts() * int64_t(sizeof(SignalWord))); }
  FLASHMOE_HD int64_t region_bytes() const { return region_rows() * row_bytes(); }

  // Flag announcing the cell that `source` sent for this rank's local expert.
  FLASHMOE_HD int64_t dispatch_flag(int64_t source, int64_t local_expert) const {
    return (source * local_experts() + local_expert) * int64_t(sizeof(SignalWord));
  }
  // Flag announcing that `owner` has written back the outputs of its local expert's cell.
  FLASHMOE_HD int64_t return_flag(int64_t owner, int64_t local_expert) const {
    return flags_bytes() + (owner * local_experts() + local_expert) * int64_t(sizeof(SignalWord));
  }
  FLASHMOE_HD int64_t dispatch_row(int64_t source, int64_t row) const {
    return 2 * flags_bytes() + source * align(region_bytes()) + row * row_bytes();
  }
  FLASHMOE_HD int64_t return_row(int64_t owner, int64_t row) const {
    return 2 * flags_bytes() + world() * align(region_bytes()) + owner * align(region_bytes()) + row * row_bytes();
  }
  FLASHMOE_HD int64_t total_bytes() const { return 2 * flags_bytes() + 2 * world() * align(region_bytes()); }
};

}  // namespace flashmoe
