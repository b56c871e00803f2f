// Run-time ISA choice for the tile GEMM, and the entry point that applies it.
#include "cpu/tile_gemm.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "cpu/tile_gemm_blocking.h"
#include "cpu/tile_gemm_isa.h"

namespace flashmoe::cpu {
namespace {

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::avx512_bf16;
  if (avx512) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::avx2;
  }
#endif
  return Isa::generic;
}

Isa resolve_isa() {
  const Isa detected = detect_isa();
  const char* requested = std::getenv("FLASHMOE_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return detected;
  for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16}) {
    if (std::strcmp(requested, isa_name(isa)) == 0) return isa < detected ? isa : detected;
  }
  std::fprintf(stderr, "flashmoe: ignoring FLASHMOE_CPU_ISA=%s (expected generic, avx2, avx512 or avx512_bf16)\n",
               requested);
  return detected;
}

template <typename T>
void run_for_isa(Isa isa, const TileGemmArgs<T>& args) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::avx512_bf16:
      if constexpr (std::is_same_v<T, bfloat16>) return tile_gemm_avx512_bf16(args);
      return tile_gemm_avx512(args);
    case Isa::avx512: return tile_gemm_avx512(args);
    case Isa::avx2: return tile_gemm_avx2(args);
    case Isa::generic: break;
  }
#endif
  tile_gemm_generic(args);
}

}  // namespace

Isa active_isa() {
  static const Isa isa = resolve_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_bf16: return "avx512_bf16";
  }
  return "unknown";
}

template <typename T>
void tile_gemm_nt(const T* const* a_rows, int64_t m, const T* b, int64_t ldb, int64_t n_cols, int64_t depth,
                  accum_t<T>* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n_cols <= 0) return;
  if (depth <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t n = 0; n < n_cols; ++n) c[i * ldc + n] = 0;
    return;
  }
  const TileGemmArgs<T> args{a_rows, m, b, ldb, n_cols, depth, depth_chunk<T>(depth), c, ldc, accumulate};
  run_for_isa(active_isa(), args);
}

template void tile_gemm_nt<float>(const float* const*, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                                  int64_t, bool);
template void tile_gemm_nt<double>(const double* const*, int64_t, const double*, int64_t, int64_t, int64_t, double*,
                                   int64_t, bool);
template void tile_gemm_nt<bfloat16>(const bfloat16* const*, int64_t, const bfloat16*, int64_t, int64_t, int64_t,
                                     float*, int64_t, bool);
template void tile_gemm_nt<float16>(const float16* const*, int64_t, const float16*, int64_t, int64_t, int64_t,
                                    float*, int64_t, bool);

}  // namespace flashmoe::cpu
