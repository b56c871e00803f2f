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
  }
  return v;
}

}  // namespace flashmoe
