// The arithmetic layout of the tile GEMM: how depth is cut into vector steps and chunks.
//
// These are pure functions of the element type and the depth. They never look at the ISA, m,
// or the tile shape, which is what makes every ISA and every tile reduce a given (row, column)
// pair in the same order (the determinism contract in tile_gemm.h).
//
// The order, for one output c[i][n]:
//   - depth is split into chunks of depth_chunk<T>(depth) elements (the last may be shorter);
//   - within a chunk, 16 fp32 lanes (8 for f64) accumulate by FMA, one depth step at a time;
//     a step covers kDepthStep<T> elements; lane j takes element j of the step, except for bf16,
//     where lane j takes the pair (2j+1, 2j) in that order (the vdpbf16ps layout); a final partial
//     step is zero-padded;
//   - the lanes are summed by halving: v[j] + v[j + half] for half = 8, 4, 2, 1 (4, 2, 1 for f64);
//   - the chunk sum is stored (first chunk, accumulate=false) or added to c.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe::cpu {

template <typename T>
inline constexpr int64_t kDepthStep = 16;
template <>
inline constexpr int64_t kDepthStep<double> = 8;
template <>
inline constexpr int64_t kDepthStep<bfloat16> = 32;

// A chunk row is at most 4 KiB, so a panel of operand rows stays in L1 while the other
// operand streams past it, and the per-chunk horizontal sums stay a small cost.
template <typename T>
inline constexpr int64_t kMaxDepthChunk = 4096 / int64_t(sizeof(T));

// Equal chunks, rounded up to whole steps, none longer than kMaxDepthChunk.
template <typename T>
constexpr int64_t depth_chunk(int64_t depth) {
  constexpr int64_t step = kDepthStep<T>;
  if (depth <= kMaxDepthChunk<T>) return depth;
  const int64_t chunks = (depth + kMaxDepthChunk<T> - 1) / kMaxDepthChunk<T>;
  const int64_t even_share = (depth + chunks - 1) / chunks;
  return (even_share + step - 1) / step * step;
}

}  // namespace flashmoe::cpu
