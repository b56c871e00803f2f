// How expert work is cut into tile tasks. Fixed numbers, never derived from the thread or
// processor count, so the arithmetic of every output element is the same however the tasks run.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe {

FLASHMOE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Tiling {
  int64_t row_tile = 64;      // expert-sorted rows per tile (weight reuse factor)
  int64_t ffn_tile = 256;     // columns of h produced by one GEMM0 task
  int64_t hidden_tile = 512;  // columns of the expert output produced by one GEMM1 task
  int64_t token_tile = 32;    // tokens per gate / combine task

  FLASHMOE_HD int64_t row_tiles(int64_t rows) const { return ceil_div(rows, row_tile); }
  FLASHMOE_HD int64_t ffn_tiles(int64_t ffn) const { return ceil_div(ffn, ffn_tile); }
  FLASHMOE_HD int64_t hidden_tiles(int64_t hidden) const { return ceil_div(hidden, hidden_tile); }
  FLASHMOE_HD int64_t token_tiles(int64_t tokens) const { return ceil_div(tokens, token_tile); }

  // Tile tasks one expert cell of `rows` rows turns into: GEMM0 over (row tile, ffn tile), then
  // GEMM1 over (row tile, hidden tile).
  FLASHMOE_HD int64_t gemm0_tasks(int64_t rows, int64_t ffn) const { return row_tiles(rows) * ffn_tiles(ffn); }
  FLASHMOE_HD int64_t gemm1_tasks(int64_t rows, int64_t hidden) const { return row_tiles(rows) * hidden_tiles(hidden); }
  FLASHMOE_HD int64_t cell_tasks(int64_t rows, int64_t ffn, int64_t hidden) const {
    return gemm0_tasks(rows, ffn) + gemm1_tasks(rows, hidden);
  }
};

}  // namespace flashmoe
