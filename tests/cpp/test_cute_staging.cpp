// The CUDA kernel stages operands with its own 16-byte copies (csrc/cuda/tile_mma.cuh:
// swizzle128) into shared memory that the MMA reads through CuTe's 128-byte-swizzled K-major GMMA
// layout. This host program checks that the two agree on every element, for every element type
// the kernel stages: the physical byte of (m, k, stage) under CuTe's layout equals
// stage * 8 KiB + swizzle128(m * 128 + k * sizeof(element)).
//
//   g++ -O1 -std=c++17 -Icsrc -I<site-packages>/cutlass_library/source/include \
//       tests/cpp/test_cute_staging.cpp -o /tmp/test_cute_staging && /tmp/test_cute_staging
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "cuda/tile_mma.cuh"

namespace {

template <typename T>
int check(const char* name) {
  using namespace cute;
  constexpr int kTileK = flashmoe::cuda::kRowBytes / int(sizeof(T));
  using SmemLayout = decltype(tile_to_shape(SM90::GMMA::Layout_K_SW128_Atom<T>{},
                                            Shape<Int<flashmoe::cuda::kTileM>, Int<kTileK>, Int<2>>{}));
  static_assert(cosize(SmemLayout{}) * sizeof(T) == 2 * flashmoe::cuda::kOperandStageBytes, "two 8 KiB stages");
  void* buffer = std::aligned_alloc(flashmoe::cuda::kSmemAlignment, 2 * flashmoe::cuda::kOperandStageBytes);
  Tensor staged = make_tensor(make_smem_ptr(static_cast<T*>(buffer)), SmemLayout{});
  int failures = 0, checks = 0;
  for (int stage = 0; stage < 2; ++stage) {
    for (int m = 0; m < flashmoe::cuda::kTileM; ++m) {
      for (int k = 0; k < kTileK; ++k) {
        const auto physical = reinterpret_cast<const char*>(&staged(m, k, stage)) - static_cast<const char*>(buffer);
        const auto expected = stage * flashmoe::cuda::kOperandStageBytes +
                              flashmoe::cuda::swizzle128(uint32_t(m * flashmoe::cuda::kRowBytes + k * int(sizeof(T))));
        ++checks;
        if (physical != expected && failures++ < 5) {
          std::printf("FAIL %s (m=%d, k=%d, stage=%d): CuTe byte %ld, staging byte %ld\n", name, m, k, stage,
                      long(physical), long(expected));
        }
      }
    }
  }
  std::free(buffer);
  std::printf("  %s: %d elements\n", name, checks);
  return failures;
}

}  // namespace

int main() {
  int failures = 0;
  failures += check<cute::bfloat16_t>("bf16");
  failures += check<cute::half_t>("f16");
  failures += check<cute::tfloat32_t>("tf32");
  failures += check<float>("f32");
  std::printf("cute_staging: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
