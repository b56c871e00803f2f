// The tile GEMM for bf16 on CPUs with AVX512_BF16: vdpbf16ps multiplies and adds a bf16 pair
// per lane in one instruction, twice the work of an fp32 FMA.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "cpu/tile_gemm_kernel.h"
#include "cpu/tile_gemm_zmm.h"

namespace flashmoe::cpu {
namespace {

// vdpbf16ps adds a lane's odd product and then its even one, the bf16 lane order of
// tile_gemm_blocking.h; bf16 products are exact in fp32, so it matches the FMA path of the other
// ISAs bit for bit, except that it flushes subnormals to zero.
struct ZmmBf16DotOps : ZmmFloatLanes {
  using Elem = bfloat16;
  using Operand = __m512bh;
  static constexpr int kParts = 1;
  static constexpr int kRows = 6;
  static constexpr int kColsForRows[kRows] = {8, 8, 7, 6, 5, 4};
  static Operand load(const bfloat16* p, int, int) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec madd(Vec acc, Operand a, Operand b) { return _mm512_dpbf16_ps(acc, a, b); }
};

}  // namespace

void tile_gemm_avx512_bf16(const TileGemmArgs<bfloat16>& args) { detail::run_tile_gemm<ZmmBf16DotOps>(args); }

}  // namespace flashmoe::cpu

#pragma GCC pop_options

#endif  // defined(__x86_64__)
