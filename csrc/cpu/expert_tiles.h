// The arithmetic of the expert tile tasks, shared by every schedule of the CPU backend.
// Each output element depends only on its own rows and the expert's weights (tile_gemm's
// contract), so however rows are grouped into tiles the bits are the same.
#pragma once

#include <cstdint>

#include "core/activation.h"
#include "core/dtype.h"
#include "core/problem.h"
#include "cpu/tile_gemm.h"

namespace flashmoe::cpu {

// GEMM0 of a row tile for ffn columns [c0, c1): h = glu(x·gateᵀ + b1, x·upᵀ + b1') or act(x·w1ᵀ + b1), rounded
// to the compute dtype into h_rows[i][c0..c1), as torch rounds it. gate/up: rows × (c1 - c0) scratch.
template <typename T>
void gemm0_tile(const Problem& p, const T* const* x_rows, int64_t rows, const T* w1, const T* b1, int64_t c0,
                int64_t c1, T* const* h_rows, accum_t<T>* gate, accum_t<T>* up) {
  using Acc = accum_t<T>;
  const int64_t H = p.hidden, I = p.ffn, width = c1 - c0;
  tile_gemm_nt<T>(x_rows, rows, w1 + c0 * H, H, width, H, gate, width, false);
  if (p.gated) tile_gemm_nt<T>(x_rows, rows, w1 + (I + c0) * H, H, width, H, up, width, false);
  const Acc limit = Acc(p.swiglu_limit), alpha = Acc(p.swiglu_alpha);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < width; ++c) {
      const Acc g = gate[i * width + c] + (b1 ? load_value(b1[c0 + c]) : Acc(0));
      const Acc h = p.gated ? glu(p.activation, g, up[i * width + c] + (b1 ? load_value(b1[I + c0 + c]) : Acc(0)),
                                  limit, alpha)
                            : activate(p.activation, g);
      h_rows[i][c0 + c] = store_value<T>(h);
    }
  }
}

// GEMM1 of a row tile for hidden columns [n0, n1): out_rows[i][n0..n1) = h·W2ᵀ + b2, rounded to
// the compute dtype. acc: rows × (n1 - n0) scratch.
template <typename T>
void gemm1_tile(const Problem& p, const T* const* h_rows, int64_t rows, const T* w2, const T* b2, int64_t n0,
                int64_t n1, T* const* out_rows, accum_t<T>* acc) {
  using Acc = accum_t<T>;
  const int64_t I = p.ffn, width = n1 - n0;
  tile_gemm_nt<T>(h_rows, rows, w2 + n0 * I, I, width, I, acc, width, false);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t n = 0; n < width; ++n) {
      out_rows[i][n0 + n] = store_value<T>(acc[i * width + n] + (b2 ? load_value(b2[n0 + n]) : Acc(0)));
    }
  }
}

}  // namespace flashmoe::cpu
