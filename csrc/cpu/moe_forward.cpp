#include "cpu/moe_forward.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/dataflow.h"

namespace flashmoe::cpu {
namespace {

// Clusters whose heaps are small enough to keep between calls, so repeated calls (decode) reuse
// their heap and epochs. Larger ones are built for the call and freed after it.
constexpr int64_t kCachedHeapBytes = int64_t(64) << 20;
constexpr size_t kCachedClusters = 8;

bool same_shape(const Problem& a, const Problem& b) {
  return a.hidden == b.hidden && a.ffn == b.ffn && a.experts == b.experts && a.top_k == b.top_k &&
         a.gated == b.gated && a.activation == b.activation && a.scoring == b.scoring &&
         a.normalize == b.normalize && a.dtype == b.dtype && a.has_router_bias == b.has_router_bias &&
         a.has_b1 == b.has_b1 && a.has_b2 == b.has_b2;
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

  void give_back(std::unique_ptr<Cluster> cluster) {
    if (cluster->heap_bytes() > kCachedHeapBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(cluster));
    if (idle_.size() > kCachedClusters) idle_.erase(idle_.begin());
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Cluster>> idle_;
};

ClusterCache& cache() {
  static ClusterCache* instance = new ClusterCache();  // never destroyed: no teardown-order hazards
  return *instance;
}

}  // namespace

void moe_forward(const Problem& problem, const MoETensors& t, int num_threads) {
  const int threads = std::max(1, num_threads);
  std::unique_ptr<Cluster> cluster = cache().lease(problem, threads);
  const ExpertWeights weights{t.router_weight, t.router_bias, t.w1, t.b1, t.w2, t.b2};
  const RankIO io{t.x, problem.tokens, problem.expert_capacity, t.y, t.topk_ids, t.topk_weights, t.expert_counts,
                  t.router_logits, t.dropped};
  cluster->forward(weights, {io});  // a cluster that threw is dropped, never cached
  cache().give_back(std::move(cluster));
}

}  // namespace flashmoe::cpu
