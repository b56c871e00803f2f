// The CPU backend's single-rank MoE forward: the dataflow runtime (cpu/dataflow.h) at world
// size 1, on a cached cluster. One code path for one rank and for many.
#pragma once

#include <cstdint>

#include "core/problem.h"
#include "cpu/dataflow.h"

namespace flashmoe::cpu {

// problem.tokens and problem.expert_capacity describe io; layouts as in dataflow.h.
void moe_forward(const Problem& problem, const ExpertWeights& weights, const RankIO& io, int num_threads);

// Frees the clusters kept between calls; returns the bytes released.
int64_t empty_cache();

}  // namespace flashmoe::cpu
