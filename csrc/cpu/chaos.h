// Chaos mode: seeded random delays and yields at every send, poll and task boundary, and a
// shuffled task order. Results must not change, bit for bit, whatever the seed.
#pragma once

#include <chrono>
#include <cstdint>
#include <random>
#include <thread>

namespace flashmoe::cpu {

// Protocol faults a test can inject, to prove the tests and the watchdog catch them.
enum class Fault : int32_t {
  none = 0,
  skip_empty_dispatch_signal = 1,  // a source does not signal an expert it sends no rows
  stale_epoch = 2,                 // a source signals with the previous call's epoch
  slow_gate = 3,   // rank 0's first member routes for 3 watchdog timeouts, beating: honest, must not fire
  stuck_gate = 4,  // rank 0's first member stops in its gate without beating: a hang, must fire
};

struct ChaosOptions {
  bool enabled = false;
  uint64_t seed = 0;
  Fault fault = Fault::none;
};

// One per thread: the random stream is a function of (seed, rank, member) only.
class Chaos {
 public:
  Chaos(const ChaosOptions& options, int64_t rank, int64_t member)
      : enabled_(options.enabled), random_(options.seed * 1000003u + uint64_t(rank) * 7919u + uint64_t(member)) {}

  bool enabled() const { return enabled_; }

  // A pause at a protocol point: usually nothing, sometimes a yield, rarely a short sleep.
  void point() {
    if (!enabled_) return;
    const uint32_t roll = uint32_t(random_() % 100);
    if (roll < 70) return;
    if (roll < 95) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(random_() % 200));
  }

  // Index of the task to take from a queue of `size` (> 0): the oldest, or any under chaos.
  size_t pick(size_t size) { return enabled_ ? size_t(random_() % size) : 0; }

 private:
  bool enabled_;
  std::mt19937_64 random_;
};

}  // namespace flashmoe::cpu
