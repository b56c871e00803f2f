// NVSHMEM bootstrap over a unique id (NVSHMEMX_INIT_WITH_UNIQUEID: no MPI, no nvshmrun) and the
// symmetric-memory calls, each checked. The id travels over torch.distributed in Python.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "nvshmem/check.h"
#include "nvshmem/runtime.h"

namespace flashmoe::nvshmem {
namespace {

static_assert(sizeof(nvshmemx_uniqueid_t) == kUniqueIdBytes, "runtime.h's kUniqueIdBytes is stale");

bool initialized_by_us = false;

void require_initialized(const char* what) {
  if (!initialized_by_us) {
    throw std::runtime_error(std::string("flashmoe._nvshmem: ") + what +
                             " needs NVSHMEM initialised by flashmoe.distributed.nvshmem.init() first");
  }
}

}  // namespace

Version compiled_version() {
  return {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION, NVSHMEM_VENDOR_PATCH_VERSION};
}

Version runtime_version() {
  Version version;
  nvshmemx_vendor_get_version_info(&version.major, &version.minor, &version.patch);
  return version;
}

int compiled_cuda_major() { return CUDART_VERSION / 1000; }

std::string get_unique_id() {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  FLASHMOE_NVSHMEM_CHECK(nvshmemx_get_uniqueid(&id));
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

int init_status() { return nvshmemx_init_status(); }

bool initialized() { return initialized_by_us; }

void init(const std::string& unique_id, int rank, int n_pes, int device) {
  if (unique_id.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("flashmoe._nvshmem.init: unique_id must be " + std::to_string(kUniqueIdBytes) +
                                " bytes (got " + std::to_string(unique_id.size()) + ")");
  }
  if (n_pes < 1 || rank < 0 || rank >= n_pes) {
    throw std::invalid_argument("flashmoe._nvshmem.init: rank must be in [0, n_pes) and n_pes >= 1 (got rank " +
                                std::to_string(rank) + ", n_pes " + std::to_string(n_pes) + ")");
  }
  if (initialized_by_us) {
    throw std::runtime_error("flashmoe._nvshmem.init: NVSHMEM is already initialised by flashmoe in this process");
  }
  const int status = nvshmemx_init_status();
  if (status != NVSHMEM_STATUS_NOT_INITIALIZED) {
    // Not ours: torch's NVSHMEM symmetric memory, or another library. Its device state does not
    // cover this module's copy of libnvshmem_device, and two owners would finalise it twice.
    throw std::runtime_error(
        "flashmoe._nvshmem.init: NVSHMEM is already initialised in this process by another library "
        "(nvshmemx_init_status() = " + std::to_string(status) +
        ", e.g. torch's NVSHMEM symmetric memory): flashmoe's NVSHMEM transport must initialise NVSHMEM itself; "
        "use transport=\"all_to_all\", or create flashmoe's NVSHMEM context before anything else initialises NVSHMEM");
  }
  FLASHMOE_CUDA_CHECK(cudaSetDevice(device));
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  FLASHMOE_NVSHMEM_CHECK(nvshmemx_set_attr_uniqueid_args(rank, n_pes, &id, &attr));
  // nvshmemx_init_attr() is this call plus exit() on failure; flashmoe raises instead.
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  FLASHMOE_NVSHMEM_CHECK(nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID,
                                              &attr, version));
  initialized_by_us = true;
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != n_pes) {
    const std::string got = "PE " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes());
    finalize();
    throw std::runtime_error("flashmoe._nvshmem.init: NVSHMEM made this process " + got + ", expected rank " +
                             std::to_string(rank) + " of " + std::to_string(n_pes));
  }
}

int my_pe() {
  require_initialized("my_pe");
  return nvshmem_my_pe();
}

int n_pes() {
  require_initialized("n_pes");
  return nvshmem_n_pes();
}

uintptr_t malloc_symmetric(size_t bytes) {
  require_initialized("malloc");
  if (bytes == 0) throw std::invalid_argument("flashmoe._nvshmem.malloc: bytes must be positive");
  void* address = nvshmem_malloc(bytes);
  if (address == nullptr) {
    throw std::runtime_error("flashmoe._nvshmem: nvshmem_malloc(" + std::to_string(bytes) +
                             ") returned NULL: the symmetric heap is full; raise NVSHMEM_SYMMETRIC_SIZE "
                             "(set before init) above what the heaps need");
  }
  return reinterpret_cast<uintptr_t>(address);
}

void free_symmetric(uintptr_t address) {
  require_initialized("free");
  if (address == 0) throw std::invalid_argument("flashmoe._nvshmem.free: address is 0");
  nvshmem_free(reinterpret_cast<void*>(address));
}

uintptr_t peer_pointer(uintptr_t address, int pe) {
  require_initialized("ptr");
  if (pe < 0 || pe >= nvshmem_n_pes()) {
    throw std::invalid_argument("flashmoe._nvshmem.ptr: pe must be in [0, " + std::to_string(nvshmem_n_pes()) +
                                ") (got " + std::to_string(pe) + ")");
  }
  return reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<const void*>(address), pe));
}

void barrier_all() {
  require_initialized("barrier_all");
  nvshmem_barrier_all();
  FLASHMOE_CUDA_CHECK(cudaGetLastError());
}

void finalize() {
  require_initialized("finalize");
  nvshmem_finalize();
  initialized_by_us = false;
}

}  // namespace flashmoe::nvshmem
