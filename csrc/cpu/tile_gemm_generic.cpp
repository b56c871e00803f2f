// Portable scalar Ops for the tile GEMM: the 16 lanes (8 for f64) are 16 scalars and every
// multiply-add is a fused std::fma, so the result matches the vector ISAs bit for bit.
// (Slow where the CPU has no FMA instruction and libm emulates it; it is the fallback, not the path.)
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/tile_gemm_blocking.h"
#include "cpu/tile_gemm_isa.h"
#include "cpu/tile_gemm_kernel.h"

namespace flashmoe::cpu {
namespace {

template <typename Scalar, int Lanes>
struct ScalarLanes {
  using Acc = Scalar;
  using Vec = Scalar;
  static constexpr int kSlices = Lanes;
  static Vec zero() { return Scalar(0); }
  static Vec fma(Vec acc, Vec a, Vec b) { return std::fma(a, b, acc); }
  static Scalar reduce(const Vec (&lanes)[Lanes]) {
    Scalar sums[Lanes];
    for (int lane = 0; lane < Lanes; ++lane) sums[lane] = lanes[lane];
    for (int half = Lanes / 2; half > 0; half /= 2)
      for (int lane = 0; lane < half; ++lane) sums[lane] = sums[lane] + sums[lane + half];
    return sums[0];
  }
  static constexpr int kReduceGroup = 1;
  static void reduce_group(const Vec (*)[Lanes], Scalar*) {}
};

// Lane `slice` of one depth step, widened; bf16 lane j is the pair (2j+1, 2j), odd part first.
template <typename T>
struct ScalarLoad {
  static constexpr int kParts = 1;
  static accum_t<T> load(const T* p, int slice, int) { return load_value(p[slice]); }
};

template <>
struct ScalarLoad<bfloat16> {
  static constexpr int kParts = 2;
  static float load(const bfloat16* p, int slice, int part) { return to_float(p[2 * slice + 1 - part]); }
};

template <typename T>
struct ScalarOps : ScalarLanes<accum_t<T>, std::is_same_v<T, double> ? 8 : 16>, ScalarLoad<T> {
  using Elem = T;
  using Operand = accum_t<T>;
  static constexpr int kRows = 2;
  static constexpr int kColsForRows[kRows] = {2, 2};
  static accum_t<T> madd(accum_t<T> acc, Operand a, Operand b) { return ScalarOps::fma(acc, a, b); }
};

}  // namespace

void tile_gemm_generic(const TileGemmArgs<float>& args) { detail::run_tile_gemm<ScalarOps<float>>(args); }
void tile_gemm_generic(const TileGemmArgs<double>& args) { detail::run_tile_gemm<ScalarOps<double>>(args); }
void tile_gemm_generic(const TileGemmArgs<bfloat16>& args) { detail::run_tile_gemm<ScalarOps<bfloat16>>(args); }
void tile_gemm_generic(const TileGemmArgs<float16>& args) { detail::run_tile_gemm<ScalarOps<float16>>(args); }

}  // namespace flashmoe::cpu
