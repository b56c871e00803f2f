// Everything the persistent kernel reads, passed by value as the launch's parameter block.
#pragma once

#include <cstdint>

#include "core/problem.h"
#include "core/task_bound.h"
#include "cuda/moe_cuda.h"
#include "cuda/workspace.h"

namespace flashmoe::cuda {

struct KernelParams {
  Problem problem;
  Pointers pointers;
  Workspace workspace;
  TaskBound bound;        // world size 1, gpu_tiling(), cells of at most `tokens` rows
  int32_t processors = 0;  // CTAs 1..processors; CTA 0 is the OS CTA
  uint32_t epoch = 1;      // the control block is zeroed each call, so its signals start from 0
  // Debug builds (FLASHMOE_BOUNDED_WAITS): how long any one wait may last before it traps. Idle
  // processors wait through the whole gate; under compute-sanitizer everything is ~100x slower.
  uint64_t wait_limit_ns = 10ull * 1000 * 1000 * 1000;
};

// The parameters of one call with `processors` processor CTAs (plus the OS CTA).
inline KernelParams make_params(const Problem& problem, const Pointers& pointers, int processors) {
  KernelParams params;
  params.problem = problem;
  params.pointers = pointers;
  Workspace& workspace = params.workspace;
  workspace.processors = processors;
  workspace.tokens = problem.tokens;
  workspace.experts = problem.experts;
  workspace.top_k = problem.top_k;
  workspace.hidden = problem.hidden;
  workspace.ffn = problem.ffn;
  workspace.shared_ffn = problem.shared_ffn;
  workspace.element_size = dtype_size(problem.dtype);
  params.bound = TaskBound{gpu_tiling(), ExpertPlacement{1, problem.experts}, problem.tokens, problem.ffn,
                           problem.hidden, problem.shared_ffn};
  // SizeError (named) before any unchecked arithmetic runs on these sizes.
  workspace.check();
  params.bound.check();
  workspace.plan();
  params.processors = processors;
  return params;
}

}  // namespace flashmoe::cuda
