// AVX2 Ops for the tile GEMM: a 16-lane (8 for f64) accumulator is two ymm slices, lanes 0-7 and
// 8-15, so the arithmetic is that of the AVX-512 kernel, bit for bit.
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
#pragma GCC target("avx2,fma,f16c")

#include "cpu/tile_gemm_kernel.h"

namespace flashmoe::cpu {
namespace {

struct YmmFloatLanes {
  using Acc = float;
  using Vec = __m256;
  static constexpr int kSlices = 2;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec fma(Vec acc, Vec a, Vec b) { return _mm256_fmadd_ps(a, b, acc); }
  static float reduce(const Vec (&lanes)[2]) {
    const __m256 half8 = _mm256_add_ps(lanes[0], lanes[1]);
    const __m128 half4 = _mm_add_ps(_mm256_castps256_ps128(half8), _mm256_extractf128_ps(half8, 1));
    const __m128 half2 = _mm_add_ps(half4, _mm_movehl_ps(half4, half4));
    return _mm_cvtss_f32(_mm_add_ss(half2, _mm_movehdup_ps(half2)));
  }
  static constexpr int kReduceGroup = 1;
  static void reduce_group(const Vec (*)[2], float*) {}
};

struct YmmDoubleLanes {
  using Acc = double;
  using Vec = __m256d;
  static constexpr int kSlices = 2;
  static Vec zero() { return _mm256_setzero_pd(); }
  static Vec fma(Vec acc, Vec a, Vec b) { return _mm256_fmadd_pd(a, b, acc); }
  static double reduce(const Vec (&lanes)[2]) {
    const __m256d half4 = _mm256_add_pd(lanes[0], lanes[1]);
    const __m128d half2 = _mm_add_pd(_mm256_castpd256_pd128(half4), _mm256_extractf128_pd(half4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half2, _mm_unpackhi_pd(half2, half2)));
  }
  static constexpr int kReduceGroup = 1;
  static void reduce_group(const Vec (*)[2], double*) {}
};

// Widening loads of one slice (a 32-byte half of the depth step) into fp32 (f64) lanes.
template <typename T>
struct YmmLoad;

template <>
struct YmmLoad<float> {
  static constexpr int kParts = 1;
  static __m256 load(const float* p, int slice, int) { return _mm256_loadu_ps(p + 8 * slice); }
};

template <>
struct YmmLoad<double> {
  static constexpr int kParts = 1;
  static __m256d load(const double* p, int slice, int) { return _mm256_loadu_pd(p + 4 * slice); }
};

template <>
struct YmmLoad<float16> {
  static constexpr int kParts = 1;
  static __m256 load(const float16* p, int slice, int) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * slice)));
  }
};

// 16 bf16 as 8 words: part 0 is each word's high (odd) element, part 1 its low (even) one.
template <>
struct YmmLoad<bfloat16> {
  static constexpr int kParts = 2;
  static __m256 load(const bfloat16* p, int slice, int part) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * slice));
    return _mm256_castsi256_ps(part == 0 ? _mm256_and_si256(words, _mm256_set1_epi32(int32_t(0xffff0000u)))
                                         : _mm256_slli_epi32(words, 16));
  }
};

// Tiles of 4 x 1, 3 x 2, 2 x 3 or 1 x 4: the accumulator slices, one B vector per column and one
// A vector fit in the 16 ymm registers; tall tiles read the L2-resident B the fewest times.
template <typename T, class Lanes>
struct YmmOps : Lanes, YmmLoad<T> {
  using Elem = T;
  using Operand = typename Lanes::Vec;
  static constexpr int kRows = 4;
  static constexpr int kColsForRows[kRows] = {4, 3, 2, 1};
  static typename Lanes::Vec madd(typename Lanes::Vec acc, Operand a, Operand b) { return Lanes::fma(acc, a, b); }
};

}  // namespace

void tile_gemm_avx2(const TileGemmArgs<float>& args) { detail::run_tile_gemm<YmmOps<float, YmmFloatLanes>>(args); }
void tile_gemm_avx2(const TileGemmArgs<double>& args) { detail::run_tile_gemm<YmmOps<double, YmmDoubleLanes>>(args); }
void tile_gemm_avx2(const TileGemmArgs<bfloat16>& args) {
  detail::run_tile_gemm<YmmOps<bfloat16, YmmFloatLanes>>(args);
}
void tile_gemm_avx2(const TileGemmArgs<float16>& args) {
  detail::run_tile_gemm<YmmOps<float16, YmmFloatLanes>>(args);
}

}  // namespace flashmoe::cpu

#pragma GCC pop_options

#endif  // defined(__x86_64__)
