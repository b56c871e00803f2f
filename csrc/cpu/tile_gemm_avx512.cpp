// AVX-512 Ops for the tile GEMM: every element type, converted to fp32 (f64) lanes on load.
#if defined(__x86_64__)
// GCC 12 flags the _mm*_undefined_*() self-initialisation inside its own intrinsics as
// uninitialised (GCC PR 105593); silence that for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/tile_gemm_blocking.h"
#include "cpu/tile_gemm_isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "cpu/tile_gemm_kernel.h"
#include "cpu/tile_gemm_zmm.h"

namespace flashmoe::cpu {
namespace {

// Widening loads: one depth step of T into fp32 (f64) lanes.
template <typename T>
struct ZmmLoad;

template <>
struct ZmmLoad<float> {
  static constexpr int kParts = 1;
  static __m512 load(const float* p, int, int) { return _mm512_loadu_ps(p); }
};

template <>
struct ZmmLoad<double> {
  static constexpr int kParts = 1;
  static __m512d load(const double* p, int, int) { return _mm512_loadu_pd(p); }
};

template <>
struct ZmmLoad<float16> {
  static constexpr int kParts = 1;
  static __m512 load(const float16* p, int, int) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

// 32 bf16 as 16 words: part 0 is each word's high (odd) element, part 1 its low (even) one.
template <>
struct ZmmLoad<bfloat16> {
  static constexpr int kParts = 2;
  static __m512 load(const bfloat16* p, int, int part) {
    const __m512i words = _mm512_loadu_si512(p);
    return _mm512_castsi512_ps(part == 0 ? _mm512_and_si512(words, _mm512_set1_epi32(int32_t(0xffff0000u)))
                                         : _mm512_slli_epi32(words, 16));
  }
};

// Tiles of up to 6 x 4 (8 columns for 1 or 2 rows): the accumulators, one B vector per column and
// one A vector fit in the 32 zmm registers.
template <typename T, class Lanes>
struct ZmmOps : Lanes, ZmmLoad<T> {
  using Elem = T;
  using Operand = typename Lanes::Vec;
  static constexpr int kRows = 6;
  static constexpr int kColsForRows[kRows] = {8, 8, 7, 6, 5, 4};
  static typename Lanes::Vec madd(typename Lanes::Vec acc, Operand a, Operand b) { return Lanes::fma(acc, a, b); }
};

}  // namespace

void tile_gemm_avx512(const TileGemmArgs<float>& args) { detail::run_tile_gemm<ZmmOps<float, ZmmFloatLanes>>(args); }
void tile_gemm_avx512(const TileGemmArgs<double>& args) {
  detail::run_tile_gemm<ZmmOps<double, ZmmDoubleLanes>>(args);
}
void tile_gemm_avx512(const TileGemmArgs<bfloat16>& args) {
  detail::run_tile_gemm<ZmmOps<bfloat16, ZmmFloatLanes>>(args);
}
void tile_gemm_avx512(const TileGemmArgs<float16>& args) {
  detail::run_tile_gemm<ZmmOps<float16, ZmmFloatLanes>>(args);
}

}  // namespace flashmoe::cpu

#pragma GCC pop_options

#endif  // defined(__x86_64__)
