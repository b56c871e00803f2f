// The expert activations. NaN in gives NaN out for all of them (relu included), as in torch.
#pragma once

#include <cmath>

#include "core/dtype.h"
#include "core/problem.h"

namespace flashmoe {

template <typename Acc>
FLASHMOE_HD Acc activate(Activation activation, Acc v) {
  switch (activation) {
    case Activation::silu:
      return v / (Acc(1) + std::exp(-v));
    case Activation::gelu:
      return Acc(0.5) * v * (Acc(1) + std::erf(v * Acc(0.70710678118654752440)));
    case Activation::gelu_tanh: {
      const Acc inner = Acc(0.79788456080286535588) * (v + Acc(0.044715) * v * v * v);
      return Acc(0.5) * v * (Acc(1) + std::tanh(inner));
    }
    case Activation::relu:
      return v < Acc(0) ? Acc(0) : v;
    case Activation::relu2: {
      const Acc r = v < Acc(0) ? Acc(0) : v;
      return r * r;
    }
    default:  // the clamped SwiGLUs go through glu()
      return v;
  }
}

// min(v, limit) and clamp(v, -limit, limit), with NaN passing through as in torch.
template <typename Acc>
FLASHMOE_HD Acc clamp_max(Acc v, Acc limit) {
  return v > limit ? limit : v;
}
template <typename Acc>
FLASHMOE_HD Acc clamp_symmetric(Acc v, Acc limit) {
  return v > limit ? limit : (v < -limit ? -limit : v);
}

// The gated expert's hidden activation from its gate (g) and up (u) values: act(g)·u, or one of
// the clamped SwiGLUs (limit L, alpha α: Problem::swiglu_limit / swiglu_alpha).
template <typename Acc>
FLASHMOE_HD Acc glu(Activation activation, Acc g, Acc u, Acc limit, Acc alpha) {
  switch (activation) {
    case Activation::swiglu_clamp:
      return activate(Activation::silu, clamp_max(g, limit)) * clamp_symmetric(u, limit);
    case Activation::swiglu_clamp_post:
      return clamp_max(activate(Activation::silu, g), limit) * clamp_symmetric(u, limit);
    case Activation::swiglu_oai: {
      const Acc gate = clamp_max(g, limit);
      return (clamp_symmetric(u, limit) + Acc(1)) * (gate / (Acc(1) + std::exp(-alpha * gate)));
    }
    default:
      return activate(activation, g) * u;
  }
}

}  // namespace flashmoe
