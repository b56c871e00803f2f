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

// The order of the picks: higher under outranks() first, then the lower expert index. A strict
// total order on expert ids, so the top_k under it are one well-defined list.
template <typename Acc>
FLASHMOE_HD bool picked_before(const Acc* scores, int32_t a, int32_t b) {
  if (outranks(scores[a], scores[b])) return true;
  if (outranks(scores[b], scores[a])) return false;
  return a < b;
}

// Restores the heap below `root` of heap[0, size): every node is picked_before() its children's
// inverse, i.e. the root holds the id picked last among the kept ones.
template <typename Acc>
FLASHMOE_HD void sift_down_last_picked(const Acc* scores, int32_t* heap, int64_t size, int64_t root) {
  for (;;) {
    int64_t last = root;
    const int64_t left = 2 * root + 1, right = left + 1;
    if (left < size && picked_before(scores, heap[last], heap[left])) last = left;
    if (right < size && picked_before(scores, heap[last], heap[right])) last = right;
    if (last == root) return;
    const int32_t id = heap[root];
    heap[root] = heap[last];
    heap[last] = id;
    root = last;
  }
}

// Picks the top_k highest scores under outranks(), ties to the lower expert index; the ids are
// distinct and in range. O(E·log k): a heap of the k best so far in topk_ids, rooted at the one
// picked last, which each later expert only has to beat; then a heap sort puts them in pick order.
template <typename Acc>
FLASHMOE_HD void select_top_k(const Acc* scores, int64_t experts, int64_t top_k, bool normalize,
                              int32_t* topk_ids, Acc* topk_weights) {
  int32_t* heap = topk_ids;
  for (int64_t e = 0; e < top_k; ++e) heap[e] = int32_t(e);
  for (int64_t node = top_k / 2 - 1; node >= 0; --node) sift_down_last_picked(scores, heap, top_k, node);
  for (int64_t e = top_k; e < experts; ++e) {
    if (!picked_before(scores, int32_t(e), heap[0])) continue;
    heap[0] = int32_t(e);
    sift_down_last_picked(scores, heap, top_k, 0);
  }
  // Heap sort: the root (picked last of those left) goes to the end, so ids end in pick order.
  for (int64_t size = top_k - 1; size > 0; --size) {
    const int32_t id = heap[0];
    heap[0] = heap[size];
    heap[size] = id;
    sift_down_last_picked(scores, heap, size, 0);
  }
  for (int64_t j = 0; j < top_k; ++j) topk_weights[j] = scores[topk_ids[j]];
  if (normalize) {
    Acc sum = 0;
    for (int64_t j = 0; j < top_k; ++j) sum += topk_weights[j];
    for (int64_t j = 0; j < top_k; ++j) topk_weights[j] /= sum;
  }
}

}  // namespace flashmoe
