// The router logit x·w over h in one fixed order, as plain fp32 FMAs (never tensor-core MMA, whose
// accumulation truncates), so that a logit stays within fp32's ordinary error bound at any H and
// has the same bits on every path: the kernel's gate task, and the host (the emulation's check).
//
// The order, for a row of H values:
//   1. h is cut into chunks of kLogitChunk = 8 consecutive elements; chunk c belongs to lane c % 32;
//   2. lane l starts from 0 and adds its chunks in ascending c, each in ascending h, as
//      acc = fma(x[h], w[h], acc) with both factors upcast to fp32 (exact); elements past H are
//      skipped, not added as zeros;
//   3. the 32 lane partials p[0..31] are summed as a butterfly: for offset = 16, 8, 4, 2, 1,
//      p[l] = p[l] + p[l + offset] for l < offset; the logit is p[0].
// bf16/fp16 products are exact in fp32, so there the FMA rounds like an add; fp32 products round once.
//
// The gate stage's tiling: tasks of a token tile × kGateExperts router columns (gate_columns);
// the task that finishes a token tile's last column tile routes the tile (tasks.cuh gate_task).
#pragma once

#include <cstdint>

#include "core/problem.h"
#include "cuda/platform.h"

#if defined(__CUDACC__)
#define FLASHMOE_UNROLL _Pragma("unroll")
#else
#include <cmath>
#include <cstring>
#define FLASHMOE_UNROLL
#endif

namespace flashmoe::cuda {

constexpr int kLogitLanes = 32;
constexpr int kLogitChunk = 8;
// Router columns (experts) of one gate task, and tokens a warp carries through one weight chunk.
constexpr int kGateExperts = 16;
constexpr int kGateTokens = 4;
constexpr int kGateTokenTile = 64;  // tokens of a gate task at most: gpu_tiling().token_tile

FLASHMOE_HD float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The gate's columns of a problem: experts [0, E) unless routing comes from outside, then the
// shared gate's column E when there is one. A column tile is kGateExperts of them.
struct GateColumns {
  int64_t begin = 0, end = 0;
  FLASHMOE_HD explicit GateColumns(const Problem& p)
      : begin(p.routing_given ? p.experts : 0), end(p.experts + (p.has_shared_gate ? 1 : 0)) {}
  // Gate tasks per token tile: at least one, which also owns the tile's routing and histogram.
  FLASHMOE_HD int64_t tiles() const {
    const int64_t tiles = (end - begin + kGateExperts - 1) / kGateExperts;
    return tiles > 0 ? tiles : 1;
  }
  FLASHMOE_HD int64_t tile_begin(int64_t tile) const { return begin + tile * kGateExperts; }
  FLASHMOE_HD int64_t tile_end(int64_t tile) const {
    const int64_t last = tile_begin(tile) + kGateExperts;
    return last < end ? last : end;
  }
};

// Loads chunk elements [0, 8) of `row` as fp32 (Load: Storage-like, ::Type and ::load): with
// 16-byte loads when `vector` (the chunk is whole and 16-byte aligned), else element by element,
// those at or past `valid` as zeros (never added: see logit_partials).
template <typename Load>
FLASHMOE_DEVICE void load_chunk(const typename Load::Type* row, bool vector, int64_t valid, float (&out)[kLogitChunk]) {
  using V = typename Load::Type;
  if (vector) {
    constexpr int kPerVector = 16 / int(sizeof(V));
FLASHMOE_UNROLL
    for (int v = 0; v < kLogitChunk / kPerVector; ++v) {
      alignas(16) V values[kPerVector];
#if defined(__CUDACC__)
      *reinterpret_cast<uint4*>(values) = reinterpret_cast<const uint4*>(row)[v];
#else
      std::memcpy(values, row + v * kPerVector, 16);
#endif
FLASHMOE_UNROLL
      for (int i = 0; i < kPerVector; ++i) out[v * kPerVector + i] = Load::load(values[i]);
    }
  } else {
FLASHMOE_UNROLL
    for (int i = 0; i < kLogitChunk; ++i) out[i] = i < valid ? Load::load(row[i]) : 0.0f;
  }
}

// Lane `lane`'s partials (step 2 of the order) of `tokens` <= Tokens logits: rows x + t·H against
// one weight row w. `vector`: every row is 16-byte aligned and H a whole number of chunks.
template <typename LoadX, typename LoadW, int Tokens>
FLASHMOE_DEVICE void logit_partials(const typename LoadX::Type* x, int tokens, const typename LoadW::Type* w,
                                    int64_t H, int lane, bool vector, float (&partial)[Tokens]) {
FLASHMOE_UNROLL
  for (int t = 0; t < Tokens; ++t) partial[t] = 0.0f;
  for (int64_t h0 = int64_t(lane) * kLogitChunk; h0 < H; h0 += int64_t(kLogitLanes) * kLogitChunk) {
    const int64_t valid = H - h0;
    float weights[kLogitChunk];
    load_chunk<LoadW>(w + h0, vector, valid, weights);
FLASHMOE_UNROLL
    for (int t = 0; t < Tokens; ++t) {
      if (t >= tokens) break;
      float values[kLogitChunk];
      load_chunk<LoadX>(x + t * H + h0, vector, valid, values);
FLASHMOE_UNROLL
      for (int i = 0; i < kLogitChunk; ++i) {
        if (i < valid) partial[t] = fused_multiply_add(values[i], weights[i], partial[t]);
      }
    }
  }
}

// Step 3 of the order: the logit from the 32 lane partials (overwritten).
FLASHMOE_HD float sum_lane_partials(float* partials) {
  for (int offset = kLogitLanes / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) partials[lane] = partials[lane] + partials[lane + offset];
  }
  return partials[0];
}

// The whole order on one thread: the reference the kernel's logits are checked against, bit for bit.
template <typename LoadX, typename LoadW>
FLASHMOE_DEVICE float logit_dot(const typename LoadX::Type* x, const typename LoadW::Type* w, int64_t H) {
  float partials[kLogitLanes];
  for (int lane = 0; lane < kLogitLanes; ++lane) {
    float partial[1];
    logit_partials<LoadX, LoadW, 1>(x, 1, w, H, lane, false, partial);
    partials[lane] = partial[0];
  }
  return sum_lane_partials(partials);
}

// An atomic add at GPU scope with acquire and release semantics; returns the old value.
#if defined(__CUDACC__)
__device__ __forceinline__ uint32_t atomic_add_acq_rel(uint32_t* address, uint32_t value) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(address), "r"(value) : "memory");
  return old;
}
#else
inline uint32_t atomic_add_acq_rel(uint32_t* address, uint32_t value) {
  return __atomic_fetch_add(address, value, __ATOMIC_ACQ_REL);
}
#endif

}  // namespace flashmoe::cuda
