// Which rank owns which expert under expert parallelism.
// Experts are split into world_size contiguous blocks: expert e lives on rank e / (E / W).
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe {

struct ExpertPlacement {
  int64_t world_size = 1;
  int64_t experts = 1;

  FLASHMOE_HD int64_t local_experts() const { return experts / world_size; }
  FLASHMOE_HD int64_t owner(int64_t expert) const { return expert / local_experts(); }
  FLASHMOE_HD int64_t local_index(int64_t expert) const { return expert % local_experts(); }
  FLASHMOE_HD int64_t global_expert(int64_t rank, int64_t local_expert) const {
    return rank * local_experts() + local_expert;
  }
  // Experts of one token that can land on one owner: a token picks distinct experts.
  FLASHMOE_HD int64_t max_picks_per_owner(int64_t top_k) const {
    return top_k < local_experts() ? top_k : local_experts();
  }
};

// nullptr when the placement is valid, else the reason.
inline const char* validate(const ExpertPlacement& placement) {
  if (placement.world_size < 1) return "world_size must be >= 1";
  if (placement.experts < 1) return "experts must be >= 1";
  if (placement.experts % placement.world_size != 0) return "experts must be divisible by world_size";
  return nullptr;
}

}  // namespace flashmoe
