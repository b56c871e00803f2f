// Everything the persistent kernel reads, passed by value as the launch's parameter block.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/problem.h"
#include "core/routing.h"
#include "core/task_bound.h"
#include "cuda/moe_cuda.h"
#include "cuda/workspace.h"

namespace flashmoe::cuda {

// Ranks of expert parallelism that one launch reaches by load and store: the kernel has one
// source, and how a task reaches a peer's heap is this table. Its entries are the local heap at
// world size 1, the other virtual ranks' heaps in a loopback launch (one GPU), the emulation's
// other thread teams, or nvshmem_ptr() of a peer over NVLink. A peer that load/store cannot reach
// (RDMA) has no entry here; the host refuses such a world until the put path exists.
constexpr int kMaxWorld = 64;

struct Ranks {
  int32_t rank = 0;
  int32_t world = 1;
  uint8_t* heaps[kMaxWorld] = {};  // every rank's heap (HeapLayout of this world), indexed by rank
  // World > 1: this rank's epoch word, in device memory that outlives the call (zero before the
  // first). The kernel advances it itself (SignalWord::next_epoch) so that a graph replay is a new
  // epoch, and the heap's flags are never zeroed again: a peer may already be writing the next
  // call's. Null at world size 1, where the flags are zeroed with the control block and `epoch` is used.
  uint32_t* epoch = nullptr;
  // World > 1: kStatusWords words of device memory, zero before the call (kernel_error.h). A wait for
  // a peer's flag that passes peer_timeout_ns writes what it waited for there, and the call exits.
  uint32_t* status = nullptr;
  uint64_t peer_timeout_ns = 60ull * 1000 * 1000 * 1000;
  // Tests only (tests/cpp/test_cuda_emulation.cpp): a rank that sends its dispatch flags but never a
  // return flag and then vanishes, so that its peers' return-flag waits must give up on it.
  enum Fault : int32_t { kNoFault = 0, kVanishAfterDispatch = 1 };
  int32_t fault = kNoFault;
};

struct KernelParams {
  Problem problem;
  Pointers pointers;
  Workspace workspace;
  TaskBound bound;        // gpu_tiling(), W·L cells of at most max_tokens rows (tokens at world size 1)
  Ranks ranks;
  int32_t processors = 0;  // CTAs 1..processors; CTA 0 is the OS CTA
  uint32_t epoch = 1;      // world size 1: the control block is zeroed each call, so its signals start from 0
  // Debug builds (FLASHMOE_BOUNDED_WAITS): how long any one wait may last before it traps. Idle
  // processors wait through the whole gate; under compute-sanitizer everything is ~100x slower.
  uint64_t wait_limit_ns = 10ull * 1000 * 1000 * 1000;

  // The limit of a wait on this rank's own actors (a doorbell, the inbox). Under expert parallelism
  // they may idle as long as a peer works (up to the peer timeout), so the limit grows by it: the
  // debug trap never fires before a cross-rank wait gives up and names the peer.
  FLASHMOE_HD uint64_t local_wait_limit_ns() const {
    return ranks.world > 1 ? wait_limit_ns + ranks.peer_timeout_ns : wait_limit_ns;
  }
};

// The launch passes KernelParams by value (__grid_constant__): the classic 4 KB parameter space.
static_assert(sizeof(KernelParams) <= 4096, "KernelParams fits a kernel's parameter space");

// The parameters of one call with `processors` processor CTAs (plus the OS CTA). Under expert
// parallelism (`ranks.world` > 1) the weights are this rank's L = E / W experts, `max_tokens` sizes
// the heaps (every rank's tokens are at most that), and `ranks` holds every heap and this rank's epoch.
inline KernelParams make_params(const Problem& problem, const Pointers& pointers, int processors,
                                const Ranks& ranks = Ranks{}, int64_t max_tokens = 0) {
  if (ranks.world < 1 || ranks.world > kMaxWorld) {
    throw std::invalid_argument("flashmoe: world_size must be 1.." + std::to_string(kMaxWorld) + ", got " +
                                std::to_string(ranks.world));
  }
  if (ranks.rank < 0 || ranks.rank >= ranks.world) {
    throw std::invalid_argument("flashmoe: rank must be in [0, world_size), got " + std::to_string(ranks.rank));
  }
  if (problem.experts % ranks.world != 0) {
    throw std::invalid_argument("flashmoe: world_size " + std::to_string(ranks.world) + " must divide experts (" +
                                std::to_string(problem.experts) + ")");
  }
  if (ranks.world > 1) {
    if (max_tokens < problem.tokens) {
      throw std::invalid_argument("flashmoe: max_tokens (" + std::to_string(max_tokens) +
                                  ") must be at least this rank's tokens (" + std::to_string(problem.tokens) + ")");
    }
    if (ranks.epoch == nullptr || ranks.status == nullptr) {
      throw std::invalid_argument("flashmoe: a world of several ranks needs an epoch word and status words");
    }
    if (ranks.peer_timeout_ns == 0) throw std::invalid_argument("flashmoe: peer_timeout_ns must be > 0");
    for (int32_t r = 0; r < ranks.world; ++r) {
      if (ranks.heaps[r] == nullptr) {
        throw std::invalid_argument("flashmoe: rank " + std::to_string(r) +
                                    "'s heap is not reachable by load/store (no pointer to it)");
      }
      if (reinterpret_cast<uintptr_t>(ranks.heaps[r]) % HeapLayout::kAlignment != 0) {
        throw std::invalid_argument("flashmoe: rank " + std::to_string(r) + "'s heap must be " +
                                    std::to_string(HeapLayout::kAlignment) + "-byte aligned");
      }
    }
  }
  KernelParams params;
  params.problem = problem;
  params.pointers = pointers;
  Workspace& workspace = params.workspace;
  workspace.processors = processors;
  workspace.world = ranks.world;
  workspace.max_tokens = ranks.world > 1 ? max_tokens : 0;
  workspace.tokens = problem.tokens;
  workspace.experts = problem.experts;
  workspace.top_k = problem.top_k;
  workspace.hidden = problem.hidden;
  workspace.ffn = problem.ffn;
  workspace.shared_ffn = problem.shared_ffn;
  workspace.element_size = dtype_size(problem.dtype);
  workspace.scores_per_token = route_scratch(problem);
  params.bound = TaskBound{gpu_tiling(), ExpertPlacement{ranks.world, problem.experts}, workspace.heap_tokens(),
                           problem.ffn, problem.hidden, problem.shared_ffn};
  // SizeError (named) before any unchecked arithmetic runs on these sizes.
  workspace.check();
  params.bound.check();
  workspace.plan();
  params.ranks = ranks;
  params.processors = processors;
  return params;
}

}  // namespace flashmoe::cuda
