// The transport seam of the dataflow runtime (cpu/dataflow.h): where every rank's symmetric heap
// lies in this process's address space, and which rank this process runs.
//
// Without a transport the cluster allocates all W heaps itself and runs all W ranks in this
// process (the simulated ranks, and the single-rank native op). With one, this process runs only
// local_rank(), and every dispatch copy, return row and SignalWord goes to the heap the transport
// mapped for the peer: the same code, the same one-sided stores, another address space behind them.
// Peer addresses never leave this process; what crosses processes is the heap's HeapLayout offsets.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <thread>

namespace flashmoe::cpu {

class HeapTransport {
 public:
  virtual ~HeapTransport() = default;
  virtual int64_t world_size() const = 0;
  virtual int64_t local_rank() const = 0;
  // Base of rank's heap in this process; every heap holds heap_bytes() bytes, flags zeroed at first.
  virtual std::byte* heap(int64_t rank) const = 0;
  virtual int64_t heap_bytes() const = 0;

  // How an idle member waits for its peers, given its consecutive idle polls. Peers that are
  // processes may share cores with each other and with other work, and a pure spin then starves
  // the very peer it waits for: yield for a while, then nap 1, 2, ... up to 20 µs per poll.
  virtual void idle(int64_t idle_polls) const {
    constexpr int64_t kYieldPolls = 256, kMaxNapMicroseconds = 20;
    if (idle_polls <= kYieldPolls) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(std::min(kMaxNapMicroseconds, idle_polls - kYieldPolls)));
    }
  }
};

}  // namespace flashmoe::cpu
