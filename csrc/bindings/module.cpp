// flashmoe._C: thin pybind11 glue. It takes raw pointers, shapes and codes and links no libtorch,
// so one build serves every torch version. Python validates first; this layer checks again.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "core/capacity.h"
#include "core/problem.h"
#include "cpu/dataflow.h"
#include "cpu/moe_forward.h"
#include "cpu/tile_gemm.h"

namespace py = pybind11;
using namespace flashmoe;

namespace {

template <typename P>
P* as_ptr(uintptr_t address) { return reinterpret_cast<P*>(address); }

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void moe_forward_cpu(const Problem& problem, uintptr_t x, uintptr_t router_weight, uintptr_t router_bias,
                     uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t y, uintptr_t topk_ids,
                     uintptr_t topk_weights, uintptr_t expert_counts, uintptr_t router_logits, uintptr_t dropped,
                     int num_threads) {
  if (const char* error = validate(problem)) throw py::value_error(std::string("flashmoe: ") + error);
  require(router_weight && w1 && w2 && expert_counts && dropped, "flashmoe: a required weight or output pointer is null");
  require(problem.tokens == 0 || (x && y && topk_ids && topk_weights && router_logits),
          "flashmoe: a required token tensor pointer is null");
  require(problem.has_router_bias == (router_bias != 0), "flashmoe: has_router_bias disagrees with router_bias");
  require(problem.has_b1 == (b1 != 0), "flashmoe: has_b1 disagrees with b1");
  require(problem.has_b2 == (b2 != 0), "flashmoe: has_b2 disagrees with b2");
  const cpu::MoETensors tensors{as_ptr<const void>(x),  as_ptr<const void>(router_weight), as_ptr<const void>(router_bias),
                                as_ptr<const void>(w1), as_ptr<const void>(b1),            as_ptr<const void>(w2),
                                as_ptr<const void>(b2), as_ptr<void>(y),                   as_ptr<int32_t>(topk_ids),
                                as_ptr<void>(topk_weights), as_ptr<int32_t>(expert_counts), as_ptr<void>(router_logits),
                                as_ptr<int64_t>(dropped)};
  py::gil_scoped_release release;
  cpu::moe_forward(problem, tensors, num_threads);
}

// (x, tokens, expert_capacity, y, topk_ids, topk_weights, expert_counts, router_logits, dropped)
using RankTuple = std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

void cluster_forward(cpu::Cluster& cluster, uintptr_t router_weight, uintptr_t router_bias, uintptr_t w1,
                     uintptr_t b1, uintptr_t w2, uintptr_t b2, const std::vector<RankTuple>& ranks, int64_t repeats) {
  const Problem& shape = cluster.config().shape;
  require(router_weight && w1 && w2, "flashmoe: a required weight pointer is null");
  require(shape.has_router_bias == (router_bias != 0), "flashmoe: has_router_bias disagrees with router_bias");
  require(shape.has_b1 == (b1 != 0) && shape.has_b2 == (b2 != 0), "flashmoe: has_b1/has_b2 disagree with b1/b2");
  require(repeats >= 1, "flashmoe: repeats must be >= 1");
  std::vector<cpu::RankIO> io;
  for (const RankTuple& r : ranks) {
    const int64_t tokens = std::get<1>(r);
    require(std::get<6>(r) && std::get<8>(r), "flashmoe: expert_counts and dropped pointers are required");
    require(tokens == 0 || (std::get<0>(r) && std::get<3>(r) && std::get<4>(r) && std::get<5>(r) && std::get<7>(r)),
            "flashmoe: a required token tensor pointer is null");
    require(std::get<2>(r) >= kDropless, "flashmoe: expert_capacity must be >= 0, or -1 for dropless");
    io.push_back(cpu::RankIO{as_ptr<const void>(std::get<0>(r)), tokens, std::get<2>(r), as_ptr<void>(std::get<3>(r)),
                             as_ptr<int32_t>(std::get<4>(r)), as_ptr<void>(std::get<5>(r)), as_ptr<int32_t>(std::get<6>(r)),
                             as_ptr<void>(std::get<7>(r)), as_ptr<int64_t>(std::get<8>(r))});
  }
  const cpu::ExpertWeights weights{as_ptr<const void>(router_weight), as_ptr<const void>(router_bias),
                                   as_ptr<const void>(w1), as_ptr<const void>(b1), as_ptr<const void>(w2),
                                   as_ptr<const void>(b2)};
  py::gil_scoped_release release;
  cluster.forward(weights, io, repeats);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashmoe native backends (torch-free; tensors travel as raw pointers)";

  py::enum_<DType>(m, "DType")
      .value("f32", DType::f32).value("bf16", DType::bf16).value("f16", DType::f16).value("f64", DType::f64);
  py::enum_<Activation>(m, "Activation")
      .value("silu", Activation::silu).value("gelu", Activation::gelu)
      .value("gelu_tanh", Activation::gelu_tanh).value("relu", Activation::relu);
  py::enum_<Scoring>(m, "Scoring").value("softmax", Scoring::softmax).value("sigmoid", Scoring::sigmoid);

  py::class_<Problem>(m, "Problem")
      .def(py::init<>())
      .def_readwrite("tokens", &Problem::tokens)
      .def_readwrite("hidden", &Problem::hidden)
      .def_readwrite("ffn", &Problem::ffn)
      .def_readwrite("experts", &Problem::experts)
      .def_readwrite("top_k", &Problem::top_k)
      .def_readwrite("gated", &Problem::gated)
      .def_readwrite("activation", &Problem::activation)
      .def_readwrite("scoring", &Problem::scoring)
      .def_readwrite("normalize", &Problem::normalize)
      .def_readwrite("expert_capacity", &Problem::expert_capacity)
      .def_readwrite("dtype", &Problem::dtype)
      .def_readwrite("has_router_bias", &Problem::has_router_bias)
      .def_readwrite("has_b1", &Problem::has_b1)
      .def_readwrite("has_b2", &Problem::has_b2)
      .def("gemm0_cols", &Problem::gemm0_cols)
      .def("validate", [](const Problem& p) {
        const char* error = validate(p);
        return error ? py::object(py::str(error)) : py::object(py::none());
      });

  m.def("moe_forward_cpu", &moe_forward_cpu, py::kw_only(), py::arg("problem"), py::arg("x"),
        py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("y"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("expert_counts"),
        py::arg("router_logits"), py::arg("dropped"), py::arg("num_threads"),
        "Runs the CPU MoE forward on contiguous buffers. See csrc/cpu/moe_forward.h for layouts.");

  py::enum_<cpu::Fault>(m, "Fault")
      .value("none", cpu::Fault::none)
      .value("skip_empty_dispatch_signal", cpu::Fault::skip_empty_dispatch_signal)
      .value("stale_epoch", cpu::Fault::stale_epoch);

  py::class_<cpu::Cluster>(m, "Cluster",
                           "W simulated ranks running the dataflow protocol over simulated symmetric heaps.")
      .def(py::init([](const Problem& shape, int64_t world_size, int64_t max_tokens, int threads_per_rank,
                       bool chaos, uint64_t chaos_seed, cpu::Fault fault, double watchdog_seconds) {
             cpu::ClusterConfig config;
             config.shape = shape;
             config.world_size = world_size;
             config.max_tokens = max_tokens;
             config.threads_per_rank = threads_per_rank;
             config.chaos = cpu::ChaosOptions{chaos, chaos_seed, fault};
             config.watchdog_seconds = watchdog_seconds;
             return std::make_unique<cpu::Cluster>(config);
           }),
           py::kw_only(), py::arg("shape"), py::arg("world_size"), py::arg("max_tokens"), py::arg("threads_per_rank") = 1,
           py::arg("chaos") = false, py::arg("chaos_seed") = 0, py::arg("fault") = cpu::Fault::none,
           py::arg("watchdog_seconds") = 60.0)
      .def("forward", &cluster_forward, py::kw_only(), py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"),
           py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("ranks"), py::arg("repeats") = 1,
           "ranks: one (x, tokens, expert_capacity, y, topk_ids, topk_weights, expert_counts, router_logits, "
           "dropped) tuple of addresses per rank.")
      .def_property_readonly("heap_bytes", &cpu::Cluster::heap_bytes)
      .def("epoch", &cpu::Cluster::epoch, py::arg("rank"));

  m.def("expert_capacity", [](double capacity_factor, int64_t tokens, int64_t top_k, int64_t experts) {
    if (!std::isfinite(capacity_factor) || capacity_factor <= 0)
      throw py::value_error("capacity_factor must be finite and > 0");
    if (tokens < 0 || top_k < 1 || experts < 1) throw py::value_error("tokens >= 0, top_k >= 1, experts >= 1 required");
    return expert_capacity(capacity_factor, tokens, top_k, experts);
  }, py::arg("capacity_factor"), py::arg("tokens"), py::arg("top_k"), py::arg("experts"));

  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); },
        "The instruction set the CPU tile GEMM uses in this process.");
}
