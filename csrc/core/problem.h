// The problem descriptor: every runtime shape and option of one MoE forward call.
// Python validates once with friendly messages; validate() here is the second line of defence
// so that no kernel ever sees an unchecked shape.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/checked.h"
#include "core/dtype.h"

namespace flashmoe {

// Codes travel through the pybind11 boundary; python/flashmoe/ops.py maps names to them
// through the pybind11 enums, so there is nothing to keep in sync by hand.
// relu2 is relu(v)²; the clamped SwiGLUs combine the gate and up halves themselves (gated only).
enum class Activation : int32_t {
  silu = 0,
  gelu = 1,
  gelu_tanh = 2,
  relu = 3,
  relu2 = 4,
  swiglu_clamp = 5,       // silu(min(g, L)) · clamp(u, -L, L)
  swiglu_clamp_post = 6,  // min(silu(g), L) · clamp(u, -L, L)
  swiglu_oai = 7,         // (clamp(u, -L, L) + 1) · g'·σ(α·g'),  g' = min(g, L)
};
constexpr int32_t kLastActivation = 7;

FLASHMOE_HD constexpr bool combines_gate_and_up(Activation activation) {
  return activation == Activation::swiglu_clamp || activation == Activation::swiglu_clamp_post ||
         activation == Activation::swiglu_oai;
}
// softmax_topk (GPT-OSS): the top-k of the raw logits, then a softmax over those k.
enum class Scoring : int32_t { softmax = 0, sigmoid = 1, softmax_topk = 2 };
constexpr int32_t kLastScoring = 2;

// expert_capacity == kDropless means every pick is admitted.
constexpr int64_t kDropless = -1;

struct Problem {
  int64_t tokens = 0;
  int64_t hidden = 0;
  int64_t ffn = 0;      // I, the intermediate size of one expert
  int64_t experts = 0;  // E
  int64_t top_k = 0;
  bool gated = true;
  Activation activation = Activation::silu;
  Scoring scoring = Scoring::softmax;
  bool normalize = true;
  int64_t expert_capacity = kDropless;
  DType dtype = DType::f32;
  bool has_router_bias = false;
  bool has_b1 = false;
  bool has_b2 = false;
  // Routing from outside: topk_ids [T, k] and topk_weights [T, k] are inputs, there is no router
  // and no gate stage. An id outside [0, experts) (HF's expert-parallel sentinel is `experts`)
  // contributes zero; so does a repeat of an earlier pick of its token.
  bool routing_given = false;
  double swiglu_limit = 0;  // L of the clamped SwiGLUs
  double swiglu_alpha = 0;  // α of swiglu_oai
  // The shared expert (0: none): a dense FFN of intermediate size S on every token, with the routed
  // experts' gated/activation and no biases, added in the combine after the routed picks; scaled by
  // σ(x·shared_gateᵀ) when has_shared_gate, else by 1.
  int64_t shared_ffn = 0;
  bool has_shared_gate = false;
  // Routing options (core/routing.h route_token): a selection bias [E] (accumulation dtype) that
  // chooses but does not weigh; group-limited choice (topk_groups of num_groups groups; equal: no
  // limit); a scale of the weights after normalisation; the pick weight on the expert's input row
  // (combined with 1) instead of its output; a float32 router (weight and bias) for bf16/f16 x.
  bool has_selection_bias = false;
  int64_t num_groups = 1;
  int64_t topk_groups = 1;
  double routed_scaling_factor = 1.0;
  bool weight_on_input = false;
  bool router_f32 = false;

  // Width of the first expert GEMM: gate and up projections side by side when gated.
  template <typename N = int64_t>
  FLASHMOE_HD N gemm0_cols() const { return gated ? N(2) * N(ffn) : N(ffn); }
  FLASHMOE_HD bool dropless() const { return expert_capacity == kDropless; }
  FLASHMOE_HD bool has_shared_expert() const { return shared_ffn > 0; }
  // The shared expert as a problem of its own: the same options with ffn = S and no biases, so the
  // routed experts' tile arithmetic serves it unchanged.
  FLASHMOE_HD Problem shared_expert() const {
    Problem shared = *this;
    shared.ffn = shared_ffn;
    shared.has_b1 = shared.has_b2 = false;
    return shared;
  }
};

// Returns nullptr when the descriptor is coherent, else a message naming the field.
inline const char* validate(const Problem& p) {
  if (p.tokens < 0) return "tokens must be >= 0";
  if (p.hidden <= 0) return "hidden must be > 0";
  if (p.ffn <= 0) return "ffn must be > 0";
  if (p.experts <= 0) return "experts must be > 0";
  if (p.top_k < 1 || (!p.routing_given && p.top_k > p.experts)) return "top_k must be in [1, experts]";
  if (int32_t(p.activation) < 0 || int32_t(p.activation) > kLastActivation) return "activation code out of range";
  if (combines_gate_and_up(p.activation) && !p.gated) return "a clamped SwiGLU activation needs gated experts";
  if (combines_gate_and_up(p.activation) && !(p.swiglu_limit > 0 && p.swiglu_limit < INFINITY))
    return "swiglu_limit must be finite and > 0";
  if (p.activation == Activation::swiglu_oai && !(p.swiglu_alpha > 0 && p.swiglu_alpha < INFINITY))
    return "swiglu_alpha must be finite and > 0";
  if (int32_t(p.scoring) < 0 || int32_t(p.scoring) > kLastScoring) return "scoring code out of range";
  if (p.num_groups < 1 || p.experts % p.num_groups != 0) return "num_groups must be >= 1 and divide experts";
  if (p.topk_groups < 1 || p.topk_groups > p.num_groups) return "topk_groups must be in [1, num_groups]";
  if (!p.routing_given && p.topk_groups * (p.experts / p.num_groups) < p.top_k)
    return "top_k exceeds the experts of the topk_groups kept groups";
  if (!(p.routed_scaling_factor > 0 && p.routed_scaling_factor < INFINITY))
    return "routed_scaling_factor must be finite and > 0";
  if (p.router_f32 && !(p.dtype == DType::bf16 || p.dtype == DType::f16))
    return "router_f32 (a float32 router) needs bf16 or f16 x";
  if (int32_t(p.dtype) < 0 || int32_t(p.dtype) > 3) return "dtype code out of range";
  if (p.expert_capacity < kDropless) return "expert_capacity must be >= 0, or -1 for dropless";
  if (p.shared_ffn < 0) return "shared_ffn must be >= 0 (0: no shared expert)";
  if (p.has_shared_gate && p.shared_ffn == 0) return "has_shared_gate needs a shared expert (shared_ffn > 0)";
  if ((CheckedInt(p.shared_ffn) * CheckedInt(2) * CheckedInt(p.hidden) * CheckedInt(8)).overflow) {
    return "shared_ffn * hidden is too large: shared_w1's bytes overflow int64";
  }
  // Row indices of the expert-sorted buffers are int32 on every backend.
  if (CheckedInt(p.tokens) * CheckedInt(p.top_k) > CheckedInt(INT32_MAX)) return "tokens * top_k must fit in int32";
  // Sizes the kernels index with int64: one expert's weights, and the router logits of a call.
  const CheckedInt w1_elements = CheckedInt(p.experts) * CheckedInt(p.gemm0_cols<CheckedInt>()) * CheckedInt(p.hidden);
  if ((w1_elements * CheckedInt(8)).overflow) return "ffn * hidden * experts is too large: w1's bytes overflow int64";
  if ((CheckedInt(p.tokens) * CheckedInt(p.experts) * CheckedInt(8)).overflow) {
    return "tokens * experts is too large: the router logits' bytes overflow int64";
  }
  if ((CheckedInt(p.tokens) * CheckedInt(p.hidden) * CheckedInt(8)).overflow) {
    return "tokens * hidden is too large: x's bytes overflow int64";
  }
  return nullptr;
}

}  // namespace flashmoe
