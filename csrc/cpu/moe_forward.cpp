#include "cpu/moe_forward.h"

#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

namespace flashmoe::cpu {
namespace {

// Clusters are kept between calls, so repeated calls reuse their heaps (no page faults) and
// epochs, up to this many bytes in all (FLASHMOE_CPU_CACHE_BYTES overrides; 0 disables).
int64_t cache_budget_bytes() {
  static const int64_t budget = [] {
    const char* value = std::getenv("FLASHMOE_CPU_CACHE_BYTES");
    return value ? std::max<int64_t>(0, std::atoll(value)) : int64_t(1) << 30;
  }();
  return budget;
}

bool same_shape(const Problem& a, const Problem& b) {
  return a.hidden == b.hidden && a.ffn == b.ffn && a.experts == b.experts && a.top_k == b.top_k &&
         a.gated == b.gated && a.activation == b.activation && a.scoring == b.scoring &&
         a.normalize == b.normalize && a.dtype == b.dtype && a.has_router_bias == b.has_router_bias &&
         a.has_b1 == b.has_b1 && a.has_b2 == b.has_b2 && a.routing_given == b.routing_given &&
         a.swiglu_limit == b.swiglu_limit && a.swiglu_alpha == b.swiglu_alpha &&
         a.has_selection_bias == b.has_selection_bias && a.num_groups == b.num_groups &&
         a.topk_groups == b.topk_groups && a.routed_scaling_factor == b.routed_scaling_factor &&
         a.weight_on_input == b.weight_on_input && a.router_f32 == b.router_f32 &&
         a.shared_ffn == b.shared_ffn && a.has_shared_gate == b.has_shared_gate;
}

class ClusterCache {
 public:
  std::unique_ptr<Cluster> lease(const Problem& problem, int threads) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        const ClusterConfig& config = (*it)->config();
        if (same_shape(config.shape, problem) && config.threads_per_rank == threads &&
            config.max_tokens >= problem.tokens) {
          std::unique_ptr<Cluster> cluster = std::move(*it);
          idle_.erase(it);
          return cluster;
        }
      }
    }
    ClusterConfig config;
    config.shape = problem;
    config.world_size = 1;
    config.max_tokens = std::max<int64_t>(1, problem.tokens);
    config.threads_per_rank = threads;
    return std::make_unique<Cluster>(config);
  }

  // Most recently used last; the oldest go first when the budget is exceeded.
  void give_back(std::unique_ptr<Cluster> cluster) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(cluster));
    int64_t total = 0;
    for (const auto& idle : idle_) total += idle->footprint_bytes();
    while (!idle_.empty() && total > cache_budget_bytes()) {
      total -= idle_.front()->footprint_bytes();
      idle_.erase(idle_.begin());
    }
  }

  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t total = 0;
    for (const auto& idle : idle_) total += idle->footprint_bytes();
    idle_.clear();
    return total;
  }

  // A forked child must not inherit a mutex another thread held at the fork.
  void forget_in_child() { new (&mutex_) std::mutex(); }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Cluster>> idle_;
};

ClusterCache& cache() {
  static ClusterCache* instance = [] {
    auto* created = new ClusterCache();  // never destroyed: no teardown-order hazards
    pthread_atfork(nullptr, nullptr, [] { cache().forget_in_child(); });
    return created;
  }();
  return *instance;
}

}  // namespace

void moe_forward(const Problem& problem, const ExpertWeights& weights, const RankIO& io, int num_threads) {
  std::unique_ptr<Cluster> cluster = cache().lease(problem, std::max(1, num_threads));
  cluster->forward(weights, {io});  // a cluster that threw is dropped, never cached
  cache().give_back(std::move(cluster));
}

int64_t empty_cache() { return cache().clear(); }

}  // namespace flashmoe::cpu
