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

#include "core/checked.h"
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

  // Sizes are templates over the number type (core/checked.h): int64_t here, CheckedInt in check().
  template <typename N = int64_t>
  FLASHMOE_HD static N align(N bytes) { return ceil_div_as<N>(bytes, N(kAlignment)) * N(kAlignment); }

  FLASHMOE_HD int64_t world() const { return placement.world_size; }
  FLASHMOE_HD int64_t local_experts() const { return placement.local_experts(); }
  template <typename N = int64_t>
  FLASHMOE_HD N region_rows() const { return N(max_tokens) * N(placement.max_picks_per_owner(top_k)); }
  template <typename N = int64_t>
  FLASHMOE_HD N row_bytes() const { return N(hidden) * N(element_size); }

  template <typename N = int64_t>
  FLASHMOE_HD N flags_bytes() const {
    return align<N>(N(world()) * N(local_experts()) * N(int64_t(sizeof(SignalWord))));
  }
  template <typename N = int64_t>
  FLASHMOE_HD N region_bytes() const { return region_rows<N>() * row_bytes<N>(); }

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
  template <typename N = int64_t>
  FLASHMOE_HD N total_bytes() const {
    return N(2) * flags_bytes<N>() + N(2) * N(world()) * align<N>(region_bytes<N>());
  }

  // Host: throws SizeError naming the argument when a size overflows or a region needs more rows
  // than a SignalWord can address. Every offset above is then below total_bytes(), so in range.
  void check() const {
    require_size(region_rows<CheckedInt>(), "max_tokens", max_tokens,
                 "the rows one source sends one owner (max_tokens * min(top_k, local experts))", SignalWord::kMaxRows);
    require_size(row_bytes<CheckedInt>(), "hidden", hidden, "one row's bytes (hidden * element size)");
    require_size(flags_bytes<CheckedInt>(), "experts", placement.experts, "the heap's flags");
    require_size(region_bytes<CheckedInt>(), "hidden", hidden, "one region's bytes (region rows * hidden * element size)");
    require_size(total_bytes<CheckedInt>(), "world_size", world(), "the symmetric heap's bytes");
  }
};

}  // namespace flashmoe
