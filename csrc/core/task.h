// Task: the 128-byte descriptor a scheduler hands a processor. One cache line pair on the CPU,
// one aligned 128-byte load on the GPU.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe {

enum class TaskKind : uint32_t {
  gemm0 = 1,    // h[rows, columns) of a row tile: act(x · W1ᵀ + b1) (⊙ up), rounded to dtype
  gemm1 = 2,    // out[rows, columns) of a row tile: h · W2ᵀ + b2, written to the source's heap
  combine = 3,  // y for tokens [column_begin, column_begin + columns): weighted sum over picks
  // The CUDA kernel also runs its gate and dispatch as tasks (the CPU backend's ranks do these inline).
  gate = 4,      // router logits of tokens [column_begin, column_begin + columns) × gate column tile row_tile;
                 // the tile's last one also routes it (scores, top-k) (cuda/gate.cuh)
  route = 5,     // ordered prefix of the gate tiles' expert histograms: slots and expert offsets
  dispatch = 6,  // copy the admitted picks of tokens [column_begin, ...) into the dispatch rows
  stop = 7,      // the processor leaves its loop
};

struct alignas(128) Task {
  TaskKind kind = TaskKind::gemm0;
  uint32_t epoch = 0;         // the call this task belongs to
  int32_t source = 0;         // rank whose tokens these are
  int32_t local_expert = 0;   // expert on this rank
  int32_t row_tile = 0;       // index of the row tile within its cell
  int32_t buffer = -1;        // intermediate (h) buffer of the row tile, owned by this rank
  int64_t first_row = 0;      // first row of the tile in the source's region (heap row number)
  int64_t rows = 0;           // rows in the tile
  int64_t column_begin = 0;   // gemm0: ffn column; gemm1: hidden column; combine: first token
  int64_t columns = 0;        // gemm0/gemm1: width; combine: token count
  uint8_t reserved[128 - 2 * 4 - 4 * 4 - 4 * 8];
};

static_assert(sizeof(Task) == 128, "a Task is exactly 128 bytes");
static_assert(alignof(Task) == 128, "a Task is 128-byte aligned");

}  // namespace flashmoe
