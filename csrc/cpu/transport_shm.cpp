#include "cpu/transport_shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace flashmoe::cpu {
namespace {

std::runtime_error system_error(const std::string& call, const std::string& name) {
  return std::runtime_error("flashmoe: " + call + "(\"" + name + "\") failed: " + std::strerror(errno));
}

std::byte* map_segment(int fd, int64_t bytes, const std::string& name) {
  void* base = mmap(nullptr, size_t(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) throw system_error("mmap", name);
  return static_cast<std::byte*>(base);
}

}  // namespace

SharedMemoryHeaps::SharedMemoryHeaps(int64_t world_size, int64_t local_rank, int64_t heap_bytes,
                                     const std::string& name)
    : local_rank_(local_rank), heap_bytes_(heap_bytes), own_name_(name), bases_(size_t(world_size), nullptr) {
  if (world_size < 1 || local_rank < 0 || local_rank >= world_size) throw std::invalid_argument("flashmoe: bad rank");
  if (heap_bytes < 1) throw std::invalid_argument("flashmoe: heap_bytes must be >= 1");
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) throw system_error("shm_open", name);
  const int64_t bytes = kControlBytes + heap_bytes;
  if (ftruncate(fd, off_t(bytes)) != 0) {  // ftruncate zero-fills: every flag starts at epoch 0
    const std::runtime_error error = system_error("ftruncate", name);
    close(fd);
    shm_unlink(name.c_str());
    throw error;
  }
  try {
    bases_[size_t(local_rank)] = map_segment(fd, bytes, name);
  } catch (...) {
    close(fd);
    shm_unlink(name.c_str());
    throw;
  }
  close(fd);
}

SharedMemoryHeaps::~SharedMemoryHeaps() {
  unlink_own();
  for (std::byte* base : bases_) {
    if (base != nullptr) munmap(base, size_t(kControlBytes + heap_bytes_));
  }
}

void SharedMemoryHeaps::map_peer(int64_t rank, const std::string& name) {
  if (rank < 0 || rank >= world_size()) throw std::invalid_argument("flashmoe: peer rank out of range");
  if (bases_[size_t(rank)] != nullptr) return;
  const int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw system_error("shm_open", name);
  struct stat info {};
  const int64_t bytes = kControlBytes + heap_bytes_;
  if (fstat(fd, &info) != 0 || int64_t(info.st_size) != bytes) {
    close(fd);
    throw std::runtime_error("flashmoe: shared-memory segment \"" + name + "\" of rank " + std::to_string(rank) +
                             " has " + std::to_string(int64_t(info.st_size)) + " bytes, expected " +
                             std::to_string(bytes) + " (the ranks disagree on the heap layout)");
  }
  try {
    bases_[size_t(rank)] = map_segment(fd, bytes, name);
  } catch (...) {
    close(fd);
    throw;
  }
  close(fd);
}

void SharedMemoryHeaps::unlink_own() {
  if (unlinked_) return;
  unlinked_ = true;
  shm_unlink(own_name_.c_str());
}

bool SharedMemoryHeaps::all_mapped() const {
  for (std::byte* base : bases_) {
    if (base == nullptr) return false;
  }
  return true;
}

std::byte* SharedMemoryHeaps::heap(int64_t rank) const {
  std::byte* base = bases_.at(size_t(rank));
  return base == nullptr ? nullptr : base + kControlBytes;
}

std::byte* SharedMemoryHeaps::control(int64_t rank) const { return bases_.at(size_t(rank)); }

}  // namespace flashmoe::cpu
