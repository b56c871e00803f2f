// The tile GEMM written once: a register-blocked dot-product micro-tile and the cache blocking
// around it, generic over an `Ops` policy that each ISA file supplies.
//
// Templates only, and include it only after the ISA file's `#pragma GCC target` (with every
// header it needs already included before the pragma): each instantiation names that file's
// internal-linkage Ops, so code compiled for one ISA can never be linked in place of another's.
//
// An Ops policy provides:
//   Elem, Acc              storage type T and accum_t<T>
//   Vec                    a native accumulator vector
//   Operand                what load() returns and madd() consumes
//   kSlices                native vectors per 16-lane (8 for f64) logical accumulator
//   kParts                 loads per slice and depth step (2 for bf16 split into odd/even halves)
//   kRows                  the tallest micro-tile
//   kColsForRows[kRows]    the widest tile of each height that fits the register file
//   zero(), load(step_begin, slice, part), madd(acc, a, b), reduce(const Vec (&)[kSlices])
//   kReduceGroup, reduce_group(lanes, sums)   optional batched reduce() of that many accumulators
// and must follow the lane layout of tile_gemm_blocking.h, which the tests check bitwise
// across ISAs.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/tile_gemm_blocking.h"
#include "cpu/tile_gemm_isa.h"

namespace flashmoe::cpu::detail {

// B rows of one column block stay in L2 while every A panel passes over them.
inline constexpr int64_t kColumnBlockBytes = 512 * 1024;

template <class Ops>
using MicroTileFn = void (*)(const typename Ops::Elem* const* a, const typename Ops::Elem* const* b,
                             int64_t k_len, typename Ops::Acc* c, int64_t ldc, bool accumulate,
                             int64_t prefetch_offset);

// c[r][col] (+)= dot(a[r][0:k_len], b[col][0:k_len]) for a Rows x Cols tile. Every size runs the
// same per-(r, col) sequence of operations, so the smaller edge tiles give the same bits.
// prefetch_offset (elements; 0 for none) locates the next tile's B rows relative to this one's.
template <class Ops, int Rows, int Cols>
struct MicroTile {
  using Elem = typename Ops::Elem;
  using Acc = typename Ops::Acc;
  using Vec = typename Ops::Vec;
  using Operand = typename Ops::Operand;
  static constexpr int64_t kStep = kDepthStep<Elem>;

  __attribute__((always_inline)) static inline void step(Vec (&acc)[Rows][Cols][Ops::kSlices],
                                                         const Elem* const (&a)[Rows],
                                                         const Elem* const (&b)[Cols], int64_t k,
                                                         int64_t prefetch_offset) {
#pragma GCC unroll 16
    for (int slice = 0; slice < Ops::kSlices; ++slice) {
#pragma GCC unroll 2
      for (int part = 0; part < Ops::kParts; ++part) {
        Operand b_vec[Cols];
#pragma GCC unroll 16
        for (int col = 0; col < Cols; ++col) b_vec[col] = Ops::load(b[col] + k, slice, part);
        // One line of the next tile's B rows per step (a step is 64 bytes), into L2: each B row
        // is a fresh page, which the hardware prefetchers only find after a few misses.
        if (slice == 0 && part == 0 && prefetch_offset != 0) {
#pragma GCC unroll 16
          for (int col = 0; col < Cols; ++col) __builtin_prefetch(b[col] + k + prefetch_offset, 0, 1);
        }
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          const Operand a_vec = Ops::load(a[r] + k, slice, part);
#pragma GCC unroll 16
          for (int col = 0; col < Cols; ++col) acc[r][col][slice] = Ops::madd(acc[r][col][slice], a_vec, b_vec[col]);
        }
      }
    }
  }

  static void run(const Elem* const* a_rows, const Elem* const* b_rows, int64_t k_len, Acc* c, int64_t ldc,
                  bool accumulate, int64_t prefetch_offset) {
    const Elem* a[Rows];
    const Elem* b[Cols];
    for (int r = 0; r < Rows; ++r) a[r] = a_rows[r];
    for (int col = 0; col < Cols; ++col) b[col] = b_rows[col];

    Vec acc[Rows][Cols][Ops::kSlices];
    for (auto& row : acc)
      for (auto& lanes : row)
        for (Vec& lane : lanes) lane = Ops::zero();

    const int64_t k_full = k_len - k_len % kStep;
    for (int64_t k = 0; k < k_full; k += kStep) step(acc, a, b, k, prefetch_offset);
    if (k_full < k_len) {
      // The partial step runs on zero-padded copies, so it is an ordinary step for every tile size.
      alignas(64) Elem padded[Rows + Cols][kStep] = {};
      const Elem* a_tail[Rows];
      const Elem* b_tail[Cols];
      const size_t tail_bytes = size_t(k_len - k_full) * sizeof(Elem);
      for (int r = 0; r < Rows; ++r) {
        std::memcpy(padded[r], a[r] + k_full, tail_bytes);
        a_tail[r] = padded[r];
      }
      for (int col = 0; col < Cols; ++col) {
        std::memcpy(padded[Rows + col], b[col] + k_full, tail_bytes);
        b_tail[col] = padded[Rows + col];
      }
      step(acc, a_tail, b_tail, 0, 0);
    }

    for (int r = 0; r < Rows; ++r) {
      Acc sums[Cols];
      int col = 0;
      if constexpr (Ops::kReduceGroup > 1) {
        for (; col + Ops::kReduceGroup <= Cols; col += Ops::kReduceGroup) Ops::reduce_group(&acc[r][col], &sums[col]);
      }
      for (; col < Cols; ++col) sums[col] = Ops::reduce(acc[r][col]);
      Acc* out = c + r * ldc;
      for (col = 0; col < Cols; ++col) out[col] = accumulate ? out[col] + sums[col] : sums[col];
    }
  }
};

// Tile widths may only shrink as tiles grow taller: panels differ by one row and share the width
// of the tallest, which must then suit the shorter ones too.
template <class Ops>
constexpr int max_tile_cols() {
  for (int rows = 1; rows < Ops::kRows; ++rows)
    if (Ops::kColsForRows[rows] > Ops::kColsForRows[rows - 1]) return 0;
  return Ops::kColsForRows[0];
}

// kTiles[(rows - 1) * max_tile_cols + (cols - 1)] is the rows x cols micro-tile, or null where
// that tile would not fit the registers (and is never asked for).
template <class Ops, class Sizes>
struct MicroTileTable;

template <class Ops, std::size_t... Index>
struct MicroTileTable<Ops, std::index_sequence<Index...>> {
  static constexpr int kWidest = max_tile_cols<Ops>();
  static_assert(kWidest > 0, "Ops::kColsForRows must not increase with the tile height");

  template <int Rows, int Cols>
  static constexpr MicroTileFn<Ops> entry() {
    if constexpr (Cols <= Ops::kColsForRows[Rows - 1]) return &MicroTile<Ops, Rows, Cols>::run;
    else return nullptr;
  }

  static constexpr MicroTileFn<Ops> kTiles[] = {entry<int(Index) / kWidest + 1, int(Index) % kWidest + 1>()...};
};

// A batch this many panels tall or less streams B once from memory, tile by tile, reusing each
// B tile from L1 for every panel; taller batches keep a block of B in L2 and sweep it per panel.
inline constexpr int64_t kMaxStreamingPanels = 3;

template <class Ops>
void run_tile_gemm(const TileGemmArgs<typename Ops::Elem>& args) {
  using Elem = typename Ops::Elem;
  constexpr int64_t kRows = Ops::kRows;
  constexpr int64_t kWidest = max_tile_cols<Ops>();
  using Table = MicroTileTable<Ops, std::make_index_sequence<kRows * kWidest>>;

  const int64_t m = args.m;
  const int64_t chunk = args.depth_chunk;
  const int64_t fitting_cols = kColumnBlockBytes / (chunk * int64_t(sizeof(Elem)));
  const int64_t column_block = fitting_cols < kWidest ? kWidest : fitting_cols;
  // Panels of A rows as even as possible (8 rows: 4 + 4, not 6 + 2), so every tile is a tall one;
  // all use the width of the tallest.
  const int64_t panels = (m + kRows - 1) / kRows;
  const int64_t tile_cols = Ops::kColsForRows[(m + panels - 1) / panels - 1];
  const int64_t prefetch_offset = tile_cols * args.ldb;

  auto run_tile = [&](int64_t panel, int64_t n, int64_t n_end, int64_t k_begin, int64_t k_len, bool accumulate) {
    const int64_t i_begin = panel * (m / panels) + (panel < m % panels ? panel : m % panels);
    const int64_t rows = m / panels + (panel < m % panels ? 1 : 0);
    const int64_t cols = n_end - n < tile_cols ? n_end - n : tile_cols;
    const Elem* a[kRows];
    const Elem* b[kWidest];
    for (int64_t r = 0; r < rows; ++r) a[r] = args.a_rows[i_begin + r] + k_begin;
    for (int64_t col = 0; col < cols; ++col) b[col] = args.b + (n + col) * args.ldb + k_begin;
    const bool next_tile_whole = n + 2 * tile_cols <= args.n_cols;
    Table::kTiles[(rows - 1) * kWidest + (cols - 1)](a, b, k_len, args.c + i_begin * args.ldc + n, args.ldc,
                                                     accumulate, next_tile_whole ? prefetch_offset : 0);
  };

  for (int64_t n_begin = 0; n_begin < args.n_cols; n_begin += column_block) {
    const int64_t n_end = n_begin + column_block < args.n_cols ? n_begin + column_block : args.n_cols;
    for (int64_t k_begin = 0; k_begin < args.depth; k_begin += chunk) {
      const int64_t k_len = k_begin + chunk < args.depth ? chunk : args.depth - k_begin;
      const bool accumulate = args.accumulate || k_begin > 0;
      if (panels <= kMaxStreamingPanels) {
        for (int64_t n = n_begin; n < n_end; n += tile_cols)
          for (int64_t panel = 0; panel < panels; ++panel) run_tile(panel, n, n_end, k_begin, k_len, accumulate);
      } else {
        for (int64_t panel = 0; panel < panels; ++panel)
          for (int64_t n = n_begin; n < n_end; n += tile_cols) run_tile(panel, n, n_end, k_begin, k_len, accumulate);
      }
    }
  }
}

}  // namespace flashmoe::cpu::detail
