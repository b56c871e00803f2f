// How expert work is cut into tile tasks. Fixed numbers, never derived from the thread or
// processor count, so the arithmetic of every output element is the same however the tasks run.
#pragma once

#include <cstdint>

#include "core/checked.h"
#include "core/dtype.h"

namespace flashmoe {

FLASHMOE_HD int64_t ceil_div(int64_t a, int64_t b) { return ceil_div_as<int64_t>(a, b); }

struct Tiling {
  int64_t row_tile = 64;      // expert-sorted rows per tile (weight reuse factor)
  int64_t ffn_tile = 256;     // columns of h produced by one GEMM0 task
  int64_t hidden_tile = 512;  // columns of the expert output produced by one GEMM1 task
  int64_t token_tile = 32;    // tokens per gate / combine task

  // Templates over the number type (core/checked.h): int64_t, or CheckedInt when sizing on the host.
  template <typename N = int64_t>
  FLASHMOE_HD N row_tiles(Number<N> rows) const { return ceil_div_as<N>(rows, N(row_tile)); }
  template <typename N = int64_t>
  FLASHMOE_HD N ffn_tiles(Number<N> ffn) const { return ceil_div_as<N>(ffn, N(ffn_tile)); }
  template <typename N = int64_t>
  FLASHMOE_HD N hidden_tiles(Number<N> hidden) const { return ceil_div_as<N>(hidden, N(hidden_tile)); }
  template <typename N = int64_t>
  FLASHMOE_HD N token_tiles(Number<N> tokens) const { return ceil_div_as<N>(tokens, N(token_tile)); }

  // Tile tasks one expert cell of `rows` rows turns into: GEMM0 over (row tile, ffn tile), then
  // GEMM1 over (row tile, hidden tile).
  template <typename N = int64_t>
  FLASHMOE_HD N gemm0_tasks(Number<N> rows, Number<N> ffn) const { return row_tiles<N>(rows) * ffn_tiles<N>(ffn); }
  template <typename N = int64_t>
  FLASHMOE_HD N gemm1_tasks(Number<N> rows, Number<N> hidden) const { return row_tiles<N>(rows) * hidden_tiles<N>(hidden); }
  template <typename N = int64_t>
  FLASHMOE_HD N cell_tasks(Number<N> rows, Number<N> ffn, Number<N> hidden) const {
    return gemm0_tasks<N>(rows, ffn) + gemm1_tasks<N>(rows, hidden);
  }
};

}  // namespace flashmoe
