// The per-ISA entry points of the tile GEMM, one overload per element type; tile_gemm.cpp
// picks one at run time. Each is defined in its own file (tile_gemm_<isa>.cpp) compiled for
// that ISA, so none may be called on a CPU that lacks it.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe::cpu {

// The arguments of tile_gemm_nt (see tile_gemm.h), plus the depth chunk length, which the
// dispatcher computes once so that no ISA can choose differently.
template <typename T>
struct TileGemmArgs {
  const T* const* a_rows;
  int64_t m;
  const T* b;
  int64_t ldb;
  int64_t n_cols;
  int64_t depth;
  int64_t depth_chunk;
  accum_t<T>* c;
  int64_t ldc;
  bool accumulate;
};

#define FLASHMOE_TILE_GEMM_DECLARE(name)            \
  void name(const TileGemmArgs<float>& args);    \
  void name(const TileGemmArgs<double>& args);   \
  void name(const TileGemmArgs<bfloat16>& args); \
  void name(const TileGemmArgs<float16>& args);

FLASHMOE_TILE_GEMM_DECLARE(tile_gemm_generic)
#if defined(__x86_64__)
FLASHMOE_TILE_GEMM_DECLARE(tile_gemm_avx2)
FLASHMOE_TILE_GEMM_DECLARE(tile_gemm_avx512)
// bf16 through vdpbf16ps (AVX512_BF16); the other types have nothing to gain from it.
void tile_gemm_avx512_bf16(const TileGemmArgs<bfloat16>& args);
#endif
#undef FLASHMOE_TILE_GEMM_DECLARE

}  // namespace flashmoe::cpu
