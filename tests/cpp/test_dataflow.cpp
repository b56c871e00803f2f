// Standalone test of the CPU dataflow runtime (csrc/cpu/dataflow.{h,cpp}): W simulated ranks
// exchanging tokens through their symmetric heaps, with chaos on and off, 1 or 2 threads per rank,
// and several calls back to back. No Python, no torch, so it also runs under ThreadSanitizer.
//
// Checks:
//   (a) every rank's outputs equal, bit for bit, a single-rank moe_forward on that rank's tokens;
//   (b) so they are identical across chaos seeds, thread counts, repeats and world sizes;
//   (c) a float64 reference written here agrees (rel err <= 1e-5 fp32, <= 2e-2 bf16);
//   (d) injected protocol faults end in std::runtime_error from the watchdog, never in a hang;
//   (e) through the transport seam (cpu/transport.h), one Cluster per rank, each on its own thread,
//       as flashmoe.distributed runs one per process: the same bits, epochs carried across calls.
//
// Build and run from the repository root (tests/test_cpp.py does this, and under TSan):
//   g++ -O2 -std=c++17 -pthread -Icsrc tests/cpp/test_dataflow.cpp csrc/cpu/*.cpp -o /tmp/test_dataflow
//   /tmp/test_dataflow [-v] [--only SUBSTRING] [--rounds N]
// or with CMake: tests/cpp/CMakeLists.txt (-DFLASHMOE_TSAN=ON for the sanitizer build).
// It prints "dataflow: N passed, M failed" and exits non-zero on any failure.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "core/activation.h"
#include "core/capacity.h"
#include "core/dtype.h"
#include "core/expert_placement.h"
#include "core/heap_layout.h"
#include "core/problem.h"
#include "cpu/chaos.h"
#include "cpu/dataflow.h"
#include "cpu/moe_forward.h"
#include "cpu/transport.h"
#include "cpu/transport_shm.h"

namespace {

using namespace flashmoe;
using namespace flashmoe::cpu;

using Bytes = std::vector<std::byte>;

bool g_verbose = false;
std::string g_only;
int g_passed = 0;
int g_failed = 0;

void record(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
    if (g_verbose) std::printf("ok   %s\n", what.c_str());
    return;
  }
  ++g_failed;
  if (g_failed <= 60) std::fprintf(stderr, "FAIL %s\n", what.c_str());
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::f64: return "f64";
  }
  return "?";
}

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::gelu_tanh: return "gelu_tanh";
    case Activation::relu: return "relu";
  }
  return "?";
}

// ---- Typed access to raw buffers: storage dtype, and "acc" (fp32, or fp64 for f64). ----

int64_t acc_size(DType dtype) { return dtype == DType::f64 ? 8 : 4; }

void put(Bytes& bytes, DType dtype, int64_t i, double value) {
  std::byte* at = bytes.data() + i * dtype_size(dtype);
  switch (dtype) {
    case DType::f32: { const float v = float(value); std::memcpy(at, &v, 4); return; }
    case DType::bf16: { const bfloat16 v = to_bfloat16(float(value)); std::memcpy(at, &v.bits, 2); return; }
    case DType::f16: { const float16 v = to_float16(float(value)); std::memcpy(at, &v.bits, 2); return; }
    case DType::f64: std::memcpy(at, &value, 8); return;
  }
}

double get(const Bytes& bytes, DType dtype, int64_t i) {
  const std::byte* at = bytes.data() + i * dtype_size(dtype);
  switch (dtype) {
    case DType::f32: { float v; std::memcpy(&v, at, 4); return v; }
    case DType::bf16: { bfloat16 v; std::memcpy(&v.bits, at, 2); return to_float(v); }
    case DType::f16: { float16 v; std::memcpy(&v.bits, at, 2); return to_float(v); }
    case DType::f64: { double v; std::memcpy(&v, at, 8); return v; }
  }
  return 0;
}

// ---- One test configuration. ----

struct Case {
  std::string name;
  int64_t world = 1, experts = 1, top_k = 1, hidden = 32, ffn = 48;
  DType dtype = DType::f32;
  bool gated = true;
  Activation activation = Activation::silu;
  Scoring scoring = Scoring::softmax;
  bool normalize = true;
  bool router_bias = false, b1 = false, b2 = false;
  std::vector<int64_t> tokens;   // per rank
  double capacity_factor = 0;    // > 0: C = expert_capacity(factor, rank tokens, k, E)
  int64_t fixed_capacity = -1;   // >= 0: this capacity for every rank
  int64_t spare_max_tokens = 0;  // heaps sized for more tokens than any rank sends
  uint64_t seed = 1;
  double reference_tolerance = 0;  // > 0: also check against the float64 reference
};

std::string describe(const Case& c) {
  std::string tokens;
  for (int64_t t : c.tokens) tokens += (tokens.empty() ? "" : ",") + std::to_string(t);
  std::string capacity = c.fixed_capacity >= 0 ? "C=" + std::to_string(c.fixed_capacity)
                         : c.capacity_factor > 0 ? "cf=" + std::to_string(c.capacity_factor).substr(0, 4)
                                                 : "dropless";
  return c.name + " [W=" + std::to_string(c.world) + " E=" + std::to_string(c.experts) +
         " k=" + std::to_string(c.top_k) + " H=" + std::to_string(c.hidden) + " I=" + std::to_string(c.ffn) + " " +
         dtype_name(c.dtype) + (c.gated ? " gated " : " plain ") + activation_name(c.activation) +
         (c.scoring == Scoring::sigmoid ? " sigmoid" : " softmax") + (c.normalize ? "" : " unnormalized") +
         (c.router_bias ? " router_bias" : "") + (c.b1 ? " b1" : "") + (c.b2 ? " b2" : "") + " " + capacity +
         " tokens " + tokens + "]";
}

int64_t capacity_of(const Case& c, int64_t tokens) {
  if (c.fixed_capacity >= 0) return c.fixed_capacity;
  if (c.capacity_factor > 0) return expert_capacity(c.capacity_factor, tokens, c.top_k, c.experts);
  return kDropless;
}

Problem shape_of(const Case& c) {
  Problem p;
  p.hidden = c.hidden;
  p.ffn = c.ffn;
  p.experts = c.experts;
  p.top_k = c.top_k;
  p.gated = c.gated;
  p.activation = c.activation;
  p.scoring = c.scoring;
  p.normalize = c.normalize;
  p.dtype = c.dtype;
  p.has_router_bias = c.router_bias;
  p.has_b1 = c.b1;
  p.has_b2 = c.b2;
  return p;
}

int64_t n0_of(const Case& c) { return c.gated ? 2 * c.ffn : c.ffn; }

// Random inputs, never zeros: logits of std ~1, expert activations O(1).
struct Data {
  Bytes router_weight, router_bias, w1, b1, w2, b2;
  std::vector<Bytes> x;  // per rank [tokens, H]
};

Data make_data(const Case& c) {
  std::mt19937_64 random(c.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto fill = [&](Bytes& bytes, int64_t count, double std) {
    bytes.assign(size_t(std::max<int64_t>(count, 1) * dtype_size(c.dtype)), std::byte{0});
    for (int64_t i = 0; i < count; ++i) put(bytes, c.dtype, i, normal(random) * std);
  };
  const int64_t E = c.experts, H = c.hidden, I = c.ffn, N0 = n0_of(c);
  Data d;
  fill(d.router_weight, E * H, 1.0 / std::sqrt(double(H)));
  fill(d.w1, E * N0 * H, 1.0 / std::sqrt(double(H)));
  fill(d.w2, E * H * I, 1.0 / std::sqrt(double(I)));
  if (c.router_bias) fill(d.router_bias, E, 0.5);
  if (c.b1) fill(d.b1, E * N0, 0.3);
  if (c.b2) fill(d.b2, E * H, 0.3);
  for (int64_t tokens : c.tokens) {
    d.x.emplace_back();
    fill(d.x.back(), tokens * H, 1.0);
  }
  return d;
}

ExpertWeights weights_of(const Case& c, const Data& d) {
  return ExpertWeights{d.router_weight.data(), c.router_bias ? d.router_bias.data() : nullptr, d.w1.data(),
                       c.b1 ? d.b1.data() : nullptr, d.w2.data(), c.b2 ? d.b2.data() : nullptr};
}

// Every output of one rank, poisoned before a call so that anything left unwritten shows.
struct Outputs {
  int64_t tokens = 0;
  Bytes y, topk_weights, router_logits;
  std::vector<int32_t> topk_ids, expert_counts;
  int64_t dropped = -7;
};

Outputs poisoned_outputs(const Case& c, int64_t tokens) {
  Outputs o;
  o.tokens = tokens;
  const auto poisoned = [](int64_t bytes) { return Bytes(size_t(std::max<int64_t>(bytes, 1)), std::byte{0xff}); };
  o.y = poisoned(tokens * c.hidden * dtype_size(c.dtype));
  o.topk_weights = poisoned(tokens * c.top_k * acc_size(c.dtype));
  o.router_logits = poisoned(tokens * c.experts * acc_size(c.dtype));
  o.topk_ids.assign(size_t(std::max<int64_t>(tokens * c.top_k, 1)), -7);
  o.expert_counts.assign(size_t(c.experts), -7);
  return o;
}

RankIO rank_io(const Case& c, const Data& d, int64_t rank, Outputs& o) {
  return RankIO{d.x[size_t(rank)].data(), o.tokens, capacity_of(c, o.tokens), o.y.data(), o.topk_ids.data(),
                o.topk_weights.data(), o.expert_counts.data(), o.router_logits.data(), &o.dropped};
}

// First difference between two runs' outputs, or "" when every byte that matters is equal.
std::string difference(const Case& c, const Outputs& got, const Outputs& want) {
  const int64_t T = want.tokens;
  const auto bytes_differ = [](const Bytes& a, const Bytes& b, int64_t n, int64_t element, const char* name) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::memcmp(a.data() + i * element, b.data() + i * element, size_t(element)) != 0) {
        return std::string(name) + " differs at element " + std::to_string(i);
      }
    }
    return std::string();
  };
  std::string why = bytes_differ(got.y, want.y, T * c.hidden, dtype_size(c.dtype), "y");
  if (why.empty()) {
    for (int64_t i = 0; i < T * c.top_k && why.empty(); ++i) {
      if (got.topk_ids[size_t(i)] != want.topk_ids[size_t(i)]) why = "topk_ids differ at " + std::to_string(i);
    }
  }
  if (why.empty()) why = bytes_differ(got.topk_weights, want.topk_weights, T * c.top_k, acc_size(c.dtype), "topk_weights");
  if (why.empty()) {
    why = bytes_differ(got.router_logits, want.router_logits, T * c.experts, acc_size(c.dtype), "router_logits");
  }
  if (why.empty() && got.expert_counts != want.expert_counts) why = "expert_counts differ";
  if (why.empty() && got.dropped != want.dropped) {
    why = "dropped " + std::to_string(got.dropped) + " != " + std::to_string(want.dropped);
  }
  return why;
}

// The single-rank operator on one rank's tokens alone: what every rank of a cluster must match.
Outputs single_rank(const Case& c, const Data& d, int64_t rank) {
  Problem p = shape_of(c);
  p.tokens = c.tokens[size_t(rank)];
  p.expert_capacity = capacity_of(c, p.tokens);
  Outputs o = poisoned_outputs(c, p.tokens);
  const ExpertWeights weights{d.router_weight.data(), c.router_bias ? d.router_bias.data() : nullptr, d.w1.data(),
                              c.b1 ? d.b1.data() : nullptr, d.w2.data(), c.b2 ? d.b2.data() : nullptr};
  const RankIO io{d.x[size_t(rank)].data(), p.tokens, p.expert_capacity, o.y.data(), o.topk_ids.data(),
                  o.topk_weights.data(), o.expert_counts.data(), o.router_logits.data(), &o.dropped};
  moe_forward(p, weights, io, 1);
  return o;
}

// ---- The float64 reference of DESIGN.md's operator contract, on the stored (rounded) inputs. ----

struct Reference {
  std::vector<double> y;     // [T, H]
  std::vector<int32_t> ids;  // [T, k]
  int64_t ties = 0;          // tokens whose k-th and (k+1)-th scores are within 1e-6
};

Reference reference(const Case& c, const Data& d, int64_t rank) {
  const int64_t T = c.tokens[size_t(rank)], H = c.hidden, I = c.ffn, E = c.experts, k = c.top_k, N0 = n0_of(c);
  const DType dt = c.dtype;
  const Bytes& x = d.x[size_t(rank)];
  Reference r;
  r.y.assign(size_t(T * H), 0.0);
  r.ids.assign(size_t(T * k), -1);
  std::vector<double> weights(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> scores(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double logit = c.router_bias ? get(d.router_bias, dt, e) : 0.0;
      for (int64_t h = 0; h < H; ++h) logit += get(x, dt, t * H + h) * get(d.router_weight, dt, e * H + h);
      scores[size_t(e)] = logit;
    }
    if (c.scoring == Scoring::softmax) {
      const double top = *std::max_element(scores.begin(), scores.end());
      double sum = 0;
      for (double& s : scores) sum += (s = std::exp(s - top));
      for (double& s : scores) s /= sum;
    } else {
      for (double& s : scores) s = 1.0 / (1.0 + std::exp(-s));
    }
    std::vector<int32_t> order(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) order[size_t(e)] = int32_t(e);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return scores[size_t(a)] > scores[size_t(b)]; });
    if (k < E && scores[size_t(order[size_t(k - 1)])] - scores[size_t(order[size_t(k)])] <
                     1e-6 * scores[size_t(order[size_t(k - 1)])]) {
      ++r.ties;
    }
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += scores[size_t(order[size_t(j)])];
    for (int64_t j = 0; j < k; ++j) {
      r.ids[size_t(t * k + j)] = order[size_t(j)];
      weights[size_t(t * k + j)] = scores[size_t(order[size_t(j)])] / (c.normalize ? sum : 1.0);
    }
  }
  // Capacity per expert, admitting picks in ascending token order.
  const int64_t capacity = capacity_of(c, T);
  std::vector<int64_t> admitted(size_t(E), 0);
  std::vector<double> hidden_units(static_cast<size_t>(I));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = r.ids[size_t(t * k + j)];
      if (capacity != kDropless && admitted[size_t(e)] >= capacity) continue;
      ++admitted[size_t(e)];
      const auto projection = [&](int64_t row) {
        double sum = c.b1 ? get(d.b1, dt, e * N0 + row) : 0.0;
        for (int64_t h = 0; h < H; ++h) sum += get(x, dt, t * H + h) * get(d.w1, dt, (e * N0 + row) * H + h);
        return sum;
      };
      for (int64_t i = 0; i < I; ++i) {
        hidden_units[size_t(i)] = activate<double>(c.activation, projection(i)) * (c.gated ? projection(I + i) : 1.0);
      }
      for (int64_t n = 0; n < H; ++n) {
        double out = c.b2 ? get(d.b2, dt, e * H + n) : 0.0;
        for (int64_t i = 0; i < I; ++i) out += hidden_units[size_t(i)] * get(d.w2, dt, (e * H + n) * I + i);
        r.y[size_t(t * H + n)] += weights[size_t(t * k + j)] * out;
      }
    }
  }
  return r;
}

void check_reference(const Case& c, const Data& d, const std::vector<Outputs>& outputs) {
  double error = 0, norm = 0;
  int64_t ties = 0, id_mismatches = 0;
  for (int64_t rank = 0; rank < c.world; ++rank) {
    const Reference r = reference(c, d, rank);
    const Outputs& o = outputs[size_t(rank)];
    ties += r.ties;
    for (size_t i = 0; i < r.ids.size(); ++i) id_mismatches += r.ids[i] != o.topk_ids[i];
    for (size_t i = 0; i < r.y.size(); ++i) {
      const double diff = get(o.y, c.dtype, int64_t(i)) - r.y[i];
      error += diff * diff;
      norm += r.y[i] * r.y[i];
    }
  }
  const double relative = std::sqrt(error / std::max(norm, 1e-300));
  char line[200];
  std::snprintf(line, sizeof(line), ": reference rel err %.3g (tolerance %.3g), %lld topk_ids differ, %lld tied tokens",
                relative, c.reference_tolerance, (long long)id_mismatches, (long long)ties);
  // A tie would make the comparison meaningless: the configuration's seed must avoid it.
  record(ties == 0 && id_mismatches == 0 && norm > 0 && relative <= c.reference_tolerance, describe(c) + line);
}

// ---- Running a cluster. ----

struct Variant {
  bool chaos;
  uint64_t seed;
  int threads_per_rank;
  int64_t repeats;   // calls back to back inside one forward, no join between ranks
  int forwards = 1;  // forward() calls on the same cluster (epochs carry over)
};

std::string describe(const Variant& v) {
  return std::string(v.chaos ? "chaos seed " + std::to_string(v.seed) : "no chaos") + ", " +
         std::to_string(v.threads_per_rank) + " thread(s)/rank, repeats " + std::to_string(v.repeats) + ", " +
         std::to_string(v.forwards) + " forward(s)";
}

ClusterConfig cluster_config(const Case& c, int threads_per_rank, ChaosOptions chaos, double watchdog_seconds) {
  ClusterConfig config;
  config.shape = shape_of(c);
  config.world_size = c.world;
  config.max_tokens = std::max<int64_t>(1, *std::max_element(c.tokens.begin(), c.tokens.end())) + c.spare_max_tokens;
  config.threads_per_rank = threads_per_rank;
  config.chaos = chaos;
  config.watchdog_seconds = watchdog_seconds;
  return config;
}

// Runs every variant of a case and compares each rank with its single-rank run.
void run_case(const Case& c, const std::vector<Variant>& variants, bool with_reference) {
  if (!g_only.empty() && describe(c).find(g_only) == std::string::npos) return;
  const auto start = std::chrono::steady_clock::now();
  const Data d = make_data(c);
  std::vector<Outputs> expected;
  for (int64_t rank = 0; rank < c.world; ++rank) expected.push_back(single_rank(c, d, rank));
  for (const Variant& v : variants) {
    const std::string what = describe(c) + " " + describe(v);
    std::string why;
    try {
      Cluster cluster(cluster_config(c, v.threads_per_rank, ChaosOptions{v.chaos, v.seed, Fault::none}, 60));
      for (int call = 0; call < v.forwards && why.empty(); ++call) {
        std::vector<Outputs> outputs;
        std::vector<RankIO> io;
        for (int64_t rank = 0; rank < c.world; ++rank) outputs.push_back(poisoned_outputs(c, c.tokens[size_t(rank)]));
        for (int64_t rank = 0; rank < c.world; ++rank) io.push_back(rank_io(c, d, rank, outputs[size_t(rank)]));
        cluster.forward(weights_of(c, d), io, v.repeats);
        for (int64_t rank = 0; rank < c.world && why.empty(); ++rank) {
          const std::string diff = difference(c, outputs[size_t(rank)], expected[size_t(rank)]);
          if (!diff.empty()) why = "forward " + std::to_string(call) + ", rank " + std::to_string(rank) + ": " + diff;
        }
        if (why.empty() && with_reference && call == 0 && &v == &variants.front() && c.reference_tolerance > 0) {
          check_reference(c, d, outputs);
        }
      }
      const uint32_t expected_epoch = uint32_t(v.repeats * v.forwards);
      for (int64_t rank = 0; rank < c.world && why.empty(); ++rank) {
        if (cluster.epoch(rank) != expected_epoch) {
          why = "rank " + std::to_string(rank) + " ends at epoch " + std::to_string(cluster.epoch(rank)) + ", expected " +
                std::to_string(expected_epoch);
        }
      }
    } catch (const std::exception& error) {
      why = std::string("threw: ") + error.what();
    }
    record(why.empty(), what + (why.empty() ? "" : ": " + why));
  }
  if (g_verbose) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("     %.2f s\n", seconds);
  }
}

// ---- Fault injection: a broken protocol must end in the watchdog's error, not a hang. ----

void run_fault(const Case& c, Fault fault, int threads_per_rank, const char* must_mention) {
  const char* fault_name = fault == Fault::stale_epoch  ? "stale_epoch"
                           : fault == Fault::stuck_gate ? "stuck_gate"
                                                        : "skip_empty_dispatch_signal";
  const std::string what = describe(c) + " fault " + fault_name + ", " + std::to_string(threads_per_rank) +
                           " thread(s)/rank";
  if (!g_only.empty() && what.find(g_only) == std::string::npos) return;
  const Data d = make_data(c);
  std::vector<Outputs> outputs;
  std::vector<RankIO> io;
  for (int64_t rank = 0; rank < c.world; ++rank) outputs.push_back(poisoned_outputs(c, c.tokens[size_t(rank)]));
  for (int64_t rank = 0; rank < c.world; ++rank) io.push_back(rank_io(c, d, rank, outputs[size_t(rank)]));
  Cluster cluster(cluster_config(c, threads_per_rank, ChaosOptions{true, c.seed, fault}, 1.0));
  std::string why;
  try {
    cluster.forward(weights_of(c, d), io, 2);
    why = "returned instead of failing";
  } catch (const std::runtime_error& error) {
    const std::string message = error.what();
    if (message.find("watchdog") == std::string::npos || message.find(must_mention) == std::string::npos) {
      why = "message does not mention \"" + std::string(must_mention) + "\": " + message;
    } else if (g_verbose) {
      std::printf("     %s\n", message.c_str());
    }
  } catch (const std::exception& error) {
    why = std::string("threw a non-runtime_error: ") + error.what();
  }
  // A cluster that failed refuses to run again rather than run on a heap in an unknown state.
  if (why.empty()) {
    try {
      cluster.forward(weights_of(c, d), io, 1);
      why = "a failed cluster ran again";
    } catch (const std::runtime_error& error) {
      if (std::string(error.what()).find("failed earlier") == std::string::npos) {
        why = std::string("second forward: unexpected message: ") + error.what();
      }
    }
  }
  record(why.empty(), what + (why.empty() ? "" : ": " + why));
}

// ---- The transport seam: one Cluster per rank, each running its rank alone on its own thread. ----
//
// What flashmoe.distributed does across processes, inside one process so that ThreadSanitizer sees
// every rank: each rank's Cluster gets a HeapTransport and its local experts only (first_expert).
// `Heaps` is either plain shared allocations (one address per heap: TSan checks the cross-rank
// hand-offs) or the POSIX shared-memory transport itself (each rank maps every segment).

class PlainHeaps final : public HeapTransport {
 public:
  PlainHeaps(std::shared_ptr<std::vector<Bytes>> heaps, int64_t rank) : heaps_(std::move(heaps)), rank_(rank) {}
  int64_t world_size() const override { return int64_t(heaps_->size()); }
  int64_t local_rank() const override { return rank_; }
  std::byte* heap(int64_t rank) const override { return (*heaps_)[size_t(rank)].data(); }
  int64_t heap_bytes() const override { return int64_t(heaps_->front().size()); }

 private:
  std::shared_ptr<std::vector<Bytes>> heaps_;
  int64_t rank_;
};

std::vector<std::shared_ptr<HeapTransport>> make_transports(const Case& c, int64_t heap_bytes, bool shared_memory) {
  std::vector<std::shared_ptr<HeapTransport>> transports;
  if (!shared_memory) {
    auto heaps = std::make_shared<std::vector<Bytes>>(size_t(c.world), Bytes(size_t(heap_bytes), std::byte{0}));
    for (int64_t rank = 0; rank < c.world; ++rank) transports.push_back(std::make_shared<PlainHeaps>(heaps, rank));
    return transports;
  }
  std::vector<std::shared_ptr<SharedMemoryHeaps>> mapped;
  std::vector<std::string> names;
  for (int64_t rank = 0; rank < c.world; ++rank) {
    names.push_back("/flashmoe-test-" + std::to_string(getpid()) + "-" + std::to_string(rank));
    mapped.push_back(std::make_shared<SharedMemoryHeaps>(c.world, rank, heap_bytes, names.back()));
  }
  for (auto& heaps : mapped) {
    for (int64_t rank = 0; rank < c.world; ++rank) heaps->map_peer(rank, names[size_t(rank)]);
  }
  for (auto& heaps : mapped) {
    heaps->unlink_own();
    transports.push_back(heaps);
  }
  return transports;
}

void run_transport_case(const Case& c, bool shared_memory, ChaosOptions chaos, int forwards, int64_t repeats) {
  const std::string what = describe(c) + (shared_memory ? " one Cluster per rank over POSIX shared memory"
                                                        : " one Cluster per rank over a HeapTransport") +
                           (chaos.enabled ? ", chaos seed " + std::to_string(chaos.seed) : "");
  if (!g_only.empty() && what.find(g_only) == std::string::npos) return;
  const Data d = make_data(c);
  std::vector<Outputs> expected;
  for (int64_t rank = 0; rank < c.world; ++rank) expected.push_back(single_rank(c, d, rank));
  std::string why;
  try {
    const ClusterConfig base = cluster_config(c, 1, chaos, 60);
    const int64_t heap_bytes = HeapLayout{ExpertPlacement{c.world, c.experts}, base.max_tokens, c.top_k, c.hidden,
                                          dtype_size(c.dtype)}.total_bytes();
    const auto transports = make_transports(c, heap_bytes, shared_memory);
    std::vector<std::unique_ptr<Cluster>> clusters;
    for (int64_t rank = 0; rank < c.world; ++rank) {
      ClusterConfig config = base;
      config.transport = transports[size_t(rank)];
      clusters.push_back(std::make_unique<Cluster>(config));
    }
    const int64_t L = c.experts / c.world, N0 = n0_of(c), esize = dtype_size(c.dtype);
    for (int call = 0; call < forwards && why.empty(); ++call) {
      std::vector<Outputs> outputs;
      for (int64_t rank = 0; rank < c.world; ++rank) outputs.push_back(poisoned_outputs(c, c.tokens[size_t(rank)]));
      std::vector<std::string> errors(size_t(c.world));
      std::vector<std::thread> threads;
      for (int64_t rank = 0; rank < c.world; ++rank) {
        threads.emplace_back([&, rank] {
          // Only this rank's experts: what a process holding L experts passes.
          ExpertWeights weights = weights_of(c, d);
          weights.w1 = d.w1.data() + rank * L * N0 * c.hidden * esize;
          weights.w2 = d.w2.data() + rank * L * c.hidden * c.ffn * esize;
          if (c.b1) weights.b1 = d.b1.data() + rank * L * N0 * esize;
          if (c.b2) weights.b2 = d.b2.data() + rank * L * c.hidden * esize;
          weights.first_expert = rank * L;
          try {
            clusters[size_t(rank)]->forward(weights, {rank_io(c, d, rank, outputs[size_t(rank)])}, repeats);
          } catch (const std::exception& error) {
            errors[size_t(rank)] = error.what();
          }
        });
      }
      for (std::thread& thread : threads) thread.join();
      for (int64_t rank = 0; rank < c.world && why.empty(); ++rank) {
        if (!errors[size_t(rank)].empty()) why = "rank " + std::to_string(rank) + " threw: " + errors[size_t(rank)];
        const std::string diff = difference(c, outputs[size_t(rank)], expected[size_t(rank)]);
        if (why.empty() && !diff.empty()) why = "forward " + std::to_string(call) + ", rank " + std::to_string(rank) + ": " + diff;
      }
    }
    for (int64_t rank = 0; rank < c.world && why.empty(); ++rank) {
      if (clusters[size_t(rank)]->epoch(rank) != uint32_t(forwards * repeats)) why = "epochs did not carry over";
    }
  } catch (const std::exception& error) {
    why = std::string("threw: ") + error.what();
  }
  record(why.empty(), what + (why.empty() ? "" : ": " + why));
}

// ---- The watchdog measures progress: a long honest phase, beating all along, never fires. ----

// Rank 0's first member spends 3 watchdog timeouts in its gate (Fault::slow_gate) while its team
// waits at the barrier and the other ranks wait for its flags; the call must succeed and match.
void run_slow_gate(const Case& c, int threads_per_rank) {
  const std::string what = describe(c) + " slow_gate (honest long phase), " + std::to_string(threads_per_rank) +
                           " thread(s)/rank";
  if (!g_only.empty() && what.find(g_only) == std::string::npos) return;
  const Data d = make_data(c);
  std::vector<Outputs> outputs;
  std::vector<RankIO> io;
  for (int64_t rank = 0; rank < c.world; ++rank) outputs.push_back(poisoned_outputs(c, c.tokens[size_t(rank)]));
  for (int64_t rank = 0; rank < c.world; ++rank) io.push_back(rank_io(c, d, rank, outputs[size_t(rank)]));
  std::string why;
  try {
    Cluster cluster(cluster_config(c, threads_per_rank, ChaosOptions{false, 0, Fault::slow_gate}, 1.0));
    cluster.forward(weights_of(c, d), io, 1);
    for (int64_t rank = 0; rank < c.world && why.empty(); ++rank) {
      const std::string diff = difference(c, outputs[size_t(rank)], single_rank(c, d, rank));
      if (!diff.empty()) why = "rank " + std::to_string(rank) + ": " + diff;
    }
  } catch (const std::exception& error) {
    why = std::string("threw: ") + error.what();
  }
  record(why.empty(), what + (why.empty() ? "" : ": " + why));
}

// ---- Impossible sizes: a named std::invalid_argument, never a heap too small for its calls. ----

// Issue 16, defect 1: max_tokens * top_k overflowed int64, so a 2^62 + 1 token heap came out a few
// KiB and the first call of 100 tokens wrote past it. The cluster must refuse to be built.
void run_impossible_sizes() {
  const std::string what = "impossible sizes: max_tokens = 2^62 + 1, E=4 k=4 H=64";
  if (!g_only.empty() && what.find(g_only) == std::string::npos) return;
  Case c;
  c.name = "oversized";
  c.experts = 4;
  c.top_k = 4;
  c.hidden = 64;
  c.ffn = 8;
  c.tokens = {100};
  c.seed = 16;
  const Data d = make_data(c);
  Outputs outputs = poisoned_outputs(c, 100);
  ClusterConfig config = cluster_config(c, 1, ChaosOptions{}, 60);
  config.max_tokens = (int64_t(1) << 62) + 1;
  std::string why;
  try {
    Cluster cluster(config);
    cluster.forward(weights_of(c, d), {rank_io(c, d, 0, outputs)}, 1);
    why = "built a cluster of " + std::to_string(cluster.heap_bytes()) + " heap bytes and ran it";
  } catch (const std::invalid_argument& error) {
    if (std::string(error.what()).find("max_tokens") == std::string::npos) {
      why = std::string("message does not name max_tokens: ") + error.what();
    }
  } catch (const std::exception& error) {
    why = std::string("threw a non-invalid_argument: ") + error.what();
  }
  record(why.empty(), what + (why.empty() ? "" : ": " + why));
}

// ---- The configurations. ----

std::vector<Case> sweep() {
  std::vector<Case> cases;
  std::mt19937_64 random(20240607);
  const auto uniform = [&](int64_t lo, int64_t hi) { return lo + int64_t(random() % uint64_t(hi - lo + 1)); };
  int index = 0;
  for (int64_t W : {1, 2, 3, 4, 8}) {
    for (int64_t E : {W, 2 * W, 32 / W * W}) {
      for (int64_t k : {1, 2, 4}) {
        if (k > E) continue;
        Case c;
        c.name = "sweep" + std::to_string(index);
        c.world = W;
        c.experts = E;
        c.top_k = k;
        c.hidden = uniform(24, 40);
        c.ffn = uniform(32, 56);
        c.dtype = index % 2 == 0 ? DType::f32 : DType::bf16;
        if (index % 11 == 5) c.dtype = DType::f16;
        if (index % 13 == 7) c.dtype = DType::f64;
        c.gated = index % 4 < 2;
        c.activation = Activation(index % 4);
        c.scoring = index % 5 == 3 ? Scoring::sigmoid : Scoring::softmax;
        c.normalize = index % 7 != 4;
        c.router_bias = index % 3 == 1;
        c.b1 = index % 3 == 2;
        c.b2 = index % 6 == 2 || index % 6 == 3;
        for (int64_t r = 0; r < W; ++r) c.tokens.push_back(uniform(1, 40));
        if (index % 3 == 0) c.tokens[size_t(index % W)] = 0;  // a rank with nothing to send
        switch (index % 5) {
          case 0: case 1: break;  // dropless
          case 2: c.capacity_factor = 1.0; break;
          case 3: c.capacity_factor = 0.5; break;
          case 4: c.fixed_capacity = index % 10 == 4 ? 0 : 2; break;
        }
        c.spare_max_tokens = index % 4 == 1 ? 5 : 0;
        c.seed = 1000 + uint64_t(index);
        cases.push_back(c);
        ++index;
      }
    }
  }
  return cases;
}

std::vector<Case> special_cases() {
  std::vector<Case> cases;
  // Several row tiles per cell (> 64 rows), several GEMM0 column tiles (I > 256), more row tiles
  // than intermediate buffers (the backlog path): every token picks both experts.
  Case rows;
  rows.name = "row_tiles";
  rows.world = 2;
  rows.experts = 2;
  rows.top_k = 2;
  rows.hidden = 40;
  rows.ffn = 300;
  rows.tokens = {130, 71};
  rows.b1 = rows.b2 = true;
  rows.seed = 7;
  rows.reference_tolerance = 1e-5;
  cases.push_back(rows);
  // Several GEMM1 column tiles (H > 512) and a capacity that drops.
  Case wide;
  wide.name = "hidden_tiles";
  wide.world = 2;
  wide.experts = 4;
  wide.top_k = 2;
  wide.hidden = 520;
  wide.ffn = 40;
  wide.gated = false;
  wide.activation = Activation::gelu;
  wide.router_bias = true;
  wide.tokens = {9, 14};
  wide.capacity_factor = 1.0;
  wide.seed = 8;
  wide.reference_tolerance = 1e-5;
  cases.push_back(wide);
  // The float64 reference on a small fp32 and a bf16 multi-rank problem.
  Case small;
  small.name = "reference_f32";
  small.world = 4;
  small.experts = 8;
  small.top_k = 2;
  small.hidden = 36;
  small.ffn = 52;
  small.router_bias = small.b1 = small.b2 = true;
  small.tokens = {17, 0, 40, 5};
  small.capacity_factor = 1.0;
  small.seed = 9;
  small.reference_tolerance = 1e-5;
  cases.push_back(small);
  Case bf16 = small;
  bf16.name = "reference_bf16";
  bf16.dtype = DType::bf16;
  bf16.world = 2;
  bf16.tokens = {23, 31};
  bf16.activation = Activation::gelu_tanh;
  bf16.capacity_factor = 0;
  bf16.seed = 10;
  bf16.reference_tolerance = 2e-2;
  cases.push_back(bf16);
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-v") {
      g_verbose = true;
    } else if (arg == "--only" && i + 1 < argc) {
      g_only = argv[++i];
    } else if (arg == "--rounds" && i + 1 < argc) {
      rounds = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [-v] [--only SUBSTRING] [--rounds N (chaos seeds per variant)]\n", argv[0]);
      return 2;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  run_impossible_sizes();

  // Thread counts, repeats and chaos seeds (new ones each round); the bits must not change.
  for (int round = 0; round < rounds; ++round) {
    const uint64_t seed = 100 * uint64_t(round);
    std::vector<Variant> variants = {
        {true, seed + 11, 2, 3, 1},
        {true, seed + 12, 1, 2, 2},
        {true, seed + 13, 2, 1, 1},
    };
    std::vector<Variant> more_variants = {
        {true, seed + 21, 1, 1, 1},
        {true, seed + 22, 2, 4, 1},
        {true, seed + 23, 2, 2, 2},
    };
    if (round == 0) {
      variants.insert(variants.begin(), Variant{false, 0, 1, 1, 1});
      more_variants.insert(more_variants.begin(), Variant{false, 0, 2, 1, 1});
    }
    for (const Case& c : sweep()) run_case(c, variants, round == 0);
    for (const Case& c : special_cases()) run_case(c, more_variants, round == 0);
  }

  // The transport seam: ranks as separate Clusters, epochs carried across forwards.
  Case seam;
  seam.name = "transport";
  seam.world = 3;
  seam.experts = 6;
  seam.top_k = 2;
  seam.hidden = 40;
  seam.ffn = 72;
  seam.b1 = seam.b2 = true;
  seam.capacity_factor = 1.0;
  seam.tokens = {9, 0, 70};
  for (int round = 0; round < rounds; ++round) {
    run_transport_case(seam, false, ChaosOptions{true, 300 + uint64_t(round), Fault::none}, 2, 2);
  }
  seam.dtype = DType::bf16;
  run_transport_case(seam, true, ChaosOptions{false, 0, Fault::none}, 2, 1);

  // (d) Faults. A rank with no tokens sends only empty cells, so skipping empty signals starves
  // every owner; with W = 1 the one rank is also the one waiting for the flag.
  Case fault;
  fault.name = "fault";
  fault.experts = 4;
  fault.top_k = 1;
  fault.hidden = 24;
  fault.ffn = 32;
  fault.tokens = {0};
  run_fault(fault, Fault::skip_empty_dispatch_signal, 1, "dispatch flag");
  run_fault(fault, Fault::stale_epoch, 2, "dispatch flag");
  fault.tokens = {3};
  run_fault(fault, Fault::stale_epoch, 1, "dispatch flag");
  fault.world = 2;
  fault.tokens = {0, 6};
  run_fault(fault, Fault::skip_empty_dispatch_signal, 2, "dispatch flag");
  // Every source sends the last expert a stale epoch; only its owner waits on a dispatch flag, the
  // other ranks wait on that owner's return flag, and whichever watchdog fires first reports.
  fault.world = 4;
  fault.experts = 8;
  fault.tokens = {5, 0, 7, 3};
  run_fault(fault, Fault::stale_epoch, 1, "flag");

  // (e) The watchdog fires on a member that stops without beating, naming the wait, whether its
  // team waits for it at a barrier or it is alone; and never on a long phase that beats.
  fault.world = 1;
  fault.experts = 4;
  fault.tokens = {5};
  run_fault(fault, Fault::stuck_gate, 2, "barrier after gate");
  run_fault(fault, Fault::stuck_gate, 1, "stuck_gate");
  fault.world = 2;
  fault.tokens = {5, 9};
  run_slow_gate(fault, 2);
  run_slow_gate(fault, 1);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("dataflow: %d passed, %d failed (%.1f s)\n", g_passed, g_failed, seconds);
  return g_failed == 0 && g_passed > 0 ? 0 : 1;
}
