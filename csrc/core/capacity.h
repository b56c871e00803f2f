// Expert capacity and the deterministic token-order slot assignment.
//
// Each expert admits its picks in ascending token index and keeps the first `capacity` of them.
// The assignment is a counting sort over (token, pick) in row-major order, so a token's slot is
// its rank among the expert's earlier tokens: no atomics, no dependence on scheduling.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/problem.h"

namespace flashmoe {

// C = ceil(capacity_factor * tokens * top_k / experts), evaluated left to right in double
// exactly as the Python reference does, then clamped to `tokens` (an expert cannot receive
// more picks than there are tokens) so that a huge factor cannot overflow int64.
// The caller has checked that capacity_factor is finite and > 0.
FLASHMOE_HD int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t top_k, int64_t experts) {
  const double capacity = std::ceil(capacity_factor * double(tokens) * double(top_k) / double(experts));
  return capacity >= double(tokens) ? tokens : int64_t(capacity);
}

// Admitted rows of an expert that received `count` picks.
FLASHMOE_HD int64_t admitted_rows(int64_t count, int64_t capacity) {
  return capacity == kDropless || count < capacity ? count : capacity;
}

// Whether pick j of a token (token_ids: its k picks) goes to an expert. An id outside [0, experts)
// does not: `experts` is the sentinel HF's expert-parallel mode writes for an expert that is not
// local. Nor does a repeat of an earlier pick of the same token, so a cell never holds more rows
// than there are tokens. Python rejects both but the sentinel; the kernels stay in bounds anyway.
FLASHMOE_HD bool routed_pick(const int32_t* token_ids, int64_t j, int64_t experts) {
  const int32_t e = token_ids[j];
  if (e < 0 || e >= experts) return false;
  for (int64_t i = 0; i < j; ++i) {
    if (token_ids[i] == e) return false;
  }
  return true;
}

struct SlotAssignment {
  int32_t* expert_counts;   // [E]     picks per expert, before dropping
  int64_t* expert_offsets;  // [E + 1] first row of each expert in the expert-sorted buffers
  int32_t* pick_row;        // [T * k] row of pick (t, j), or -1 when it was dropped
  int32_t* row_token;       // [rows]  token of each admitted row; rows = expert_offsets[E]
};

// Fills `out` from topk_ids [T, k]. Returns the number of dropped picks; a pick that goes to no
// expert (routed_pick) gets row -1 and is neither counted nor dropped.
inline int64_t assign_slots(const int32_t* topk_ids, int64_t tokens, int64_t top_k, int64_t experts,
                            int64_t capacity, const SlotAssignment& out) {
  for (int64_t e = 0; e < experts; ++e) out.expert_counts[e] = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      if (routed_pick(topk_ids + t * top_k, j, experts)) ++out.expert_counts[topk_ids[t * top_k + j]];
    }
  }
  out.expert_offsets[0] = 0;
  int64_t dropped = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = admitted_rows(out.expert_counts[e], capacity);
    dropped += out.expert_counts[e] - rows;
    out.expert_offsets[e + 1] = out.expert_offsets[e] + rows;
  }
  // expert_counts doubles as the running slot cursor below, so restore it afterwards.
  for (int64_t e = 0; e < experts; ++e) out.expert_counts[e] = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      if (!routed_pick(topk_ids + t * top_k, j, experts)) {
        out.pick_row[p] = -1;
        continue;
      }
      const int32_t e = topk_ids[p];
      const int64_t slot = out.expert_counts[e]++;
      const bool admitted = slot < out.expert_offsets[e + 1] - out.expert_offsets[e];
      out.pick_row[p] = admitted ? int32_t(out.expert_offsets[e] + slot) : -1;
      if (admitted) out.row_token[out.expert_offsets[e] + slot] = int32_t(t);
    }
  }
  return dropped;
}

}  // namespace flashmoe
