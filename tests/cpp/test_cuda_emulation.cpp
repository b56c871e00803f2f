// Host emulation of the persistent CUDA kernel (csrc/cuda): the kernel's own actors, tasks, inbox,
// doorbells and heap signals, compiled as plain C++ with each CTA a team of 128 threads and the MMA
// a host loop (csrc/cuda/platform.h). Checked against the CPU backend on the same inputs:
//   (a) topk_ids, expert_counts and dropped exactly; topk_weights, router_logits and y closely;
//       with routing from outside (Problem::routing_given; sentinel ids among them) the kernel's
//       gate stage is skipped: topk_ids and topk_weights stay as given, y, counts and dropped match;
//       the routing options (selection bias, group limit, scale, softmax_topk, weight_on_input)
//       go through the same route_token and dispatch/combine rules as the CPU backend;
//   (b) every element of every output written (outputs and workspace start as NaN/garbage);
//   (c) bit-identical results for 1, 2 and 5 processor CTAs (the arithmetic ignores the schedule),
//       the 5 under chaos: every poll may yield or sleep (emulation::chaos_seed), another interleaving;
//   (d) it terminates: a stuck actor fails the run through the bounded waits (-DFLASHMOE_BOUNDED_WAITS=1);
//   (e) with a shared expert (its own cell of every token, with and without its gate), y still matches;
//   (f) every launch keeps the scheduler's per-task budget of fences, hand-outs and global accesses
//       (over_budget), counted by the emulation; the costs of decode and prefill shapes are printed.
//   (g) router_logits bit for bit in gate.cuh's order (a float32 router for bf16/fp16 x included),
//       whichever gate task of a token tile finishes last and routes it.
//   (h) expert parallelism (issue 11): W = 2, 3, 4 ranks' kernels side by side over each other's heaps
//       (run_ep_case), every rank bitwise equal to the single-rank kernel across drifting calls, and
//       the error paths: a killed rank, a rank that vanishes after dispatching, a rank out of step.
// Under ThreadSanitizer this also checks that every hand-off between actors is ordered by the
// kernel's acquire/release pairs.
//
//   g++ -O2 -std=c++17 -pthread -Icsrc -DFLASHMOE_BOUNDED_WAITS=1 tests/cpp/test_cuda_emulation.cpp
//       csrc/cpu/*.cpp -o /tmp/test_cuda_emulation && /tmp/test_cuda_emulation
// It prints "cuda_emulation: N passed, M failed" and exits non-zero on any failure.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/capacity.h"
#include "core/dtype.h"
#include "core/problem.h"
#include "cpu/moe_forward.h"
#include "cuda/actors.cuh"
#include "cuda/kernel_params.h"

namespace {

using namespace flashmoe;
using flashmoe::cuda::Math;

struct Case {
  std::string name;
  Problem problem;
  double capacity_factor = 0;  // 0: dropless
  bool router_f32 = false;     // a float32 router (weight and bias) for the bf16/fp16 runs
};

// One launch per entry of `ranks`, all at once: each rank's CTAs a team of threads, as W ranks'
// kernels run side by side (on W GPUs, or as a loopback launch's virtual ranks on one).
template <Math M>
void emulate_launches(const std::vector<cuda::KernelParams>& ranks) {
  namespace emu = cuda::emulation;
  struct Cta {
    std::unique_ptr<emu::Barrier> barrier;
    Task task;
    uint32_t sequence = 0;
    // Dynamic shared memory (the gate task keeps its partials and flags there, the scheduler its state in CTA 0's).
    std::unique_ptr<uint8_t, decltype(&std::free)> smem{nullptr, &std::free};
  };
  std::vector<std::vector<Cta>> ctas(ranks.size());
  for (size_t r = 0; r < ranks.size(); ++r) {
    ctas[r].resize(size_t(ranks[r].processors + 1));
    for (Cta& cta : ctas[r]) {
      cta.barrier = std::make_unique<emu::Barrier>(cuda::kThreads);
      cta.smem.reset(static_cast<uint8_t*>(std::aligned_alloc(cuda::kSmemAlignment, cuda::kTileSmemBytes)));
      std::memset(cta.smem.get(), 0xab, size_t(cuda::kTileSmemBytes));  // garbage, like a GPU's
    }
  }
  std::vector<std::thread> threads;
  for (size_t r = 0; r < ranks.size(); ++r) {
    for (size_t c = 0; c < ctas[r].size(); ++c) {
      for (int t = 0; t < cuda::kThreads; ++t) {
        threads.emplace_back([&, r, c, t] {
          Cta& cta = ctas[r][c];
          emu::thread_index.x = unsigned(t);
          emu::block_index.x = unsigned(c);
          emu::block_barrier = cta.barrier.get();
          cuda::kernel_body<M>(ranks[r], int32_t(c), cta.smem.get(), cta.task, cta.sequence);
        });
      }
    }
  }
  for (auto& thread : threads) thread.join();
}

template <Math M>
void emulate_launch(const cuda::KernelParams& params) {
  emulate_launches<M>({params});
}

// A workspace for `params`, as a launch finds it: garbage everywhere, then the launcher's memset of
// its first zeroed_bytes(); params.pointers.workspace points at it.
std::unique_ptr<uint8_t, decltype(&std::free)> launch_workspace(cuda::KernelParams& params) {
  std::unique_ptr<uint8_t, decltype(&std::free)> workspace(
      static_cast<uint8_t*>(std::aligned_alloc(cuda::Workspace::kAlignment,
                                               size_t(cuda::Workspace::align(params.workspace.total)))),
      &std::free);
  std::memset(workspace.get(), 0xab, size_t(params.workspace.total));
  std::memset(workspace.get(), 0, size_t(params.workspace.zeroed_bytes()));
  params.pointers.workspace = workspace.get();
  return workspace;
}

template <typename T>
std::vector<T> random_values(std::mt19937& rng, size_t count, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<T> values(count);
  for (auto& value : values) value = from_float<T>(normal(rng));
  return values;
}

struct Outputs {
  std::vector<uint8_t> y;
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_weights;
  std::vector<int32_t> expert_counts;
  std::vector<float> router_logits;
  int64_t dropped = -1;
};

template <typename T>
double relative_error(const std::vector<uint8_t>& a_bytes, const std::vector<uint8_t>& b_bytes) {
  const T* a = reinterpret_cast<const T*>(a_bytes.data());
  const T* b = reinterpret_cast<const T*>(b_bytes.data());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a_bytes.size() / sizeof(T); ++i) {
    const double x = to_float(a[i]), y = to_float(b[i]);
    if (!std::isfinite(x)) return INFINITY;
    diff += (x - y) * (x - y);
    norm += y * y;
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// What one launch cost, from the emulation's counters (csrc/cuda/platform.h), per task run.
struct Costs {
  uint64_t tasks = 0, handouts = 0, acquire_fences = 0, release_fences = 0, release_stores = 0, thread_fences = 0;
  uint64_t scheduler_global = 0;

  static Costs read() {
    const auto& c = cuda::emulation::counters;
    Costs costs;
    costs.tasks = c.tasks, costs.handouts = c.handouts, costs.acquire_fences = c.acquire_fences;
    costs.release_fences = c.release_fences, costs.release_stores = c.release_stores;
    costs.thread_fences = c.thread_fences, costs.scheduler_global = c.scheduler_global;
    return costs;
  }
  double per_task(uint64_t count) const { return tasks > 0 ? double(count) / double(tasks) : 0.0; }
  void print(const std::string& name, int processors) const {
    std::printf("  costs %-28s processors=%d tasks=%llu per task: handouts %.2f, acquire fences %.2f, release fences "
                "%.2f, release stores %.2f, thread fences %.2f, scheduler global accesses %.2f\n",
                name.c_str(), processors, static_cast<unsigned long long>(tasks), per_task(handouts),
                per_task(acquire_fences), per_task(release_fences), per_task(release_stores), per_task(thread_fences),
                per_task(scheduler_global));
  }
};

// The scheduler's per-task budget (docs/cuda_kernel.md "What scheduling costs"), for a launch of
// `processors` processors over E experts at world size 1; empty when it is met. Messages are the
// completions (the arrivals and returns of own cells never go through the inbox), and a round that
// books messages or hands out work costs one release fence, the first round and the stop one more.
std::string over_budget(const Costs& c, int64_t experts, int64_t processors) {
  const uint64_t tasks = c.tasks, E = uint64_t(experts), P = uint64_t(processors);
  auto over = [&](const char* what, uint64_t count, uint64_t budget) {
    return count > budget ? std::string(what) + " " + std::to_string(count) + " > budget " + std::to_string(budget) + "; "
                          : std::string();
  };
  std::string error;
  if (c.handouts != tasks) error += "hand-outs " + std::to_string(c.handouts) + " != tasks " + std::to_string(tasks) + "; ";
  error += over("thread fences", c.thread_fences, 0);
  // The completion each processor posts; no other release store (broadcasts are fence + relaxed).
  error += over("release stores", c.release_stores, tasks);
  error += over("release fences", c.release_fences, tasks + 2);
  // Per task: the processor's doorbell, its inbox room, the scheduler's round; the stop's doorbells.
  error += over("acquire fences", c.acquire_fences, 3 * tasks + P);
  // Per task: the poll that found its completion, the message, the Task written, the doorbell, the
  // inbox head (at most once a round); once: the expert offsets and admitted rows, and the stop.
  error += over("scheduler global accesses", c.scheduler_global, 5 * tasks + 2 * E + 2 * P);
  return error;
}

// gate.cuh's documented order written out on its own (chunks of 8 to 32 lanes, fma in ascending h,
// then the butterfly), to check logit_dot, which the kernel's logits are checked against.
template <typename X, typename W>
float documented_logit(const X* x, const W* w, int64_t H) {
  float partials[32];
  for (int lane = 0; lane < 32; ++lane) {
    float acc = 0.0f;
    for (int64_t chunk = lane; chunk * 8 < H; chunk += 32) {
      for (int64_t h = chunk * 8; h < std::min<int64_t>(chunk * 8 + 8, H); ++h) {
        acc = std::fma(to_float(x[h]), to_float(w[h]), acc);
      }
    }
    partials[lane] = acc;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) partials[lane] = partials[lane] + partials[lane + offset];
  }
  return partials[0];
}

template <typename LoadX, typename LoadW>
bool logit_order_matches(std::mt19937& rng) {
  for (int64_t H : {1, 7, 8, 40, 257, 7168}) {
    const auto x = random_values<typename LoadX::Type>(rng, size_t(H), 1.0f);
    const auto w = random_values<typename LoadW::Type>(rng, size_t(H), 1.0f);
    const float have = cuda::logit_dot<LoadX, LoadW>(x.data(), w.data(), H);
    const float want = documented_logit(x.data(), w.data(), H);
    if (std::memcmp(&have, &want, sizeof(float)) != 0) {
      std::printf("FAIL logit_dot differs from the documented order at H=%lld\n", static_cast<long long>(H));
      return false;
    }
  }
  return true;
}

// One logit in gate.cuh's order (the router LoadW: x's Storage, or FloatStorage for router_f32), + bias.
template <typename LoadW, typename X>
float reference_logit(const X* x, const typename LoadW::Type* router, int64_t e, int64_t H, const void* bias) {
  constexpr Math kM = std::is_same_v<X, bfloat16> ? Math::bf16 : std::is_same_v<X, float16> ? Math::f16 : Math::f32;
  const float logit = cuda::logit_dot<cuda::Storage<kM>, LoadW>(x, router + e * H, H);
  return bias ? logit + LoadW::load(static_cast<const typename LoadW::Type*>(bias)[e]) : logit;
}

// Runs case `c` on each grid of `grids` processor CTAs against the CPU backend; with `costs`, also
// records the counters of the last grid's launch there.
template <typename T, Math M>
bool run_case(const Case& c, uint64_t seed, bool verbose, std::initializer_list<int> grids = {1, 2, 5},
              Costs* costs = nullptr) {
  Problem problem = c.problem;
  problem.dtype = dtype_of<T>();
  problem.router_f32 = c.router_f32 && !std::is_same_v<T, float>;
  const int64_t T_ = problem.tokens, H = problem.hidden, I = problem.ffn, E = problem.experts, k = problem.top_k;
  const int64_t n0 = problem.gemm0_cols();
  problem.expert_capacity = c.capacity_factor > 0 ? expert_capacity(c.capacity_factor, T_, k, E) : kDropless;
  std::mt19937 rng{uint32_t(seed)};
  const auto x = random_values<T>(rng, size_t(T_ * H), 1.0f);
  const auto router = random_values<T>(rng, size_t(E * H), 1.0f / std::sqrt(float(H)));
  const auto router_bias = random_values<T>(rng, size_t(E), 0.5f);
  const auto router32 = random_values<float>(rng, size_t(E * H), 1.0f / std::sqrt(float(H)));
  const auto router_bias32 = random_values<float>(rng, size_t(E), 0.5f);
  const void* router_weight = problem.routing_given ? nullptr
                              : problem.router_f32 ? static_cast<const void*>(router32.data()) : router.data();
  const void* router_bias_pointer = !problem.has_router_bias ? nullptr
                                    : problem.router_f32 ? static_cast<const void*>(router_bias32.data())
                                                         : router_bias.data();
  const auto w1 = random_values<T>(rng, size_t(E * n0 * H), 1.0f / std::sqrt(float(H)));
  const auto b1 = random_values<T>(rng, size_t(E * n0), 0.1f);
  const auto w2 = random_values<T>(rng, size_t(E * H * I), 1.0f / std::sqrt(float(I)));
  const auto b2 = random_values<T>(rng, size_t(E * H), 0.1f);
  const int64_t S = problem.shared_ffn, shared_rows = problem.gated ? 2 * S : S;
  const auto shared_w1 = random_values<T>(rng, size_t(shared_rows * H), 1.0f / std::sqrt(float(H)));
  const auto shared_w2 = random_values<T>(rng, size_t(H * S), 1.0f / std::sqrt(float(S > 0 ? S : 1)));
  const auto shared_gate = random_values<T>(rng, size_t(H), 1.0f / std::sqrt(float(H)));
  const auto selection_bias = random_values<float>(rng, size_t(E), 0.3f);
  const float* selection = problem.has_selection_bias ? selection_bias.data() : nullptr;
  auto optional = [](bool present, const std::vector<T>& values) { return present ? values.data() : nullptr; };

  // Routing from outside: distinct ids per token, about one pick in five the sentinel E.
  std::vector<int32_t> given_ids;
  std::vector<float> given_weights;
  if (problem.routing_given) {
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    for (int64_t t = 0; t < T_; ++t) {
      std::vector<int32_t> experts(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) experts[size_t(e)] = int32_t(e);
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int64_t j = 0; j < k; ++j) {
        given_ids.push_back(j < E && uniform(rng) >= 0.2f ? experts[size_t(j)] : int32_t(E));
        given_weights.push_back(uniform(rng) + 0.1f);
      }
    }
  }

  auto fresh_outputs = [&] {
    Outputs out;
    out.y.assign(size_t(T_ * H) * sizeof(T), 0xff);  // NaN in every float format
    out.topk_ids.assign(size_t(T_ * k), -7);
    out.topk_weights.assign(size_t(T_ * k), NAN);
    if (problem.routing_given) out.topk_ids = given_ids, out.topk_weights = given_weights;
    out.expert_counts.assign(size_t(E), -7);
    out.router_logits.assign(size_t(T_ * E), NAN);
    return out;
  };

  // The CPU backend: the reference of this test.
  Outputs expected = fresh_outputs();
  {
    const cpu::ExpertWeights weights{router_weight, router_bias_pointer, w1.data(),
                                     optional(problem.has_b1, b1), w2.data(), optional(problem.has_b2, b2), 0,
                                     selection, optional(S > 0, shared_w1), optional(S > 0, shared_w2),
                                     optional(problem.has_shared_gate, shared_gate)};
    const cpu::RankIO io{x.data(), T_, problem.expert_capacity, expected.y.data(), expected.topk_ids.data(),
                         expected.topk_weights.data(), expected.expert_counts.data(),
                         problem.routing_given ? nullptr : expected.router_logits.data(), &expected.dropped};
    cpu::moe_forward(problem, weights, io, 1);
  }

  bool ok = true;
  std::vector<uint8_t> first_y;
  for (int processors : grids) {
    Outputs got = fresh_outputs();
    cuda::Pointers pointers;
    pointers.x = x.data();
    pointers.router_weight = router_weight;
    pointers.router_bias = router_bias_pointer;
    pointers.w1 = w1.data();
    pointers.b1 = optional(problem.has_b1, b1);
    pointers.w2 = w2.data();
    pointers.b2 = optional(problem.has_b2, b2);
    pointers.y = got.y.data();
    pointers.topk_ids = got.topk_ids.data();
    pointers.topk_weights = got.topk_weights.data();
    pointers.expert_counts = got.expert_counts.data();
    pointers.router_logits = problem.routing_given ? nullptr : got.router_logits.data();
    pointers.dropped = &got.dropped;
    pointers.shared_w1 = optional(S > 0, shared_w1);
    pointers.shared_w2 = optional(S > 0, shared_w2);
    pointers.shared_gate = optional(problem.has_shared_gate, shared_gate);
    pointers.selection_bias = selection;
    cuda::KernelParams params = cuda::make_params(problem, pointers, processors);
    // On 2 processors the scheduler's state lives in the workspace, as when it is too big for CTA 0's
    // shared memory; on the other grids in shared memory.
    if (processors == 2) params.workspace.scheduler_smem_bytes = 0, params.workspace.plan();
    const auto workspace = launch_workspace(params);
    cuda::emulation::counters.reset();
    cuda::emulation::chaos_seed = processors == 5 ? seed : 0;  // one grid under chaos
    emulate_launch<M>(params);
    cuda::emulation::chaos_seed = 0;
    const Costs launch_costs = Costs::read();
    if (costs) *costs = launch_costs;

    auto fail = [&](const std::string& what) {
      std::printf("FAIL %s (processors=%d): %s\n", c.name.c_str(), processors, what.c_str());
      ok = false;
    };
    if (params.workspace.scheduler_in_smem() != (processors != 2)) fail("the scheduler's state is not where it should be");
    if (const std::string error = over_budget(launch_costs, E, processors); !error.empty()) fail("over budget: " + error);
    if (got.topk_ids != expected.topk_ids) fail("topk_ids differ from the CPU backend");
    if (problem.routing_given && got.topk_ids != given_ids) fail("the kernel wrote the given topk_ids");
    if (problem.routing_given && got.topk_weights != given_weights) fail("the kernel wrote the given topk_weights");
    if (got.expert_counts != expected.expert_counts) fail("expert_counts differ");
    if (got.dropped != expected.dropped) fail("dropped differs");
    for (size_t i = 0; i < got.topk_weights.size(); ++i) {
      if (!(std::fabs(got.topk_weights[i] - expected.topk_weights[i]) <= 1e-5f)) {
        fail("topk_weights[" + std::to_string(i) + "] differs");
        break;
      }
    }
    for (size_t i = 0; i < (problem.routing_given ? 0 : got.router_logits.size()); ++i) {
      if (!(std::fabs(got.router_logits[i] - expected.router_logits[i]) <= 1e-4f * (1 + std::fabs(expected.router_logits[i])))) {
        fail("router_logits[" + std::to_string(i) + "] differs");
        break;
      }
    }
    // The logits bit for bit against gate.cuh's order run on one host thread.
    for (int64_t t = 0; t < (problem.routing_given ? 0 : T_); ++t) {
      bool same = true;
      for (int64_t e = 0; e < E && same; ++e) {
        const float want = problem.router_f32 ? reference_logit<cuda::FloatStorage<M>>(x.data() + t * H, router32.data(), e, H, router_bias_pointer)
                                              : reference_logit<cuda::Storage<M>>(x.data() + t * H, router.data(), e, H, router_bias_pointer);
        const float have = got.router_logits[size_t(t * E + e)];
        same = std::memcmp(&want, &have, sizeof(float)) == 0;
      }
      if (!same) {
        fail("router_logits of token " + std::to_string(t) + " differ from gate.cuh's order");
        break;
      }
    }
    const double error = relative_error<T>(got.y, expected.y);
    const double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-2;
    if (!(error <= tolerance)) fail("y relative error " + std::to_string(error));
    if (first_y.empty()) first_y = got.y;
    else if (first_y != got.y) fail("y differs bitwise between processor counts");
    if (verbose) std::printf("  %s processors=%d err=%.3g\n", c.name.c_str(), processors, error);
  }
  return ok;
}

// Expert parallelism (issue 11), W ranks in one process: each rank's kernel a set of thread teams,
// every heap reached through the rank table (kernel_params.h Ranks) as a loopback launch or
// nvshmem_ptr would reach it, the heaps and epoch words kept across calls (their flags zeroed once,
// at allocation, never per call). Rank r holds experts [r·L, (r+1)·L) and brings its own tokens;
// each call's token counts differ per rank (skew, a rank with none). Every rank's outputs must equal,
// bit for bit, the single-rank kernel's on that rank's tokens with all E experts, and y must match
// the CPU backend; every element of y is written (it starts as NaN).
struct EpCase {
  std::string name;
  Problem problem;           // tokens unused: each call's counts below
  int64_t world = 2;
  std::vector<std::vector<int64_t>> calls;  // tokens of each rank, per call
  double capacity_factor = 0;
  int processors = 2;        // per rank
  bool chaos = false;
  int64_t killed = -1;       // a rank whose kernel never runs (the last call): the others must give up on it
  int64_t vanish = -1;       // a rank that vanishes once its dispatch flags are out (the last call)
  int64_t out_of_step = -1;  // a rank whose epoch word starts 4 calls ahead (the only call)
};

template <typename T, Math M>
bool run_ep_case(const EpCase& c, uint64_t seed, bool verbose) {
  Problem base = c.problem;
  base.dtype = dtype_of<T>();
  const int64_t W = c.world, H = base.hidden, I = base.ffn, E = base.experts, k = base.top_k, L = E / W;
  const int64_t n0 = base.gemm0_cols(), S = base.shared_ffn, shared_rows = base.gated ? 2 * S : S;
  std::mt19937 rng{uint32_t(seed)};
  const auto router = random_values<T>(rng, size_t(E * H), 1.0f / std::sqrt(float(H)));
  const auto router_bias = random_values<T>(rng, size_t(E), 0.5f);
  const auto w1 = random_values<T>(rng, size_t(E * n0 * H), 1.0f / std::sqrt(float(H)));
  const auto b1 = random_values<T>(rng, size_t(E * n0), 0.1f);
  const auto w2 = random_values<T>(rng, size_t(E * H * I), 1.0f / std::sqrt(float(I)));
  const auto b2 = random_values<T>(rng, size_t(E * H), 0.1f);
  const auto shared_w1 = random_values<T>(rng, size_t(shared_rows * H), 1.0f / std::sqrt(float(H)));
  const auto shared_w2 = random_values<T>(rng, size_t(H * S), 1.0f / std::sqrt(float(S > 0 ? S : 1)));
  const auto shared_gate = random_values<T>(rng, size_t(H), 1.0f / std::sqrt(float(H)));
  const auto selection_bias = random_values<float>(rng, size_t(E), 0.3f);
  auto optional = [](bool present, const auto* values) { return present ? values : nullptr; };

  int64_t max_tokens = 1;
  for (const auto& call : c.calls) for (int64_t t : call) max_tokens = std::max(max_tokens, t);
  // The heaps and epoch words, kept across calls; garbage rows, flags zeroed once.
  const HeapLayout layout{ExpertPlacement{W, E}, max_tokens, k, H, int64_t(sizeof(T))};
  layout.check();
  std::vector<std::unique_ptr<uint8_t, decltype(&std::free)>> heaps;
  std::vector<uint32_t> epochs(size_t(W), 0);
  std::vector<std::array<uint32_t, cuda::kStatusWords>> statuses(static_cast<size_t>(W));
  // A minute for healthy calls; 2 s for the one a fault makes fail (every healthy peer's flags come
  // well within it, also under ThreadSanitizer, so the error names the faulty rank).
  const bool faults = c.killed >= 0 || c.vanish >= 0 || c.out_of_step >= 0;
  const uint64_t healthy_timeout_ns = 60ull * 1000 * 1000 * 1000, fault_timeout_ns = 2000ull * 1000 * 1000;
  cuda::Ranks table;
  table.world = int32_t(W);
  for (int64_t r = 0; r < W; ++r) {
    heaps.emplace_back(static_cast<uint8_t*>(std::aligned_alloc(HeapLayout::kAlignment,
                                                                size_t(HeapLayout::align(layout.total_bytes())))),
                       &std::free);
    std::memset(heaps.back().get(), 0xab, size_t(layout.total_bytes()));
    std::memset(heaps.back().get(), 0, size_t(2 * layout.flags_bytes()));
    table.heaps[r] = heaps.back().get();
  }

  bool ok = true;
  auto fail = [&](size_t call, int64_t rank, const std::string& what) {
    std::printf("FAIL %s (call %zu, rank %lld of %lld): %s\n", c.name.c_str(), call, static_cast<long long>(rank),
                static_cast<long long>(W), what.c_str());
    ok = false;
  };
  // Every call of every rank is prepared first (inputs, the references, the kernel's parameters),
  // then each rank runs its calls back to back in a thread of its own, its CTAs joined per call
  // (a launch boundary), never waiting for the other ranks: they drift by up to an epoch, as
  // ranks do, while their flags are reused without zeroing (protocol.md §6b).
  struct Rank {
    Problem problem;
    std::vector<T> x;
    Outputs got, want, cpu;
    std::unique_ptr<uint8_t, decltype(&std::free)> workspace{nullptr, &std::free};
  };
  const size_t calls = c.calls.size();
  std::vector<std::vector<Rank>> runs(calls);
  std::vector<std::vector<cuda::KernelParams>> launches(static_cast<size_t>(W));  // [rank][call]
  for (size_t call = 0; call < calls; ++call) {
    runs[call].resize(static_cast<size_t>(W));
    for (int64_t r = 0; r < W; ++r) {
      Rank& rank = runs[call][size_t(r)];
      const int64_t T_ = c.calls[call][size_t(r)];
      rank.problem = base;
      rank.problem.tokens = T_;
      rank.problem.expert_capacity = c.capacity_factor > 0 ? expert_capacity(c.capacity_factor, T_, k, E) : kDropless;
      rank.x = random_values<T>(rng, size_t(std::max<int64_t>(T_, 1) * H), 1.0f);
      auto fresh = [&] {
        Outputs out;
        out.y.assign(size_t(std::max<int64_t>(T_, 1) * H) * sizeof(T), 0xff);  // NaN in every float format
        out.topk_ids.assign(size_t(std::max<int64_t>(T_, 1) * k), -7);
        out.topk_weights.assign(size_t(std::max<int64_t>(T_, 1) * k), NAN);
        out.expert_counts.assign(size_t(E), -7);
        out.router_logits.assign(size_t(std::max<int64_t>(T_, 1) * E), NAN);
        return out;
      };
      rank.got = fresh(), rank.want = fresh(), rank.cpu = fresh();
      // This rank's pointers: all E experts for the single-rank kernel; its L experts for its part of the world.
      auto pointers_of = [&](Outputs& out, bool local) {
        cuda::Pointers p;
        const int64_t first = local ? r * L : 0;
        p.x = rank.x.data();
        p.router_weight = router.data();
        p.router_bias = optional(base.has_router_bias, router_bias.data());
        p.w1 = w1.data() + first * n0 * H;
        p.b1 = optional(base.has_b1, b1.data() + first * n0);
        p.w2 = w2.data() + first * H * I;
        p.b2 = optional(base.has_b2, b2.data() + first * H);
        p.y = out.y.data();
        p.topk_ids = out.topk_ids.data();
        p.topk_weights = out.topk_weights.data();
        p.expert_counts = out.expert_counts.data();
        p.router_logits = out.router_logits.data();
        p.dropped = &out.dropped;
        p.shared_w1 = optional(S > 0, shared_w1.data());
        p.shared_w2 = optional(S > 0, shared_w2.data());
        p.shared_gate = optional(base.has_shared_gate, shared_gate.data());
        p.selection_bias = optional(base.has_selection_bias, selection_bias.data());
        return p;
      };
      // The references: the single-rank kernel (its launcher leaves a rank without tokens to the
      // host: no counts, nothing dropped), and the CPU backend.
      if (T_ > 0) {
        cuda::KernelParams single = cuda::make_params(rank.problem, pointers_of(rank.want, false), 2);
        const auto workspace = launch_workspace(single);
        emulate_launch<M>(single);
        const cpu::ExpertWeights weights{router.data(), optional(base.has_router_bias, router_bias.data()), w1.data(),
                                         optional(base.has_b1, b1.data()), w2.data(), optional(base.has_b2, b2.data()),
                                         0, optional(base.has_selection_bias, selection_bias.data()),
                                         optional(S > 0, shared_w1.data()), optional(S > 0, shared_w2.data()),
                                         optional(base.has_shared_gate, shared_gate.data())};
        const cpu::RankIO io{rank.x.data(), T_, rank.problem.expert_capacity, rank.cpu.y.data(), rank.cpu.topk_ids.data(),
                             rank.cpu.topk_weights.data(), rank.cpu.expert_counts.data(), rank.cpu.router_logits.data(),
                             &rank.cpu.dropped};
        cpu::moe_forward(rank.problem, weights, io, 1);
      } else {
        rank.want.expert_counts.assign(size_t(E), 0);
        rank.want.dropped = 0;
      }
      cuda::Ranks ranks_of_r = table;
      ranks_of_r.rank = int32_t(r);
      ranks_of_r.epoch = &epochs[size_t(r)];
      ranks_of_r.status = statuses[size_t(r)].data();
      const bool last = call + 1 == calls;
      ranks_of_r.peer_timeout_ns = faults && last ? fault_timeout_ns : healthy_timeout_ns;
      if (last && r == c.vanish) ranks_of_r.fault = cuda::Ranks::kVanishAfterDispatch;
      cuda::KernelParams rank_params =
          cuda::make_params(rank.problem, pointers_of(rank.got, true), c.processors, ranks_of_r, max_tokens);
      rank.workspace = launch_workspace(rank_params);
      const bool killed = last && r == c.killed;
      if (!killed) launches[size_t(r)].push_back(rank_params);
    }
  }
  for (auto& status : statuses) status.fill(0);  // zeroed once, with the heaps
  if (c.out_of_step >= 0) epochs[size_t(c.out_of_step)] = 4;
  std::vector<uint32_t> epochs_after(static_cast<size_t>(W) * calls), errors_after(static_cast<size_t>(W) * calls);
  cuda::emulation::chaos_seed = c.chaos ? seed : 0;
  {
    std::vector<std::thread> drivers;
    for (int64_t r = 0; r < W; ++r) {
      drivers.emplace_back([&, r] {
        for (size_t call = 0; call < launches[size_t(r)].size(); ++call) {
          emulate_launch<M>(launches[size_t(r)][call]);
          epochs_after[size_t(r) * calls + call] = epochs[size_t(r)];
          errors_after[size_t(r) * calls + call] = statuses[size_t(r)][0];
        }
      });
    }
    for (auto& driver : drivers) driver.join();
  }
  cuda::emulation::chaos_seed = 0;

  if (c.out_of_step >= 0) {
    // The rank ahead sees its peers' flags at an epoch that is neither its own nor the previous: no
    // wait can mend that, so it stops at once and says so. It never dispatched, so its peers give up
    // on its dispatch flags at their timeout (or see its stale flags first, if it had run before).
    for (int64_t r = 0; r < W; ++r) {
      const auto& status = statuses[size_t(r)];
      const std::string message = cuda::describe_kernel_error(status.data(), r, double(fault_timeout_ns) * 1e-9);
      const bool named = status[0] == cuda::kEpochMismatch ? message.find("out of step") != std::string::npos
                         : r != c.out_of_step && status[0] == cuda::kDispatchFlagTimeout &&
                               int64_t(status[1]) == c.out_of_step;
      if (!named || (r == c.out_of_step && status[0] != cuda::kEpochMismatch)) {
        fail(0, r, "no error naming the rank out of step: '" + message + "'");
      } else if (verbose) {
        std::printf("  %s\n", message.c_str());
      }
    }
    return ok;
  }
  const int64_t faulty = c.killed >= 0 ? c.killed : c.vanish;
  for (size_t call = 0; call < calls; ++call) {
    if (faulty >= 0 && call + 1 == calls) {
      // Every survivor gave up on the faulty rank within the timeout and names the flag it waited
      // for: a killed rank's dispatch flag, or the return flag of one that vanished after dispatching.
      const uint32_t kind = c.killed >= 0 ? cuda::kDispatchFlagTimeout : cuda::kReturnFlagTimeout;
      const std::string named = c.killed >= 0 ? "dispatch flag of source rank " : "return flag of owner rank ";
      for (int64_t r = 0; r < W; ++r) {
        if (r == faulty) continue;
        const auto& status = statuses[size_t(r)];
        const std::string message = cuda::describe_kernel_error(status.data(), r, double(fault_timeout_ns) * 1e-9);
        if (status[0] != kind || int64_t(status[1]) != faulty || (status[3] & 0xffffu) != call + 1 ||
            message.find(named + std::to_string(faulty)) == std::string::npos) {
          fail(call, r, "no error naming the faulty rank's flag: '" + message + "'");
        } else if (verbose) {
          std::printf("  %s\n", message.c_str());
        }
        // No plausible output: y is NaN wherever the call did not finish.
        const Rank& rank = runs[call][size_t(r)];
        bool poisoned = true;
        for (size_t i = 0; i + sizeof(T) <= size_t(rank.problem.tokens * H) * sizeof(T); i += sizeof(T)) {
          poisoned = poisoned && std::isnan(to_float(*reinterpret_cast<const T*>(rank.got.y.data() + i)));
        }
        if (!poisoned) fail(call, r, "an aborted call left a y that is not all NaN");
      }
      // The words stick: the next launch of a survivor aborts at once, whatever its peers do.
      for (int64_t r = 0; r < W; ++r) {
        if (r == faulty) continue;
        const uint32_t before = statuses[size_t(r)][0];
        Rank& rank = runs[call][size_t(r)];
        std::memset(rank.workspace.get(), 0, size_t(launches[size_t(r)].back().workspace.zeroed_bytes()));
        std::memset(rank.got.y.data(), 0, rank.got.y.size());
        emulate_launch<M>(launches[size_t(r)].back());
        if (statuses[size_t(r)][0] != before) fail(call, r, "a launch after an error changed its error words");
        bool poisoned = true;
        for (size_t i = 0; i + sizeof(T) <= size_t(rank.problem.tokens * H) * sizeof(T); i += sizeof(T)) {
          poisoned = poisoned && std::isnan(to_float(*reinterpret_cast<const T*>(rank.got.y.data() + i)));
        }
        if (!poisoned) fail(call, r, "a launch after an error did not poison y");
      }
      break;
    }
    for (int64_t r = 0; r < W; ++r) {
      Rank& rank = runs[call][size_t(r)];
      const int64_t T_ = rank.problem.tokens;
      if (errors_after[size_t(r) * calls + call] != 0) {
        fail(call, r, "an error word: " +
                          cuda::describe_kernel_error(statuses[size_t(r)].data(), r, double(fault_timeout_ns) * 1e-9));
      }
      if (epochs_after[size_t(r) * calls + call] != uint32_t(call + 1)) fail(call, r, "the epoch word did not advance to this call's");
      if (rank.got.expert_counts != rank.want.expert_counts) fail(call, r, "expert_counts differ from the single rank's");
      if (rank.got.dropped != rank.want.dropped) fail(call, r, "dropped differs from the single rank's");
      if (T_ == 0) continue;
      if (rank.got.topk_ids != rank.want.topk_ids) fail(call, r, "topk_ids differ from the single rank's");
      if (std::memcmp(rank.got.topk_weights.data(), rank.want.topk_weights.data(), size_t(T_ * k) * sizeof(float)) != 0) {
        fail(call, r, "topk_weights differ bitwise from the single rank's");
      }
      if (std::memcmp(rank.got.router_logits.data(), rank.want.router_logits.data(), size_t(T_ * E) * sizeof(float)) != 0) {
        fail(call, r, "router_logits differ bitwise from the single rank's");
      }
      if (rank.got.y != rank.want.y) fail(call, r, "y differs bitwise from the single rank's");
      if (rank.got.expert_counts != rank.cpu.expert_counts || rank.got.dropped != rank.cpu.dropped) {
        fail(call, r, "counts or dropped differ from the CPU backend");
      }
      const double error = relative_error<T>(rank.got.y, rank.cpu.y);
      if (!(error <= (std::is_same_v<T, float> ? 1e-5 : 1e-2))) fail(call, r, "y relative error " + std::to_string(error));
      if (verbose) std::printf("  %s call %zu rank %lld tokens=%lld err=%.3g\n", c.name.c_str(), call,
                               static_cast<long long>(r), static_cast<long long>(T_), error);
    }
  }
  return ok;
}

std::vector<EpCase> ep_cases() {
  std::vector<EpCase> all;
  auto add = [&](std::string name, int64_t world, std::vector<std::vector<int64_t>> calls, int64_t hidden, int64_t ffn,
                 int64_t experts, int64_t top_k, Activation activation, double capacity, int processors, bool chaos) {
    EpCase c;
    c.name = name;
    c.world = world;
    c.calls = calls;
    Problem& p = c.problem;
    p.hidden = hidden, p.ffn = ffn, p.experts = experts, p.top_k = top_k;
    p.gated = activation != Activation::relu2 && activation != Activation::gelu;
    p.activation = activation;
    p.scoring = Scoring::softmax, p.normalize = true;
    p.has_router_bias = p.has_b1 = p.has_b2 = true;
    p.swiglu_limit = 0.5, p.swiglu_alpha = 1.702;
    c.capacity_factor = capacity;
    c.processors = processors;
    c.chaos = chaos;
    all.push_back(c);
  };
  // Skew, a rank with no tokens, then both full: the heaps and epochs carry over between calls.
  add("ep W=2 skew and an empty rank", 2, {{37, 5}, {0, 20}, {64, 64}}, 40, 24, 4, 2, Activation::silu, 0, 3, false);
  // Capacity drops per (source, expert), three ranks, under chaos.
  add("ep W=3 drops chaos", 3, {{30, 12, 0}, {45, 45, 45}}, 32, 40, 6, 3, Activation::gelu, 0.6, 2, true);
  // More picks than an owner's experts (k > L): region_rows = max_tokens · L.
  add("ep W=2 k above L", 2, {{21, 9}}, 24, 16, 8, 6, Activation::silu, 0, 2, false);
  // Four ranks, a shared expert with its gate (each rank's own, on its own tokens), one rank idle.
  add("ep W=4 shared expert", 4, {{17, 0, 33, 70}, {5, 5, 5, 5}}, 40, 24, 8, 2, Activation::swiglu_oai, 0.8, 2, true);
  all.back().problem.shared_ffn = 20, all.back().problem.has_shared_gate = true;
  // Grouped sigmoid selection with a bias, weight on input, several row tiles per cell.
  add("ep W=4 deepseek weight_on_input", 4, {{150, 3, 60, 1}}, 24, 16, 16, 4, Activation::silu, 0, 2, false);
  all.back().problem.scoring = Scoring::sigmoid, all.back().problem.has_selection_bias = true;
  all.back().problem.num_groups = 4, all.back().problem.topk_groups = 2, all.back().problem.routed_scaling_factor = 2.5;
  all.back().problem.weight_on_input = true;
  // A rank that dies between calls: the next call's survivors give up on its flags within the
  // timeout, name it, and exit (no hang, no trap).
  add("ep W=3 killed rank", 3, {{9, 14, 3}, {12, 12, 12}}, 24, 16, 6, 2, Activation::silu, 0, 2, false);
  all.back().killed = 1;
  add("ep W=2 rank vanishes after dispatch", 2, {{20, 7}, {33, 40}}, 24, 16, 4, 2, Activation::silu, 0, 2, false);
  all.back().vanish = 0;
  add("ep W=3 a rank out of step", 3, {{8, 8, 8}}, 24, 16, 6, 2, Activation::silu, 0, 2, false);
  all.back().out_of_step = 2;
  return all;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  auto add = [&](std::string name, int64_t tokens, int64_t hidden, int64_t ffn, int64_t experts, int64_t top_k,
                 bool gated, Activation activation, Scoring scoring, bool normalize, bool biases, double capacity,
                 bool routing_given = false, int64_t shared_ffn = 0, bool shared_gate = false) {
    Case c;
    c.name = name;
    Problem& p = c.problem;
    p.tokens = tokens, p.hidden = hidden, p.ffn = ffn, p.experts = experts, p.top_k = top_k;
    p.gated = gated, p.activation = activation, p.scoring = scoring, p.normalize = normalize;
    p.has_router_bias = biases && !routing_given;
    p.has_b1 = p.has_b2 = biases;
    p.routing_given = routing_given;
    p.shared_ffn = shared_ffn, p.has_shared_gate = shared_gate;
    // Limits that the random inputs cross: the clamps are exercised, not just compiled.
    p.swiglu_limit = activation == Activation::swiglu_oai ? 0.8 : 0.5;
    p.swiglu_alpha = 1.702;
    c.capacity_factor = capacity;
    all.push_back(c);
  };
  add("one token", 1, 32, 48, 4, 2, true, Activation::silu, Scoring::softmax, true, false, 0);
  add("ragged shapes", 37, 40, 24, 6, 3, true, Activation::gelu, Scoring::softmax, true, true, 0);
  add("plain relu sigmoid", 70, 48, 72, 5, 2, false, Activation::relu, Scoring::sigmoid, false, true, 0);
  add("dropping", 90, 32, 40, 4, 2, true, Activation::silu, Scoring::softmax, true, false, 0.6);
  add("many tiles", 300, 136, 136, 4, 2, true, Activation::gelu_tanh, Scoring::softmax, true, true, 0);
  add("top1 of 8", 65, 16, 8, 8, 1, false, Activation::silu, Scoring::softmax, false, false, 1.0);
  add("k equals E", 20, 24, 16, 3, 3, true, Activation::silu, Scoring::sigmoid, true, false, 0);
  add("one expert", 50, 24, 40, 1, 1, true, Activation::silu, Scoring::softmax, true, true, 0);
  // More experts than subscriber threads (96) and than one gate column tile (64).
  add("many experts", 40, 32, 16, 130, 4, true, Activation::silu, Scoring::softmax, true, false, 1.0);
  add("relu2 plain", 33, 24, 40, 4, 2, false, Activation::relu2, Scoring::softmax, true, true, 0);
  add("swiglu_clamp", 41, 40, 24, 5, 2, true, Activation::swiglu_clamp, Scoring::softmax, true, true, 0);
  add("swiglu_clamp_post", 41, 40, 24, 5, 2, true, Activation::swiglu_clamp_post, Scoring::softmax, true, false, 0.8);
  add("swiglu_oai", 41, 40, 24, 5, 2, true, Activation::swiglu_oai, Scoring::softmax, true, true, 0);
  // Routing from outside: no gate stage, sentinel picks contribute zero.
  add("given routing", 57, 40, 24, 6, 3, true, Activation::silu, Scoring::softmax, true, true, 0, true);
  add("given routing dropping", 90, 32, 40, 4, 2, true, Activation::swiglu_oai, Scoring::softmax, true, false, 0.6,
      true);
  add("given routing k above E", 30, 24, 16, 2, 4, false, Activation::relu2, Scoring::softmax, true, true, 0, true);
  // A shared expert: S != I, several row and column tiles of its own, with and without its gate.
  add("shared expert", 37, 40, 24, 6, 2, true, Activation::silu, Scoring::softmax, true, true, 0, false, 20);
  add("shared expert gated dropping", 150, 136, 40, 4, 2, true, Activation::swiglu_oai, Scoring::softmax, true,
      false, 0.6, false, 200, true);
  add("shared expert plain", 33, 24, 40, 4, 2, false, Activation::relu2, Scoring::sigmoid, true, true, 0, false, 7,
      true);
  add("shared expert given routing", 57, 40, 24, 6, 3, true, Activation::silu, Scoring::softmax, true, true, 0.8,
      true, 16, true);
  // Routing options (issue 12): the gate task's route_token and the weight_on_input dispatch/combine.
  add("deepseek routing", 53, 40, 24, 16, 4, true, Activation::silu, Scoring::sigmoid, true, false, 0.9);
  all.back().problem.has_selection_bias = true, all.back().problem.num_groups = 4, all.back().problem.topk_groups = 2;
  all.back().problem.routed_scaling_factor = 2.5;
  add("groups of one", 33, 24, 16, 8, 2, true, Activation::silu, Scoring::softmax, false, true, 0);
  all.back().problem.num_groups = 8, all.back().problem.topk_groups = 3;
  add("softmax_topk", 41, 40, 24, 8, 4, true, Activation::swiglu_oai, Scoring::softmax_topk, true, true, 0.8);
  add("weight_on_input", 47, 40, 24, 6, 1, true, Activation::silu, Scoring::sigmoid, false, false, 0);
  all.back().problem.weight_on_input = true;
  add("weight_on_input k3", 47, 40, 24, 6, 3, false, Activation::gelu, Scoring::softmax, true, true, 0.7);
  all.back().problem.weight_on_input = true, all.back().problem.routed_scaling_factor = 0.5;
  add("given routing weight_on_input", 40, 32, 24, 6, 2, true, Activation::silu, Scoring::softmax, true, true, 0, true);
  all.back().problem.weight_on_input = true;
  // More picks than the combine keeps in registers (the rest read from memory, in the same order).
  add("many picks", 21, 40, 16, 24, 18, true, Activation::silu, Scoring::softmax, true, true, 0.8);
  // A float32 router for bf16/fp16 x (issue 12's router precision): x upcast, the logits in gate.cuh's
  // order; H a whole number of 16-byte chunks or not; softmax, sigmoid and the grouped selection.
  add("fp32 router softmax", 37, 40, 24, 6, 2, true, Activation::silu, Scoring::softmax, true, true, 0);
  all.back().router_f32 = true;
  add("fp32 router sigmoid ragged H", 29, 36, 16, 5, 2, false, Activation::gelu, Scoring::sigmoid, false, true, 0.8);
  all.back().router_f32 = true;
  add("fp32 router deepseek", 45, 264, 24, 32, 4, true, Activation::silu, Scoring::sigmoid, true, true, 0.9);
  all.back().router_f32 = true, all.back().problem.has_selection_bias = true;
  all.back().problem.num_groups = 8, all.back().problem.topk_groups = 3, all.back().problem.routed_scaling_factor = 2.5;
  // Several gate column tiles (E + 1 columns: the shared gate's is the last); lanes with two chunks.
  add("fp32 router many columns shared gate", 11, 264, 16, 20, 3, true, Activation::silu, Scoring::softmax, true,
      true, 0, false, 8, true);
  all.back().router_f32 = true;
  return all;
}

// Workspace::row_tile_capacity, which sizes the scheduler's row-tile arrays, is a bound: random
// splits of up to T·min(k, E) admitted rows over E cells (at most T rows each) never need more row
// tiles, and the worst split (every cell one row past a whole tile) needs exactly that many.
bool row_tile_capacity_holds() {
  std::mt19937 rng{77};
  const int64_t row_tile = cuda::gpu_tiling().row_tile;
  for (int trial = 0; trial < 2000; ++trial) {
    cuda::Workspace w;
    w.tokens = std::uniform_int_distribution<int64_t>(1, 3000)(rng);
    w.experts = std::uniform_int_distribution<int64_t>(1, 300)(rng);
    w.top_k = std::uniform_int_distribution<int64_t>(1, 10)(rng);
    int64_t rows_left = w.tokens * std::min(w.top_k, w.experts), row_tiles = 0;
    for (int64_t e = 0; e < w.experts && rows_left > 0; ++e) {
      const int64_t rows = std::min({rows_left, w.tokens, std::uniform_int_distribution<int64_t>(0, 2 * row_tile)(rng)});
      rows_left -= rows;
      row_tiles += cuda::gpu_tiling().row_tiles(rows);
    }
    if (row_tiles > w.row_tile_capacity()) {
      std::printf("FAIL row_tile_capacity: T=%lld E=%lld k=%lld needs %lld row tiles, capacity %lld\n",
                  static_cast<long long>(w.tokens), static_cast<long long>(w.experts),
                  static_cast<long long>(w.top_k), static_cast<long long>(row_tiles),
                  static_cast<long long>(w.row_tile_capacity()));
      return false;
    }
  }
  cuda::Workspace tight;  // 3 cells of 129 rows: 6 row tiles from T·k = 387 rows
  tight.tokens = 129, tight.experts = 3, tight.top_k = 3;
  if (tight.row_tile_capacity() != 6) {
    std::printf("FAIL row_tile_capacity: %lld for three cells of 129 rows, not 6\n",
                static_cast<long long>(tight.row_tile_capacity()));
    return false;
  }
  return true;
}

// Shapes whose scheduling costs the test prints: decode (a few tokens over many experts) and
// prefill (many row tiles per expert), each also with capacity drops.
constexpr int kCostGrid = 8;

std::vector<Case> cost_cases() {
  std::vector<Case> all;
  auto add = [&](std::string name, int64_t tokens, int64_t experts, int64_t top_k, int64_t hidden, int64_t ffn,
                 double capacity) {
    Case c;
    c.name = name;
    Problem& p = c.problem;
    p.tokens = tokens, p.hidden = hidden, p.ffn = ffn, p.experts = experts, p.top_k = top_k;
    p.gated = true, p.activation = Activation::silu, p.scoring = Scoring::softmax, p.normalize = true;
    c.capacity_factor = capacity;
    all.push_back(c);
  };
  add("decode T=8 E=64 k=8", 8, 64, 8, 64, 256, 0);
  add("decode drops T=16 E=32 k=4", 16, 32, 4, 64, 256, 0.5);
  add("prefill T=512 E=2 k=1", 512, 2, 1, 32, 256, 0);
  add("prefill drops T=512 E=4 k=2", 512, 4, 2, 32, 256, 0.7);
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  bool verbose = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-v") verbose = true;
    else if (arg == "--only" && i + 1 < argc) only = argv[++i];
  }
  int passed = 0, failed = 0;
  uint64_t seed = 1234;
  {
    std::mt19937 rng{99};
    const bool orders = logit_order_matches<cuda::Storage<Math::bf16>, cuda::Storage<Math::bf16>>(rng) &&
                        logit_order_matches<cuda::Storage<Math::bf16>, cuda::FloatStorage<Math::bf16>>(rng) &&
                        logit_order_matches<cuda::Storage<Math::f16>, cuda::FloatStorage<Math::f16>>(rng) &&
                        logit_order_matches<cuda::Storage<Math::f32>, cuda::Storage<Math::f32>>(rng);
    passed += int(orders);
    failed += int(!orders);
  }
  if (cuda::gpu_tiling().token_tile > cuda::kGateTokenTile) {
    std::printf("FAIL the gate's shared partials hold %d tokens, a token tile has %lld\n", cuda::kGateTokenTile,
                static_cast<long long>(cuda::gpu_tiling().token_tile));
    ++failed;
  }
  for (const Case& c : cases()) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const bool f32 = run_case<float, Math::f32>(c, ++seed, verbose);
    const bool bf16 = run_case<bfloat16, Math::bf16>(c, ++seed, verbose);
    passed += int(f32) + int(bf16);
    failed += int(!f32) + int(!bf16);
    if (c.router_f32) {
      const bool f16 = run_case<float16, Math::f16>(c, ++seed, verbose);
      passed += int(f16);
      failed += int(!f16);
    }
  }
  if (only.empty()) {
    const bool holds = row_tile_capacity_holds();
    passed += int(holds);
    failed += int(!holds);
  }
  for (const EpCase& c : ep_cases()) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    const bool bf16 = run_ep_case<bfloat16, Math::bf16>(c, ++seed, verbose);
    const bool f32 = c.world != 2 || run_ep_case<float, Math::f32>(c, ++seed, verbose);
    passed += int(bf16) + int(f32);
    failed += int(!bf16) + int(!f32);
  }
  // What the scheduling costs at decode and prefill shapes, with drops, on a grid of 8 processors.
  for (const Case& c : cost_cases()) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    Costs costs;
    const bool ok = run_case<bfloat16, Math::bf16>(c, ++seed, verbose, {kCostGrid}, &costs);
    costs.print(c.name, kCostGrid);
    passed += int(ok);
    failed += int(!ok);
  }
  std::printf("cuda_emulation: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
