// Routing of one token: scores from logits, top-k with ties to the lower expert index,
// and the pick weights. Pure and host-testable; every backend calls this for its gate.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/problem.h"

namespace flashmoe {

// logits[E] -> scores[E] (softmax or sigmoid), summed in ascending expert order.
template <typename Acc>
FLASHMOE_HD void score_experts(const Acc* logits, int64_t experts, Scoring scoring, Acc* scores) {
  if (scoring == Scoring::sigmoid) {
    for (int64_t e = 0; e < experts; ++e) scores[e] = Acc(1) / (Acc(1) + std::exp(-logits[e]));
    return;
  }
  Acc max_logit = logits[0];
  for (int64_t e = 1; e < experts; ++e) max_logit = logits[e] > max_logit ? logits[e] : max_logit;
  Acc sum = 0;
  for (int64_t e = 0; e < experts; ++e) {
    scores[e] = std::exp(logits[e] - max_logit);
    sum += scores[e];
  }
  for (int64_t e = 0; e < experts; ++e) scores[e] /= sum;
}

// Orders scores as a descending sort that puts NaN first (torch.sort's order): a NaN outranks
// every number, and a strict comparison keeps the lower index on ties, NaN ties included.
template <typename Acc>
FLASHMOE_HD bool outranks(Acc a, Acc b) {
  return a != a ? b == b : a > b;
}

// Picks the top_k highest scores under outranks(); the ids are always distinct and in range.
template <typename Acc>
FLASHMOE_HD void select_top_k(const Acc* scores, int64_t experts, int64_t top_k, bool normalize,
                              int32_t* topk_ids, Acc* topk_weights) {
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken = taken || topk_ids[i] == int32_t(e);
      if (taken) continue;
      if (best < 0 || outranks(scores[e], scores[best])) best = e;
    }
    topk_ids[j] = int32_t(best);
    topk_weights[j] = scores[best];
  }
  if (normalize) {
    Acc sum = 0;
    for (int64_t j = 0; j < top_k; ++j) sum += topk_weights[j];
    for (int64_t j = 0; j < top_k; ++j) topk_weights[j] /= sum;
  }
}

}  // namespace flashmoe
