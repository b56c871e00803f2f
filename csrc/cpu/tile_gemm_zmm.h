// The AVX-512 accumulator lanes of the tile GEMM: one zmm holds a whole 16-lane (8 for f64)
// logical accumulator, summed by the halving tree of tile_gemm_blocking.h.
//
// Include only after an AVX-512 `#pragma GCC target`. The unnamed namespace gives each AVX-512
// file its own copy, compiled for that file's target.
#pragma once

#include <immintrin.h>

namespace flashmoe::cpu {
namespace {

struct ZmmFloatLanes {
  using Acc = float;
  using Vec = __m512;
  static constexpr int kSlices = 1;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec fma(Vec acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
  static float reduce(const Vec (&lanes)[1]) {
    const __m256 half8 = _mm256_add_ps(_mm512_castps512_ps256(lanes[0]), _mm512_extractf32x8_ps(lanes[0], 1));
    const __m128 half4 = _mm_add_ps(_mm256_castps256_ps128(half8), _mm256_extractf128_ps(half8, 1));
    const __m128 half2 = _mm_add_ps(half4, _mm_movehl_ps(half4, half4));
    return _mm_cvtss_f32(_mm_add_ss(half2, _mm_movehdup_ps(half2)));
  }

  // Four accumulators at once through the same tree: every add still pairs lanes j and j + half
  // of one accumulator, so the sums are those of reduce(), bit for bit, in a third of the shuffles.
  static constexpr int kReduceGroup = 4;
  static void reduce_group(const Vec (*lanes)[1], float* sums) {
    const __m512 half8_01 = _mm512_add_ps(_mm512_shuffle_f32x4(lanes[0][0], lanes[1][0], 0x44),
                                          _mm512_shuffle_f32x4(lanes[0][0], lanes[1][0], 0xee));
    const __m512 half8_23 = _mm512_add_ps(_mm512_shuffle_f32x4(lanes[2][0], lanes[3][0], 0x44),
                                          _mm512_shuffle_f32x4(lanes[2][0], lanes[3][0], 0xee));
    // 128-bit quarter q now holds the 4 partial sums of accumulator q.
    const __m512 half4 = _mm512_add_ps(_mm512_shuffle_f32x4(half8_01, half8_23, 0x88),
                                       _mm512_shuffle_f32x4(half8_01, half8_23, 0xdd));
    const __m512 half2 = _mm512_add_ps(half4, _mm512_permute_ps(half4, 0x4e));
    const __m512 half1 = _mm512_add_ps(half2, _mm512_permute_ps(half2, 0xb1));
    const __m512i quarter_starts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_ps(sums, _mm512_castps512_ps128(_mm512_permutexvar_ps(quarter_starts, half1)));
  }
};

struct ZmmDoubleLanes {
  using Acc = double;
  using Vec = __m512d;
  static constexpr int kSlices = 1;
  static Vec zero() { return _mm512_setzero_pd(); }
  static Vec fma(Vec acc, Vec a, Vec b) { return _mm512_fmadd_pd(a, b, acc); }
  static double reduce(const Vec (&lanes)[1]) {
    const __m256d half4 = _mm256_add_pd(_mm512_castpd512_pd256(lanes[0]), _mm512_extractf64x4_pd(lanes[0], 1));
    const __m128d half2 = _mm_add_pd(_mm256_castpd256_pd128(half4), _mm256_extractf128_pd(half4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half2, _mm_unpackhi_pd(half2, half2)));
  }
  static constexpr int kReduceGroup = 1;
  static void reduce_group(const Vec (*)[1], double*) {}
};

}  // namespace
}  // namespace flashmoe::cpu
