// Routing of one token: scores from logits, selection keys (selection bias, group limit), top-k
// with ties to the lower index, and the pick weights (normalised, scaled). Pure and host-testable;
// every backend calls route_token for its gate. python/flashmoe/reference.py route() is the spec.
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
// total order on expert ids, so the top_k under it are one well-defined list. `scores` is an
// array or any Keys with operator[] (SelectionKeys).
template <typename Keys>
FLASHMOE_HD bool picked_before(const Keys& scores, int32_t a, int32_t b) {
  if (outranks(scores[a], scores[b])) return true;
  if (outranks(scores[b], scores[a])) return false;
  return a < b;
}

// Restores the heap below `root` of heap[0, size): every node is picked_before() its children's
// inverse, i.e. the root holds the id picked last among the kept ones.
template <typename Keys>
FLASHMOE_HD void sift_down_last_picked(const Keys& scores, int32_t* heap, int64_t size, int64_t root) {
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

// Picks the top_k highest keys under outranks(), ties to the lower expert index; the ids are
// distinct and in range. O(E·log k): a heap of the k best so far in topk_ids, rooted at the one
// picked last, which each later expert only has to beat; then a heap sort puts them in pick order.
template <typename Keys>
FLASHMOE_HD void pick_top_k(const Keys& scores, int64_t experts, int64_t top_k, int32_t* topk_ids) {
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
}

// Divides the k weights by their sum, added in ascending j.
template <typename Acc>
FLASHMOE_HD void normalize_weights(Acc* topk_weights, int64_t top_k) {
  Acc sum = 0;
  for (int64_t j = 0; j < top_k; ++j) sum += topk_weights[j];
  for (int64_t j = 0; j < top_k; ++j) topk_weights[j] /= sum;
}

// The top_k highest scores and their weights (normalised when asked): routing with no options.
template <typename Acc>
FLASHMOE_HD void select_top_k(const Acc* scores, int64_t experts, int64_t top_k, bool normalize,
                              int32_t* topk_ids, Acc* topk_weights) {
  pick_top_k(scores, experts, top_k, topk_ids);
  for (int64_t j = 0; j < top_k; ++j) topk_weights[j] = scores[topk_ids[j]];
  if (normalize) normalize_weights(topk_weights, top_k);
}

// The key an expert is chosen by: its score plus the selection bias, or -inf outside the kept
// groups (kept: one flag per group, nonzero when kept; null when there is no group limit).
template <typename Acc>
struct SelectionKeys {
  const Acc* scores;
  const Acc* bias;  // [E] or null
  const Acc* kept;  // [num_groups] or null
  int64_t group_size;
  FLASHMOE_HD Acc operator[](int64_t e) const {
    if (kept != nullptr && kept[e / group_size] == Acc(0)) return Acc(-INFINITY);
    return bias != nullptr ? scores[e] + bias[e] : scores[e];
  }
};

FLASHMOE_HD bool group_limited(const Problem& p) { return p.topk_groups < p.num_groups; }

// Scratch values route_token needs: E scores, and two per group under a group limit.
FLASHMOE_HD int64_t route_scratch(const Problem& p) {
  return p.experts + (group_limited(p) ? 2 * p.num_groups : 0);
}

// The score of group g: the sum of its two best keys (best first; its one key for groups of one).
template <typename Acc>
FLASHMOE_HD Acc group_score(const Problem& p, const SelectionKeys<Acc>& keys, int64_t g) {
  const int64_t size = p.experts / p.num_groups;
  const int32_t first = int32_t(g * size);
  int32_t best = first, second = -1;
  for (int32_t e = first + 1; e < first + size; ++e) {
    if (picked_before(keys, e, best)) {
      second = best;
      best = e;
    } else if (second < 0 || picked_before(keys, e, second)) {
      second = e;
    }
  }
  return second < 0 ? keys[best] : keys[best] + keys[second];
}

// Whether group g is among the topk_groups best of groups[num_groups] (ranked as experts are:
// outranks(), then the lower index): Acc(1) when kept, else Acc(0).
template <typename Acc>
FLASHMOE_HD Acc group_kept(const Problem& p, const Acc* groups, int64_t g) {
  int64_t ahead = 0;
  for (int64_t h = 0; h < p.num_groups; ++h) ahead += picked_before(groups, int32_t(h), int32_t(g));
  return ahead < p.topk_groups ? Acc(1) : Acc(0);
}

// kept[g] = 1 for the topk_groups best groups, else 0 (groups: num_groups scratch values).
template <typename Acc>
FLASHMOE_HD void keep_best_groups(const Problem& p, const SelectionKeys<Acc>& keys, Acc* groups, Acc* kept) {
  for (int64_t g = 0; g < p.num_groups; ++g) groups[g] = group_score(p, keys, g);
  for (int64_t g = 0; g < p.num_groups; ++g) kept[g] = group_kept(p, groups, g);
}

// The weights of the picks topk_ids [k] (in pick order) from the scores they were chosen by (the
// raw logits under softmax_topk): softmax over the k logits, or the scores normalised when asked;
// then the routed scaling factor.
template <typename Acc>
FLASHMOE_HD void weigh_picks(const Problem& p, const Acc* scores, const int32_t* topk_ids, Acc* topk_weights) {
  const int64_t k = p.top_k;
  for (int64_t j = 0; j < k; ++j) topk_weights[j] = scores[topk_ids[j]];
  if (p.scoring == Scoring::softmax_topk) {
    score_experts(topk_weights, k, Scoring::softmax, topk_weights);  // in place: reads each logit first
  } else if (p.normalize) {
    normalize_weights(topk_weights, k);
  }
  const Acc scale = Acc(p.routed_scaling_factor);
  for (int64_t j = 0; j < k; ++j) topk_weights[j] *= scale;
}

// One token's routing from its logits [E] (router bias included) under every option of the
// problem: topk_ids [k] in pick order and topk_weights [k]. selection_bias: [E] or null.
// scratch: route_scratch(p) values.
template <typename Acc>
FLASHMOE_HD void route_token(const Problem& p, const Acc* logits, const Acc* selection_bias, Acc* scratch,
                             int32_t* topk_ids, Acc* topk_weights) {
  const int64_t E = p.experts, k = p.top_k;
  const bool topk_softmax = p.scoring == Scoring::softmax_topk;
  if (!topk_softmax) score_experts(logits, E, p.scoring, scratch);
  const Acc* scores = topk_softmax ? logits : scratch;  // softmax_topk chooses by the raw logits
  SelectionKeys<Acc> keys{scores, selection_bias, nullptr, E / p.num_groups};
  if (group_limited(p)) {
    keep_best_groups(p, keys, scratch + E, scratch + E + p.num_groups);
    keys.kept = scratch + E + p.num_groups;
  }
  pick_top_k(keys, E, k, topk_ids);
  weigh_picks(p, scores, topk_ids, topk_weights);
}

}  // namespace flashmoe
