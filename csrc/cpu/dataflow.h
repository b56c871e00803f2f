// The CPU dataflow runtime: W ranks in one process, each with its own simulated symmetric heap,
// running the protocol of csrc/core exactly as the persistent GPU kernel does:
//
//   gate      route the rank's tokens, assign capacity slots in token order
//   dispatch  copy each admitted token into its expert owner's heap, then release-store a
//             SignalWord (an expert that gets no rows still gets rows=0)
//   subscribe poll dispatch flags with acquire loads, turn arrivals into row tiles that become
//             GEMM0 tasks as intermediate buffers free up, lower the task bound; poll return flags
//             and release the combine once all have arrived
//   process   GEMM0 tiles; the last GEMM0 tile of a row tile releases its GEMM1 tiles; GEMM1
//             writes into the source's heap, and the last tile of a cell signals the source
//   combine   y in fixed pick order from the rows that came home, then the shared expert's row
//
// The shared expert (shape.shared_ffn > 0) is an always-on local expert of the rank's own tokens:
// its row tiles (local_expert kSharedExpert, rows = token indices, read straight from x) go through
// the same GEMM0/GEMM1 tasks and intermediate buffers, their outputs land in a rank-local buffer, and
// the combine waits for them as it waits for the return flags.
//
// A rank is done when its completed tasks reach its corrected task bound: no global barrier.
// Flags are never cleared; each call has a new epoch. The single-rank native operator is W=1.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/expert_placement.h"
#include "core/problem.h"
#include "core/tiling.h"
#include "cpu/chaos.h"
#include "cpu/transport.h"

namespace flashmoe::cpu {

struct ClusterConfig {
  Problem shape;               // hidden, ffn, experts, top_k, options and dtype; tokens ignored
  int64_t world_size = 1;
  int64_t max_tokens = 1;      // per rank per call; sizes the symmetric heaps
  int threads_per_rank = 1;    // processors per rank; every one also takes the OS role in turn
  ChaosOptions chaos;
  double watchdog_seconds = 60;  // a wait with no progress anywhere for this long is a hang
  // The transport seam (cpu/transport.h). Null: the cluster allocates all W heaps and runs all W
  // ranks in this process. Otherwise it runs only transport->local_rank(), over the transport's heaps.
  std::shared_ptr<HeapTransport> transport;
};

// Expert weights (rank q uses experts [q·L, (q+1)·L)). All contiguous, in the
// problem's dtype; optional ones are nullptr.
struct ExpertWeights {
  const void* router_weight;  // [E, H]; null when routing_given; float when shape.router_f32
  const void* router_bias;    // [E], optional; router_weight's type
  const void* w1;             // [E, N0, H], N0 = 2I when gated (gate rows, then up rows) else I
  const void* b1;             // [E, N0], optional
  const void* w2;             // [E, H, I]
  const void* b2;             // [E, H], optional
  // The global index of the expert w1[0], w2[0], b1[0], b2[0] hold: 0 when they hold all E
  // experts, q·L when a process running rank q alone (a transport) holds only its own L.
  int64_t first_expert = 0;
  const void* selection_bias = nullptr;  // [E] in the accumulation dtype, optional (has_selection_bias)
  // The shared expert, replicated on every rank (null when shape.shared_ffn == 0): each rank runs it
  // on its own tokens as tile tasks of its own schedule, with no dispatch.
  const void* shared_w1 = nullptr;    // [N0s, H], N0s = 2S when gated else S
  const void* shared_w2 = nullptr;    // [H, S]
  const void* shared_gate = nullptr;  // [1, H], optional (shape.has_shared_gate)
};

// One rank's tokens and outputs, contiguous. "acc" is float32, or float64 for f64 problems.
struct RankIO {
  const void* x;             // [tokens, H] dtype
  int64_t tokens;
  int64_t expert_capacity;   // per expert for this source rank, or kDropless
  void* y;                   // [tokens, H] dtype                  (output)
  int32_t* topk_ids;         // [tokens, k]                        (output; input when routing_given)
  void* topk_weights;        // [tokens, k] acc                    (output; input when routing_given)
  int32_t* expert_counts;    // [E], picks before dropping         (output)
  void* router_logits;       // [tokens, E] acc                    (output; null when routing_given)
  int64_t* dropped;          // [1]                                (output)
};

class Cluster {
 public:
  explicit Cluster(const ClusterConfig& config);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Runs one forward on every rank that runs in this process (ranks[i] is the i-th of them: all W
  // ranks in order, or the transport's local rank alone). With repeats > 1 every rank runs that
  // many calls back to back without waiting for the other ranks between them, so a fast rank
  // starts its next epoch while a slow one is still in the last. Throws std::runtime_error when
  // the watchdog sees a hang; the message names the rank, role and wait. Calls on one cluster
  // from several threads are serialized.
  void forward(const ExpertWeights& weights, const std::vector<RankIO>& ranks, int64_t repeats = 1);

  // Runs calls.size() calls; calls[c][i] is the input and output of call c of the i-th rank that
  // runs here (as in forward). Each rank runs its
  // calls back to back, never waiting for the other ranks between them, so ranks drift apart by
  // up to one epoch while every call has inputs of its own.
  void forward_calls(const ExpertWeights& weights, const std::vector<std::vector<RankIO>>& calls);

  const ClusterConfig& config() const;
  int64_t heap_bytes() const;       // one rank's symmetric heap
  int64_t footprint_bytes() const;  // heaps and intermediate buffers of all ranks
  uint32_t epoch(int64_t rank) const;

  struct State;  // the runtime's internals, defined in dataflow.cpp

 private:
  std::unique_ptr<State> state_;
};

}  // namespace flashmoe::cpu
