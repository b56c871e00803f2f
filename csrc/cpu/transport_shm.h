// POSIX shared memory as the symmetric heap of ranks that are processes on one host.
//
// Each rank creates one segment, its own heap (plus a small control page in front, see below),
// and maps every peer's segment by name. Names travel between processes (through the caller's
// process group); addresses never do. Once every rank has mapped every segment, each rank unlinks
// its own, so the segments vanish with the last mapping, even when a process is killed.
//
//   [control page: kControlBytes]  read/written by the Python context (growth requests)
//   [heap: HeapLayout::total_bytes()]
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/transport.h"

namespace flashmoe::cpu {

class SharedMemoryHeaps final : public HeapTransport {
 public:
  static constexpr int64_t kControlBytes = 4096;

  // Creates this rank's segment `name` ("/..." as shm_open wants) of kControlBytes + heap_bytes, zero-filled.
  SharedMemoryHeaps(int64_t world_size, int64_t local_rank, int64_t heap_bytes, const std::string& name);
  ~SharedMemoryHeaps() override;
  SharedMemoryHeaps(const SharedMemoryHeaps&) = delete;
  SharedMemoryHeaps& operator=(const SharedMemoryHeaps&) = delete;

  // Maps rank's segment; its size must match. Throws std::runtime_error naming the segment.
  void map_peer(int64_t rank, const std::string& name);
  // Removes this rank's segment name; the memory lives on while mapped. Idempotent.
  void unlink_own();
  bool all_mapped() const;

  int64_t world_size() const override { return int64_t(bases_.size()); }
  int64_t local_rank() const override { return local_rank_; }
  std::byte* heap(int64_t rank) const override;
  int64_t heap_bytes() const override { return heap_bytes_; }
  std::byte* control(int64_t rank) const;  // the control page in front of rank's heap

 private:
  int64_t local_rank_;
  int64_t heap_bytes_;
  std::string own_name_;
  bool unlinked_ = false;
  std::vector<std::byte*> bases_;  // segment starts, nullptr until mapped
};

}  // namespace flashmoe::cpu
