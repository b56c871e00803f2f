// flashmoe._nvshmem: the NVSHMEM extension module, separate from _C so that `import flashmoe` and
// the single-GPU kernel never load libnvshmem_host. Loaded on first use by
// python/flashmoe/distributed/nvshmem.py, which broadcasts the unique id over torch.distributed.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "nvshmem/runtime.h"

namespace py = pybind11;
namespace fn = flashmoe::nvshmem;

namespace {

py::tuple as_tuple(const fn::Version& v) { return py::make_tuple(v.major, v.minor, v.patch); }

}  // namespace

PYBIND11_MODULE(_nvshmem, m) {
  m.doc() = "NVSHMEM bootstrap, symmetric memory and the device self-test (see flashmoe.distributed.nvshmem)";
  // pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError.
  m.attr("compiled_version_string") = FLASHMOE_NVSHMEM_VERSION_STRING;
  m.attr("unique_id_bytes") = fn::kUniqueIdBytes;
  m.def("compiled_version", [] { return as_tuple(fn::compiled_version()); },
        "The NVSHMEM headers this module was built against: (major, minor, patch).");
  m.def("runtime_version", [] { return as_tuple(fn::runtime_version()); },
        "The libnvshmem_host loaded in this process: (major, minor, patch).");
  m.def("compiled_cuda_major", &fn::compiled_cuda_major);
  m.def("get_unique_id", [] { return py::bytes(fn::get_unique_id()); },
        "A new NVSHMEM unique id (bytes); one rank makes it and broadcasts it.");
  m.def("init", [](py::bytes unique_id, int rank, int n_pes, int device) {
    fn::init(std::string(unique_id), rank, n_pes, device);
  }, py::arg("unique_id"), py::arg("rank"), py::arg("n_pes"), py::arg("device"),
     "NVSHMEMX_INIT_WITH_UNIQUEID over the processes sharing unique_id (collective).");
  m.def("initialized", &fn::initialized, "Whether this module initialised NVSHMEM and has not finalised it.");
  m.def("init_status", &fn::init_status, "nvshmemx_init_status(): 0 not initialised, 2 initialised, ...");
  m.def("my_pe", &fn::my_pe);
  m.def("n_pes", &fn::n_pes);
  m.def("malloc", &fn::malloc_symmetric, py::arg("bytes"), "nvshmem_malloc (collective); the address as an int.");
  m.def("free", &fn::free_symmetric, py::arg("address"), "nvshmem_free (collective).");
  m.def("ptr", &fn::peer_pointer, py::arg("address"), py::arg("pe"),
        "nvshmem_ptr: pe's copy of a symmetric address for load/store, 0 when not reachable.");
  m.def("barrier_all", &fn::barrier_all);
  m.def("finalize", &fn::finalize, "nvshmem_finalize (collective).");
  m.def("put_signal_selftest", [](size_t bytes, double timeout_seconds, uint32_t spins_per_check, bool put) {
    if (!(timeout_seconds > 0) || timeout_seconds > 3600) {
      throw std::invalid_argument("put_signal_selftest: timeout_seconds must be in (0, 3600]");
    }
    fn::SelftestResult result;
    {
      py::gil_scoped_release release;
      result = fn::put_signal_selftest(bytes, uint64_t(timeout_seconds * 1e9), spins_per_check, put);
    }
    py::dict out;
    out["target_pe"] = result.target_pe;
    out["source_pe"] = result.source_pe;
    out["signal_value"] = result.signal_value;
    out["mismatched_words"] = result.mismatched_words;
    return out;
  }, py::arg("bytes"), py::arg("timeout_seconds"), py::arg("spins_per_check") = 1024, py::arg("put") = true,
     "Device self-test: put-with-signal to the next PE, bounded wait for the previous PE's signal.");
}
