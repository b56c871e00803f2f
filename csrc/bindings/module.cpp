// flashmoe._C: thin pybind11 glue. It takes raw pointers, shapes and codes and links no libtorch,
// so one build serves every torch version. Python validates first; this layer checks again.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "core/capacity.h"
#include "core/heap_layout.h"
#include "core/signal_word.h"
#include "core/task.h"
#include "core/task_bound.h"
#include "core/problem.h"
#include "core/routing.h"
#include "cpu/dataflow.h"
#include "cpu/moe_forward.h"
#include "cpu/tile_gemm.h"
#include "cpu/transport_all_to_all.h"
#include "cpu/transport_shm.h"
#include "cuda/kernel_error.h"
#include "cuda/moe_cuda.h"

namespace py = pybind11;
using namespace flashmoe;

namespace {

template <typename P>
P* as_ptr(uintptr_t address) { return reinterpret_cast<P*>(address); }

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

// The shared expert's pointers agree with the problem: shared_w1 and shared_w2 iff shared_ffn > 0,
// shared_gate iff has_shared_gate.
void require_shared_expert(const Problem& problem, uintptr_t shared_w1, uintptr_t shared_w2, uintptr_t shared_gate) {
  require(problem.has_shared_expert() == (shared_w1 != 0) && problem.has_shared_expert() == (shared_w2 != 0),
          "flashmoe: shared_ffn disagrees with shared_w1/shared_w2 (both given iff shared_ffn > 0)");
  require(problem.has_shared_gate == (shared_gate != 0), "flashmoe: has_shared_gate disagrees with shared_gate");
}

void moe_forward_cpu(const Problem& problem, uintptr_t x, uintptr_t router_weight, uintptr_t router_bias,
                     uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t y, uintptr_t topk_ids,
                     uintptr_t topk_weights, uintptr_t expert_counts, uintptr_t router_logits, uintptr_t dropped,
                     int num_threads, uintptr_t selection_bias, uintptr_t shared_w1, uintptr_t shared_w2,
                     uintptr_t shared_gate) {
  if (const char* error = validate(problem)) throw py::value_error(std::string("flashmoe: ") + error);
  require(problem.has_selection_bias == (selection_bias != 0),
          "flashmoe: has_selection_bias disagrees with selection_bias");
  require_shared_expert(problem, shared_w1, shared_w2, shared_gate);
  require((router_weight || problem.routing_given) && w1 && w2 && expert_counts && dropped,
          "flashmoe: a required weight or output pointer is null");
  require(problem.tokens == 0 || (x && y && topk_ids && topk_weights && (router_logits || problem.routing_given)),
          "flashmoe: a required token tensor pointer is null");
  require(!problem.routing_given || (!router_weight && !router_bias && !router_logits),
          "flashmoe: with routing_given there is no router: router_weight, router_bias and router_logits must be 0");
  require(problem.has_router_bias == (router_bias != 0), "flashmoe: has_router_bias disagrees with router_bias");
  require(problem.has_b1 == (b1 != 0), "flashmoe: has_b1 disagrees with b1");
  require(problem.has_b2 == (b2 != 0), "flashmoe: has_b2 disagrees with b2");
  const cpu::ExpertWeights weights{as_ptr<const void>(router_weight), as_ptr<const void>(router_bias),
                                   as_ptr<const void>(w1), as_ptr<const void>(b1), as_ptr<const void>(w2),
                                   as_ptr<const void>(b2), 0, as_ptr<const void>(selection_bias),
                                   as_ptr<const void>(shared_w1), as_ptr<const void>(shared_w2),
                                   as_ptr<const void>(shared_gate)};
  const cpu::RankIO io{as_ptr<const void>(x), problem.tokens, problem.expert_capacity, as_ptr<void>(y),
                       as_ptr<int32_t>(topk_ids), as_ptr<void>(topk_weights), as_ptr<int32_t>(expert_counts),
                       as_ptr<void>(router_logits), as_ptr<int64_t>(dropped)};
  py::gil_scoped_release release;
  cpu::moe_forward(problem, weights, io, num_threads);
}

// (x, tokens, expert_capacity, y, topk_ids, topk_weights, expert_counts, router_logits, dropped)
using RankTuple = std::tuple<uintptr_t, int64_t, int64_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

std::vector<cpu::RankIO> rank_ios(const std::vector<RankTuple>& ranks) {
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
  return io;
}

// calls[c][r]: rank r's tensors in call c; every rank runs its calls back to back.
void cluster_forward(cpu::Cluster& cluster, uintptr_t router_weight, uintptr_t router_bias, uintptr_t w1,
                     uintptr_t b1, uintptr_t w2, uintptr_t b2, const std::vector<std::vector<RankTuple>>& calls,
                     int64_t first_expert, uintptr_t selection_bias, uintptr_t shared_w1, uintptr_t shared_w2,
                     uintptr_t shared_gate) {
  const Problem& shape = cluster.config().shape;
  require(shape.has_selection_bias == (selection_bias != 0), "flashmoe: has_selection_bias disagrees with selection_bias");
  require_shared_expert(shape, shared_w1, shared_w2, shared_gate);
  require(router_weight && w1 && w2, "flashmoe: a required weight pointer is null");
  require(shape.has_router_bias == (router_bias != 0), "flashmoe: has_router_bias disagrees with router_bias");
  require(shape.has_b1 == (b1 != 0) && shape.has_b2 == (b2 != 0), "flashmoe: has_b1/has_b2 disagree with b1/b2");
  require(!calls.empty(), "flashmoe: at least one call is required");
  std::vector<std::vector<cpu::RankIO>> io;
  for (const auto& call : calls) io.push_back(rank_ios(call));
  const cpu::ExpertWeights weights{as_ptr<const void>(router_weight), as_ptr<const void>(router_bias),
                                   as_ptr<const void>(w1), as_ptr<const void>(b1), as_ptr<const void>(w2),
                                   as_ptr<const void>(b2), first_expert, as_ptr<const void>(selection_bias),
                                   as_ptr<const void>(shared_w1), as_ptr<const void>(shared_w2),
                                   as_ptr<const void>(shared_gate)};
  require(first_expert == 0 || cluster.config().transport != nullptr,
          "flashmoe: first_expert != 0 (local experts only) needs a transport that runs one rank here");
  py::gil_scoped_release release;
  cluster.forward_calls(weights, io);
}

cpu::ExpertWeights expert_weights(const Problem& problem, uintptr_t router_weight, uintptr_t router_bias, uintptr_t w1,
                                  uintptr_t b1, uintptr_t w2, uintptr_t b2) {
  require(problem.has_router_bias == (router_bias != 0), "flashmoe: has_router_bias disagrees with router_bias");
  require(problem.has_b1 == (b1 != 0) && problem.has_b2 == (b2 != 0), "flashmoe: has_b1/has_b2 disagree with b1/b2");
  return cpu::ExpertWeights{as_ptr<const void>(router_weight), as_ptr<const void>(router_bias), as_ptr<const void>(w1),
                            as_ptr<const void>(b1), as_ptr<const void>(w2), as_ptr<const void>(b2)};
}

void route_tokens(const Problem& problem, uintptr_t x, uintptr_t router_weight, uintptr_t router_bias,
                  uintptr_t topk_ids, uintptr_t topk_weights, uintptr_t expert_counts, uintptr_t router_logits,
                  uintptr_t dropped, uintptr_t expert_offsets, uintptr_t pick_row, uintptr_t row_token, int threads,
                  uintptr_t selection_bias) {
  if (const char* error = validate(problem)) throw py::value_error(std::string("flashmoe: ") + error);
  require(problem.has_selection_bias == (selection_bias != 0),
          "flashmoe: has_selection_bias disagrees with selection_bias");
  require(router_weight && expert_counts && dropped && expert_offsets, "flashmoe: a required pointer is null");
  require(problem.tokens == 0 || (x && topk_ids && topk_weights && router_logits && pick_row && row_token),
          "flashmoe: a required token tensor pointer is null");
  require(problem.expert_capacity >= kDropless, "flashmoe: expert_capacity must be >= 0, or -1 for dropless");
  cpu::ExpertWeights weights = expert_weights(problem, router_weight, router_bias, 1, problem.has_b1, 1, problem.has_b2);
  weights.selection_bias = as_ptr<const void>(selection_bias);
  const cpu::RankIO io{as_ptr<const void>(x), problem.tokens, problem.expert_capacity, nullptr, as_ptr<int32_t>(topk_ids),
                       as_ptr<void>(topk_weights), as_ptr<int32_t>(expert_counts), as_ptr<void>(router_logits),
                       as_ptr<int64_t>(dropped)};
  py::gil_scoped_release release;
  cpu::route_tokens(problem, weights, io, as_ptr<int64_t>(expert_offsets), as_ptr<int32_t>(pick_row),
                    as_ptr<int32_t>(row_token), std::max(1, threads));
}

void run_expert_rows(const Problem& problem, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t rows,
                     const std::vector<int64_t>& cell_rows, int64_t local_experts, uintptr_t out, int threads) {
  if (const char* error = validate(problem)) throw py::value_error(std::string("flashmoe: ") + error);
  require(w1 && w2, "flashmoe: a required weight pointer is null");
  require(local_experts >= 1 && !cell_rows.empty() && int64_t(cell_rows.size()) % local_experts == 0,
          "flashmoe: cell_rows must hold W * local_experts counts");
  int64_t total = 0;
  for (int64_t count : cell_rows) {
    require(count >= 0, "flashmoe: cell_rows must be >= 0");
    total += count;
  }
  require(total == 0 || (rows && out), "flashmoe: rows and out pointers are required");
  const cpu::ExpertWeights weights = expert_weights(problem, 0, problem.has_router_bias, w1, b1, w2, b2);
  py::gil_scoped_release release;
  cpu::run_expert_rows(problem, weights, as_ptr<const void>(rows), cell_rows.data(), int64_t(cell_rows.size()),
                       local_experts, as_ptr<void>(out), std::max(1, threads));
}

void combine_tokens(const Problem& problem, int64_t tokens, uintptr_t pick_row, uintptr_t topk_weights,
                    uintptr_t rows_home, uintptr_t y, int threads, uintptr_t x, uintptr_t shared_rows,
                    uintptr_t shared_gate) {
  if (const char* error = validate(problem)) throw py::value_error(std::string("flashmoe: ") + error);
  require(tokens >= 0, "flashmoe: tokens must be >= 0");
  require(tokens == 0 || (pick_row && topk_weights && y), "flashmoe: a required token tensor pointer is null");
  require(tokens == 0 || problem.has_shared_expert() == (shared_rows != 0),
          "flashmoe: shared_ffn disagrees with shared_rows");
  require(problem.has_shared_gate == (shared_gate != 0), "flashmoe: has_shared_gate disagrees with shared_gate");
  require(!problem.has_shared_gate || tokens == 0 || x, "flashmoe: the shared gate needs x");
  py::gil_scoped_release release;
  cpu::combine_tokens(problem, tokens, as_ptr<const int32_t>(pick_row), as_ptr<const void>(topk_weights),
                      as_ptr<const void>(rows_home), as_ptr<void>(y), std::max(1, threads),
                      cpu::SharedRows{as_ptr<const void>(shared_rows), as_ptr<const void>(x),
                                      as_ptr<const void>(shared_gate)});
}

#if FLASHMOE_WITH_CUDA
// The device addresses of one call, by the names of moe_forward_cuda's arguments.
struct CudaAddresses {
  uintptr_t x = 0, router_weight = 0, router_bias = 0, w1 = 0, b1 = 0, w2 = 0, b2 = 0, y = 0, topk_ids = 0,
            topk_weights = 0, expert_counts = 0, router_logits = 0, dropped = 0, workspace = 0, selection_bias = 0,
            shared_w1 = 0, shared_w2 = 0, shared_gate = 0;
};

cuda::Pointers cuda_pointers(const Problem& problem, const CudaAddresses& a) {
  require_shared_expert(problem, a.shared_w1, a.shared_w2, a.shared_gate);
  cuda::Pointers pointers;
  pointers.selection_bias = as_ptr<const float>(a.selection_bias);
  pointers.shared_w1 = as_ptr<const void>(a.shared_w1);
  pointers.shared_w2 = as_ptr<const void>(a.shared_w2);
  pointers.shared_gate = as_ptr<const void>(a.shared_gate);
  pointers.x = as_ptr<const void>(a.x);
  pointers.router_weight = as_ptr<const void>(a.router_weight);
  pointers.router_bias = as_ptr<const void>(a.router_bias);
  pointers.w1 = as_ptr<const void>(a.w1);
  pointers.b1 = as_ptr<const void>(a.b1);
  pointers.w2 = as_ptr<const void>(a.w2);
  pointers.b2 = as_ptr<const void>(a.b2);
  pointers.y = as_ptr<void>(a.y);
  pointers.topk_ids = as_ptr<int32_t>(a.topk_ids);
  pointers.topk_weights = as_ptr<float>(a.topk_weights);
  pointers.expert_counts = as_ptr<int32_t>(a.expert_counts);
  pointers.router_logits = as_ptr<float>(a.router_logits);
  pointers.dropped = as_ptr<int64_t>(a.dropped);
  pointers.workspace = as_ptr<void>(a.workspace);
  return pointers;
}

// A loopback rank's addresses: a dict of moe_forward_cuda's address arguments (absent ones are 0).
CudaAddresses addresses_of(const py::dict& named, size_t rank) {
  CudaAddresses a;
  const std::pair<const char*, uintptr_t*> fields[] = {
      {"x", &a.x}, {"router_weight", &a.router_weight}, {"router_bias", &a.router_bias}, {"w1", &a.w1},
      {"b1", &a.b1}, {"w2", &a.w2}, {"b2", &a.b2}, {"y", &a.y}, {"topk_ids", &a.topk_ids},
      {"topk_weights", &a.topk_weights}, {"expert_counts", &a.expert_counts}, {"router_logits", &a.router_logits},
      {"dropped", &a.dropped}, {"workspace", &a.workspace}, {"selection_bias", &a.selection_bias},
      {"shared_w1", &a.shared_w1}, {"shared_w2", &a.shared_w2}, {"shared_gate", &a.shared_gate}};
  for (const auto& item : named) {
    const std::string key = py::str(item.first);
    uintptr_t* field = nullptr;
    for (const auto& [name, target] : fields) {
      if (key == name) field = target;
    }
    require(field != nullptr, "flashmoe: pointers[" + std::to_string(rank) + "] has an unknown key '" + key + "'");
    *field = item.second.cast<uintptr_t>();
  }
  return a;
}

cuda::Fp32Math fp32_math(bool allow_tf32) { return allow_tf32 ? cuda::Fp32Math::tf32 : cuda::Fp32Math::exact; }

// std::invalid_argument (a bad argument) becomes ValueError; std::runtime_error (CUDA) stays RuntimeError.
template <typename F>
auto value_errors(F&& call) {
  try {
    return call();
  } catch (const std::invalid_argument& error) {
    throw py::value_error(error.what());
  }
}

void moe_forward_cuda(const Problem& problem, uintptr_t x, uintptr_t router_weight, uintptr_t router_bias,
                      uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t y, uintptr_t topk_ids,
                      uintptr_t topk_weights, uintptr_t expert_counts, uintptr_t router_logits, uintptr_t dropped,
                      uintptr_t workspace, int64_t workspace_bytes, bool allow_tf32, int device, uintptr_t stream,
                      uintptr_t selection_bias, uintptr_t shared_w1, uintptr_t shared_w2, uintptr_t shared_gate) {
  const cuda::Pointers pointers = cuda_pointers(
      problem, CudaAddresses{x, router_weight, router_bias, w1, b1, w2, b2, y, topk_ids, topk_weights, expert_counts,
                             router_logits, dropped, workspace, selection_bias, shared_w1, shared_w2, shared_gate});
  value_errors([&] { cuda::moe_forward(problem, pointers, workspace_bytes, fp32_math(allow_tf32), device, stream); });
}

void moe_forward_cuda_ep(const Problem& problem, uintptr_t x, uintptr_t router_weight, uintptr_t router_bias,
                         uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t y, uintptr_t topk_ids,
                         uintptr_t topk_weights, uintptr_t expert_counts, uintptr_t router_logits, uintptr_t dropped,
                         uintptr_t workspace, int64_t workspace_bytes, bool allow_tf32, int device, uintptr_t stream,
                         uintptr_t selection_bias, uintptr_t shared_w1, uintptr_t shared_w2, uintptr_t shared_gate,
                         const std::vector<uintptr_t>& heaps, int32_t rank, int32_t world, int64_t max_tokens,
                         uintptr_t epoch, uintptr_t status, double peer_timeout_s) {
  const cuda::Pointers pointers = cuda_pointers(
      problem, CudaAddresses{x, router_weight, router_bias, w1, b1, w2, b2, y, topk_ids, topk_weights, expert_counts,
                             router_logits, dropped, workspace, selection_bias, shared_w1, shared_w2, shared_gate});
  cuda::RankTable table{rank, world, heaps, as_ptr<uint32_t>(epoch), as_ptr<uint32_t>(status), peer_timeout_s,
                        max_tokens};
  value_errors([&] {
    cuda::moe_forward_ep(problem, pointers, table, workspace_bytes, fp32_math(allow_tf32), device, stream);
  });
}

void moe_forward_cuda_loopback(const std::vector<Problem>& problems, const std::vector<py::dict>& pointers,
                               const std::vector<int64_t>& workspace_bytes, const std::vector<uintptr_t>& heaps,
                               const std::vector<uintptr_t>& epochs, const std::vector<uintptr_t>& statuses,
                               int64_t max_tokens, double peer_timeout_s, bool allow_tf32, int device,
                               uintptr_t stream) {
  const size_t world = problems.size();
  require(pointers.size() == world && workspace_bytes.size() == world && heaps.size() == world &&
              epochs.size() == world && statuses.size() == world,
          "flashmoe: problems, pointers, workspace_bytes, heaps, epochs and statuses must each hold one entry per "
          "virtual rank (" + std::to_string(world) + ")");
  std::vector<cuda::Pointers> rank_pointers;
  std::vector<cuda::RankTable> tables;
  for (size_t r = 0; r < world; ++r) {
    rank_pointers.push_back(cuda_pointers(problems[r], addresses_of(pointers[r], r)));
    tables.push_back(cuda::RankTable{int32_t(r), int32_t(world), heaps, as_ptr<uint32_t>(epochs[r]),
                                     as_ptr<uint32_t>(statuses[r]), peer_timeout_s, max_tokens});
  }
  value_errors([&] {
    cuda::moe_forward_loopback(problems, rank_pointers, tables, workspace_bytes, fp32_math(allow_tf32), device,
                               stream);
  });
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashmoe native backends (torch-free; tensors travel as raw pointers)";

  py::enum_<DType>(m, "DType")
      .value("f32", DType::f32).value("bf16", DType::bf16).value("f16", DType::f16).value("f64", DType::f64);
  py::enum_<Activation>(m, "Activation")
      .value("silu", Activation::silu).value("gelu", Activation::gelu)
      .value("gelu_tanh", Activation::gelu_tanh).value("relu", Activation::relu).value("relu2", Activation::relu2)
      .value("swiglu_clamp", Activation::swiglu_clamp).value("swiglu_clamp_post", Activation::swiglu_clamp_post)
      .value("swiglu_oai", Activation::swiglu_oai);
  py::enum_<Scoring>(m, "Scoring")
      .value("softmax", Scoring::softmax).value("sigmoid", Scoring::sigmoid)
      .value("softmax_topk", Scoring::softmax_topk);

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
      .def_readwrite("routing_given", &Problem::routing_given)
      .def_readwrite("swiglu_limit", &Problem::swiglu_limit)
      .def_readwrite("swiglu_alpha", &Problem::swiglu_alpha)
      .def_readwrite("has_selection_bias", &Problem::has_selection_bias)
      .def_readwrite("num_groups", &Problem::num_groups)
      .def_readwrite("topk_groups", &Problem::topk_groups)
      .def_readwrite("routed_scaling_factor", &Problem::routed_scaling_factor)
      .def_readwrite("weight_on_input", &Problem::weight_on_input)
      .def_readwrite("router_f32", &Problem::router_f32)
      .def_readwrite("shared_ffn", &Problem::shared_ffn)
      .def_readwrite("has_shared_gate", &Problem::has_shared_gate)
      .def("gemm0_cols", &Problem::gemm0_cols<int64_t>)
      .def("validate", [](const Problem& p) {
        const char* error = validate(p);
        return error ? py::object(py::str(error)) : py::object(py::none());
      });

  m.def("moe_forward_cpu", &moe_forward_cpu, py::kw_only(), py::arg("problem"), py::arg("x"),
        py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("y"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("expert_counts"),
        py::arg("router_logits"), py::arg("dropped"), py::arg("num_threads"), py::arg("selection_bias") = 0,
        py::arg("shared_w1") = 0, py::arg("shared_w2") = 0, py::arg("shared_gate") = 0,
        "Runs the CPU MoE forward on contiguous buffers. See csrc/cpu/moe_forward.h for layouts.");

  py::enum_<cpu::Fault>(m, "Fault")
      .value("none", cpu::Fault::none)
      .value("skip_empty_dispatch_signal", cpu::Fault::skip_empty_dispatch_signal)
      .value("stale_epoch", cpu::Fault::stale_epoch)
      .value("slow_gate", cpu::Fault::slow_gate)
      .value("stuck_gate", cpu::Fault::stuck_gate);

  py::class_<cpu::Cluster>(m, "Cluster",
                           "W simulated ranks running the dataflow protocol over simulated symmetric heaps.")
      .def(py::init([](const Problem& shape, int64_t world_size, int64_t max_tokens, int threads_per_rank,
                       bool chaos, uint64_t chaos_seed, cpu::Fault fault, double watchdog_seconds,
                       std::shared_ptr<cpu::SharedMemoryHeaps> transport) {
             cpu::ClusterConfig config;
             config.shape = shape;
             config.world_size = world_size;
             config.max_tokens = max_tokens;
             config.threads_per_rank = threads_per_rank;
             config.chaos = cpu::ChaosOptions{chaos, chaos_seed, fault};
             config.watchdog_seconds = watchdog_seconds;
             config.transport = transport;
             try {
               return std::make_unique<cpu::Cluster>(config);
             } catch (const std::invalid_argument& error) {
               throw py::value_error(std::string("flashmoe: ") + error.what());
             }
           }),
           py::kw_only(), py::arg("shape"), py::arg("world_size"), py::arg("max_tokens"), py::arg("threads_per_rank") = 1,
           py::arg("chaos") = false, py::arg("chaos_seed") = 0, py::arg("fault") = cpu::Fault::none,
           py::arg("watchdog_seconds") = 60.0, py::arg("transport") = nullptr)
      .def("forward", &cluster_forward, py::kw_only(), py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"),
           py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("calls"), py::arg("first_expert") = 0,
           py::arg("selection_bias") = 0, py::arg("shared_w1") = 0, py::arg("shared_w2") = 0, py::arg("shared_gate") = 0,
           "shared_w1/shared_w2/shared_gate: the shared expert, replicated (every rank runs it on its own tokens). "
           "calls: per call, one (x, tokens, expert_capacity, y, topk_ids, topk_weights, expert_counts, "
           "router_logits, dropped) tuple of addresses per rank running here. Ranks run their calls back to back. "
           "first_expert: the expert w1[0] holds (a transport's rank q passes its local experts, q*L).")
      .def_property_readonly("heap_bytes", &cpu::Cluster::heap_bytes)
      .def("epoch", &cpu::Cluster::epoch, py::arg("rank"));

  py::class_<cpu::SharedMemoryHeaps, std::shared_ptr<cpu::SharedMemoryHeaps>>(
      m, "SharedMemoryHeaps", "One POSIX shared-memory segment per rank: the symmetric heaps of ranks on one host.")
      .def(py::init([](int64_t world_size, int64_t local_rank, int64_t heap_bytes, const std::string& name) {
             try {
               return std::make_shared<cpu::SharedMemoryHeaps>(world_size, local_rank, heap_bytes, name);
             } catch (const std::invalid_argument& error) {
               throw py::value_error(error.what());
             }
           }),
           py::kw_only(), py::arg("world_size"), py::arg("local_rank"), py::arg("heap_bytes"), py::arg("name"))
      .def("map_peer", &cpu::SharedMemoryHeaps::map_peer, py::arg("rank"), py::arg("name"))
      .def("unlink_own", &cpu::SharedMemoryHeaps::unlink_own)
      .def("all_mapped", &cpu::SharedMemoryHeaps::all_mapped)
      .def("control_address", [](const cpu::SharedMemoryHeaps& heaps, int64_t rank) {
        return reinterpret_cast<uintptr_t>(heaps.control(rank));
      }, py::arg("rank"))
      .def_property_readonly("heap_bytes", &cpu::SharedMemoryHeaps::heap_bytes)
      .def_readonly_static("control_bytes", &cpu::SharedMemoryHeaps::kControlBytes);

  m.def("route_tokens", &route_tokens, py::kw_only(), py::arg("problem"), py::arg("x"), py::arg("router_weight"),
        py::arg("router_bias"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("expert_counts"),
        py::arg("router_logits"), py::arg("dropped"), py::arg("expert_offsets"), py::arg("pick_row"),
        py::arg("row_token"), py::arg("threads"), py::arg("selection_bias") = 0,
        "all_to_all source step: gate problem.tokens tokens and assign slots (cpu/transport_all_to_all.h).");
  m.def("run_expert_rows", &run_expert_rows, py::kw_only(), py::arg("problem"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("rows"), py::arg("cell_rows"), py::arg("local_experts"), py::arg("out"),
        py::arg("threads"), "all_to_all owner step: the local experts' FFN of every received row, cell by cell.");
  m.def("combine_tokens", &combine_tokens, py::kw_only(), py::arg("problem"), py::arg("tokens"), py::arg("pick_row"),
        py::arg("topk_weights"), py::arg("rows_home"), py::arg("y"), py::arg("threads"), py::arg("x") = 0,
        py::arg("shared_rows") = 0, py::arg("shared_gate") = 0,
        "all_to_all source step: y from the rows that came home, in the contract's order, then the shared "
        "expert's rows (shared_rows [T, H], weighted by sigma(x . shared_gate) when given).");

  m.def("expert_capacity", [](double capacity_factor, int64_t tokens, int64_t top_k, int64_t experts) {
    if (!std::isfinite(capacity_factor) || capacity_factor <= 0)
      throw py::value_error("capacity_factor must be finite and > 0");
    if (tokens < 0 || top_k < 1 || experts < 1) throw py::value_error("tokens >= 0, top_k >= 1, experts >= 1 required");
    return expert_capacity(capacity_factor, tokens, top_k, experts);
  }, py::arg("capacity_factor"), py::arg("tokens"), py::arg("top_k"), py::arg("experts"));

  // csrc/core protocol arithmetic, exposed so the host tests exercise the one definition.
  py::class_<SignalWord>(m, "SignalWord")
      .def_static("make", &SignalWord::make, py::arg("epoch"), py::arg("rows"), py::arg("first_row"))
      .def_static("next_epoch", &SignalWord::next_epoch, py::arg("epoch"))
      .def_static("previous_epoch", &SignalWord::previous_epoch, py::arg("epoch"))
      .def_readonly_static("max_rows", &SignalWord::kMaxRows)
      .def_readonly_static("epochs", &SignalWord::kEpochs)
      .def_readonly("bits", &SignalWord::bits)
      .def_property_readonly("epoch", &SignalWord::epoch)
      .def_property_readonly("rows", &SignalWord::rows)
      .def_property_readonly("first_row", &SignalWord::first_row);

  py::class_<ExpertPlacement>(m, "ExpertPlacement")
      .def(py::init([](int64_t world_size, int64_t experts) {
             ExpertPlacement placement{world_size, experts};
             if (const char* error = validate(placement)) throw py::value_error(error);
             return placement;
           }), py::arg("world_size"), py::arg("experts"))
      .def("local_experts", &ExpertPlacement::local_experts)
      .def("owner", &ExpertPlacement::owner, py::arg("expert"))
      .def("local_index", &ExpertPlacement::local_index, py::arg("expert"))
      .def("global_expert", &ExpertPlacement::global_expert, py::arg("rank"), py::arg("local_expert"))
      .def("max_picks_per_owner", &ExpertPlacement::max_picks_per_owner, py::arg("top_k"));

  py::class_<HeapLayout>(m, "HeapLayout")
      .def(py::init([](const ExpertPlacement& placement, int64_t max_tokens, int64_t top_k, int64_t hidden,
                       int64_t element_size) {
             const HeapLayout layout{placement, max_tokens, top_k, hidden, element_size};
             layout.check();
             return layout;
           }),
           py::arg("placement"), py::arg("max_tokens"), py::arg("top_k"), py::arg("hidden"), py::arg("element_size"))
      .def_readonly_static("alignment", &HeapLayout::kAlignment)
      .def("region_rows", &HeapLayout::region_rows<int64_t>)
      .def("row_bytes", &HeapLayout::row_bytes<int64_t>)
      .def("flags_bytes", &HeapLayout::flags_bytes<int64_t>)
      .def("dispatch_flag", &HeapLayout::dispatch_flag, py::arg("source"), py::arg("local_expert"))
      .def("return_flag", &HeapLayout::return_flag, py::arg("owner"), py::arg("local_expert"))
      .def("dispatch_row", &HeapLayout::dispatch_row, py::arg("source"), py::arg("row"))
      .def("return_row", &HeapLayout::return_row, py::arg("owner"), py::arg("row"))
      .def("total_bytes", &HeapLayout::total_bytes<int64_t>);

  py::class_<Tiling>(m, "Tiling")
      .def(py::init<>())
      .def_readonly("row_tile", &Tiling::row_tile)
      .def_readonly("ffn_tile", &Tiling::ffn_tile)
      .def_readonly("hidden_tile", &Tiling::hidden_tile)
      .def_readonly("token_tile", &Tiling::token_tile)
      .def("row_tiles", &Tiling::row_tiles<int64_t>, py::arg("rows"))
      .def("cell_tasks", &Tiling::cell_tasks<int64_t>, py::arg("rows"), py::arg("ffn"), py::arg("hidden"));

  py::class_<TaskBound>(m, "TaskBound")
      .def(py::init([](const ExpertPlacement& placement, int64_t max_cell_rows, int64_t ffn, int64_t hidden) {
             const TaskBound bound{Tiling{}, placement, max_cell_rows, ffn, hidden};
             bound.check();
             return bound;
           }), py::arg("placement"), py::arg("max_cell_rows"), py::arg("ffn"), py::arg("hidden"))
      .def("initial", &TaskBound::initial<int64_t>, py::arg("own_tokens"))
      .def("correction", &TaskBound::correction, py::arg("rows"))
      .def("cell_tasks", &TaskBound::cell_tasks<int64_t>, py::arg("rows"))
      .def("combine_tasks", &TaskBound::combine_tasks<int64_t>, py::arg("own_tokens"));

  m.attr("task_bytes") = py::int_(sizeof(Task));
  m.attr("task_alignment") = py::int_(alignof(Task));

  m.def("assign_slots", [](const std::vector<int32_t>& topk_ids, int64_t tokens, int64_t top_k, int64_t experts,
                           int64_t capacity) {
    require(int64_t(topk_ids.size()) == tokens * top_k, "topk_ids must hold tokens * top_k ids");
    require(capacity >= kDropless, "capacity must be >= 0, or -1 for dropless");
    std::vector<int32_t> counts(static_cast<size_t>(experts)), pick_row(topk_ids.size()), row_token(topk_ids.size());
    std::vector<int64_t> offsets(static_cast<size_t>(experts + 1));
    const int64_t dropped = assign_slots(topk_ids.data(), tokens, top_k, experts, capacity,
                                         SlotAssignment{counts.data(), offsets.data(), pick_row.data(), row_token.data()});
    row_token.resize(size_t(offsets.back()));
    return py::make_tuple(counts, offsets, pick_row, row_token, dropped);
  }, py::arg("topk_ids"), py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("capacity"),
     "Token-order slot assignment: (expert_counts, expert_offsets, pick_row, row_token, dropped). A pick that goes "
     "to no expert (an id outside [0, experts), or a repeat in its row) gets pick_row -1.");

  // The gate's top-k (csrc/core/routing.h) on one token's scores, in fp32 and fp64 as the kernels run it.
  m.def("select_top_k", [](const std::vector<double>& scores, int64_t top_k, bool normalize, bool fp64) {
    const int64_t experts = int64_t(scores.size());
    require(experts >= 1 && top_k >= 1 && top_k <= experts, "select_top_k: top_k must be in [1, len(scores)]");
    std::vector<int32_t> ids(size_t(top_k), -1);
    std::vector<double> weights(static_cast<size_t>(top_k));
    if (fp64) {
      select_top_k(scores.data(), experts, top_k, normalize, ids.data(), weights.data());
    } else {
      std::vector<float> scores32(scores.begin(), scores.end()), weights32(static_cast<size_t>(top_k));
      select_top_k(scores32.data(), experts, top_k, normalize, ids.data(), weights32.data());
      weights.assign(weights32.begin(), weights32.end());
    }
    return py::make_tuple(ids, weights);
  }, py::arg("scores"), py::arg("top_k"), py::arg("normalize"), py::arg("fp64"),
     "The native top-k of one token's scores: (ids in pick order, weights).");

  m.def("empty_cache", &cpu::empty_cache,
        "Frees the CPU backend's cached single-rank clusters (heaps kept between calls); returns bytes freed.");

  // The NVSHMEM version flashmoe._nvshmem was built with (cmake/FlashmoeNvshmem.cmake), read
  // without loading that module or libnvshmem_host.
#ifdef FLASHMOE_NVSHMEM_VERSION_STRING
  m.attr("nvshmem_version") = FLASHMOE_NVSHMEM_VERSION_STRING;
#else
  m.attr("nvshmem_version") = py::none();
#endif
#if FLASHMOE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_build_info", [] {
    const cuda::BuildInfo info = cuda::build_info();
    py::dict out;
    out["archs"] = info.archs;
    out["cuda_version"] = info.cuda_version;
    out["cutlass_version"] = info.cutlass_version;
    return out;
  }, "What the CUDA backend was compiled with: archs, CUDA and CUTLASS versions.");
  m.def("cuda_workspace_bytes", [](const Problem& problem, int device, bool allow_tf32) {
    return value_errors([&] { return cuda::workspace_bytes(problem, device, fp32_math(allow_tf32)); });
  }, py::arg("problem"), py::arg("device"), py::arg("allow_tf32"),
     "Bytes of workspace one CUDA call of `problem` needs on `device` (host-only, no sync).");
  m.def("moe_forward_cuda", &moe_forward_cuda, py::kw_only(), py::arg("problem"), py::arg("x"),
        py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("y"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("expert_counts"),
        py::arg("router_logits"), py::arg("dropped"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("allow_tf32"), py::arg("device"), py::arg("stream"), py::arg("selection_bias") = 0,
        py::arg("shared_w1") = 0, py::arg("shared_w2") = 0, py::arg("shared_gate") = 0,
        "Enqueues the persistent MoE kernel on `stream` (cudaStream_t as int). Pointers are device addresses.");
  m.def("cuda_ep_heap_bytes", [](const Problem& problem, int64_t world, int64_t max_tokens) {
    return value_errors([&] { return cuda::ep_heap_bytes(problem, world, max_tokens); });
  }, py::arg("problem"), py::arg("world"), py::arg("max_tokens"),
     "Bytes of one rank's heap in a world of `world` ranks (allocate once, zero its flags once, keep it).");
  m.def("cuda_ep_workspace_bytes", [](const Problem& problem, int64_t world, int64_t max_tokens, int device,
                                      bool allow_tf32) {
    return value_errors([&] { return cuda::ep_workspace_bytes(problem, world, max_tokens, device, fp32_math(allow_tf32)); });
  }, py::arg("problem"), py::arg("world"), py::arg("max_tokens"), py::arg("device"), py::arg("allow_tf32"),
     "Bytes of workspace one rank's call needs (per call, any contents); bounds a loopback rank's too.");
  m.def("moe_forward_cuda_ep", &moe_forward_cuda_ep, py::kw_only(), py::arg("problem"), py::arg("x"),
        py::arg("router_weight"), py::arg("router_bias"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::arg("y"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("expert_counts"),
        py::arg("router_logits"), py::arg("dropped"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("allow_tf32"), py::arg("device"), py::arg("stream"), py::arg("selection_bias") = 0,
        py::arg("shared_w1") = 0, py::arg("shared_w2") = 0, py::arg("shared_gate") = 0, py::arg("heaps"),
        py::arg("rank"), py::arg("world"), py::arg("max_tokens"), py::arg("epoch"), py::arg("status"),
        py::arg("peer_timeout_s"),
        "This rank's part of an expert-parallel forward on `stream`: w1/b1/w2/b2 are its E/world local experts, "
        "heaps[r] rank r's heap as this GPU reaches it, epoch (1 word, kept) and status (4 words, zeroed once: "
        "sticky) device addresses. A rank without tokens launches too.");
  m.def("moe_forward_cuda_loopback", &moe_forward_cuda_loopback, py::kw_only(), py::arg("problems"),
        py::arg("pointers"), py::arg("workspace_bytes"), py::arg("heaps"), py::arg("epochs"), py::arg("statuses"),
        py::arg("max_tokens"), py::arg("peer_timeout_s"), py::arg("allow_tf32"), py::arg("device"), py::arg("stream"),
        "W virtual ranks on one GPU in one cooperative launch (a test and benchmark vehicle). Entry r of each list "
        "is rank r's: its problem, a dict of moe_forward_cuda's address arguments (x, ..., workspace; absent: 0), "
        "its workspace bytes, heap, epoch word and status words.");
  m.attr("cuda_max_loopback_world") = py::int_(cuda::kMaxLoopbackWorld);
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("describe_kernel_error", [](const std::vector<uint32_t>& status, int64_t rank, double timeout_s) {
    require(status.size() == size_t(cuda::kStatusWords),
            "flashmoe: status must hold " + std::to_string(cuda::kStatusWords) + " words, got " +
                std::to_string(status.size()));
    return cuda::describe_kernel_error(status.data(), rank, timeout_s);
  }, py::arg("status"), py::arg("rank"), py::arg("timeout_s"),
     "The RuntimeError text of a rank's kernel status words ('' when status[0] == 0).");
  m.attr("kernel_status_words") = py::int_(cuda::kStatusWords);

  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); },
        "The instruction set the CPU tile GEMM uses in this process.");
}
