// One 64×64 output tile of C = A·Bᵀ (both operands K-major, nn.Linear layout), optionally with a
// second B sharing the A tile (the gate and up halves of a GLU), fp32 accumulation.
//
// Operands stream through a two-stage cp.async pipeline into shared memory laid out as CuTe's
// 128-byte-swizzled K-major GMMA atoms, which both MMA paths read:
//   sm_90a: one warpgroup issues wgmma straight from shared memory;
//   sm_80:  four warps load fragments and issue mma.sync;
//   exact fp32 (either arch): four warps of SIMT FMAs.
// The K loop visits k-blocks in ascending order on every path, so an element's bits depend only
// on its own row and column: never on the tile it landed in, the CTA, or the grid size.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/dtype.h"
#include "cuda/platform.h"

#if defined(__CUDACC__)
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/arch/mma_sm90.hpp>
#endif

namespace flashmoe::cuda {

// How the expert and router GEMMs multiply: the shared-memory element the MMA reads.
enum class Math { bf16, f16, tf32, f32 };

#if defined(__CUDACC__)
template <Math M> struct MathTypes;
template <> struct MathTypes<Math::bf16> { using Smem = cute::bfloat16_t; using Raw = uint16_t; };
template <> struct MathTypes<Math::f16> { using Smem = cute::half_t; using Raw = uint16_t; };
template <> struct MathTypes<Math::tf32> { using Smem = cute::tfloat32_t; using Raw = uint32_t; };  // fp32 bits
template <> struct MathTypes<Math::f32> { using Smem = float; using Raw = uint32_t; };
#else
// The host emulation keeps the element sizes; it never touches CuTe.
template <Math M> struct MathTypes { using Smem = std::conditional_t<M == Math::bf16 || M == Math::f16, uint16_t, float>; };
#endif

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kStages = 2;
constexpr int kThreads = 128;       // one warpgroup per CTA
constexpr int kRowBytes = 128;      // one swizzle atom row: the k-block is 128 bytes of K
constexpr int kChunksPerRow = kRowBytes / 16;
constexpr int kOperandStageBytes = kTileM * kRowBytes;  // 8 KiB; kTileN == kTileM
constexpr int kOperandBytes = kStages * kOperandStageBytes;
constexpr int kSmemAlignment = 1024;  // a 128-byte swizzle atom spans 8 rows
constexpr int kTileSmemBytes = 3 * kOperandBytes;  // A, B0, B1

static_assert(kTileN == kTileM, "operands share one staging shape");

template <Math M> constexpr int tile_k() { return kRowBytes / int(sizeof(typename MathTypes<M>::Smem)); }

// Byte offset of unswizzled offset `linear` in a 1024-byte-aligned buffer under the 128-byte
// swizzle (CuTe's Swizzle<3,4,3> on byte addresses): the 16-byte chunk index (bits 4..6) is
// XORed with the row within the 8-row atom (bits 7..9). 16-byte chunks stay contiguous.
FLASHMOE_HD uint32_t swizzle128(uint32_t linear) { return linear ^ ((linear >> 3) & 0x70u); }

// A row-major [rows, K] operand in global memory: `rows` valid rows from `base`, `ld` elements apart;
// with `gather`, row r is row gather[r] of base (a cell's tokens read straight from x).
struct Operand {
  const void* base = nullptr;
  int64_t rows = 0;
  int64_t ld = 0;
  const int32_t* gather = nullptr;

  // Element offset of row `row` (< rows) from base.
  FLASHMOE_HD int64_t row_offset(int64_t row) const { return (gather ? int64_t(gather[row]) : row) * ld; }
};

#if defined(__CUDACC__)

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void cp_async_16(uint32_t destination, const void* source, uint32_t source_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" : : "r"(destination), "l"(source), "r"(source_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" : : : "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" : : "n"(Pending) : "memory"); }

// Whether an operand can move in 16-byte chunks: aligned base, and rows and K whole chunks.
template <typename Raw>
__device__ __forceinline__ bool chunked(const Operand& operand, int64_t K) {
  constexpr int64_t kVector = 16 / sizeof(Raw);
  return (reinterpret_cast<uintptr_t>(operand.base) & 15) == 0 && operand.ld % kVector == 0 && K % kVector == 0;
}

// Stages k-block [k0, k0 + tile_k) of rows [0, 64) into one swizzled stage; rows past
// operand.rows and columns past K read as zero.
template <typename Raw>
__device__ __forceinline__ void stage_operand(uint8_t* stage, const Operand& operand, int64_t k0, int64_t K,
                                              bool vector) {
  constexpr int kVector = 16 / sizeof(Raw);
  const Raw* base = static_cast<const Raw*>(operand.base);
  const uint32_t stage_address = smem_address(stage);
  for (int chunk = threadIdx.x; chunk < kTileM * kChunksPerRow; chunk += kThreads) {
    const int row = chunk / kChunksPerRow;
    const int column = chunk % kChunksPerRow;
    const int64_t k = k0 + int64_t(column) * kVector;
    const uint32_t destination = stage_address + swizzle128(uint32_t(row * kRowBytes + column * 16));
    if (vector) {
      const bool inside = row < operand.rows && k < K;
      const Raw* source = inside ? base + operand.row_offset(row) + k : base;
      cp_async_16(destination, source, inside ? 16u : 0u);
    } else {
      alignas(16) Raw values[kVector];
      const int64_t offset = row < operand.rows ? operand.row_offset(row) : 0;
#pragma unroll
      for (int i = 0; i < kVector; ++i) {
        values[i] = (row < operand.rows && k + i < K) ? base[offset + k + i] : Raw(0);
      }
      const uint4 packed = *reinterpret_cast<const uint4*>(values);
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" : : "r"(destination), "r"(packed.x), "r"(packed.y),
                   "r"(packed.z), "r"(packed.w) : "memory");
    }
  }
}

// The MMA of each path, over a (64, 64, tile_k) block.
template <Math M>
__device__ __forceinline__ auto make_tile_mma() {
  using namespace cute;
  using Smem = typename MathTypes<M>::Smem;
  if constexpr (M == Math::f32) {
    return make_tiled_mma(UniversalFMA<float, float, float>{}, Layout<Shape<_16, _8, _1>>{});
  } else {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    return make_tiled_mma(GMMA::ss_op_selector<Smem, Smem, float, Shape<_64, _64, Int<tile_k<M>()>>,
                                               GMMA::Major::K, GMMA::Major::K>());
#else
    if constexpr (M == Math::bf16) {
      return make_tiled_mma(SM80_16x8x16_F32BF16BF16F32_TN{}, Layout<Shape<_2, _2, _1>>{});
    } else if constexpr (M == Math::f16) {
      return make_tiled_mma(SM80_16x8x16_F32F16F16F32_TN{}, Layout<Shape<_2, _2, _1>>{});
    } else {
      return make_tiled_mma(SM80_16x8x8_F32TF32TF32F32_TN{}, Layout<Shape<_2, _2, _1>>{});
    }
#endif
  }
}

template <Math M>
constexpr bool uses_wgmma() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  return M != Math::f32;
#else
  return false;
#endif
}

// C tile = A[0:64, :K] · B0[0:64, :K]ᵀ (and · B1ᵀ when Pair); then epilogue(m, n, c0, c1) once per
// element of the 64×64 tile (m, n local; the caller bounds-checks). `smem`: kTileSmemBytes,
// 1024-byte aligned. Every thread of the CTA calls this; it begins and ends with a barrier.
template <Math M, bool Pair, typename Epilogue>
__device__ __forceinline__ void gemm_tile(uint8_t* smem, const Operand& a, const Operand& b0, const Operand& b1,
                                          int64_t K, Epilogue&& epilogue) {
  using namespace cute;
  using Smem = typename MathTypes<M>::Smem;
  using Raw = typename MathTypes<M>::Raw;
  constexpr int kTileK = tile_k<M>();
  using SmemLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Smem>{},
                                            Shape<Int<kTileM>, Int<kTileK>, Int<kStages>>{}));

  uint8_t* const a_smem = smem;
  uint8_t* const b0_smem = smem + kOperandBytes;
  uint8_t* const b1_smem = smem + 2 * kOperandBytes;
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<Smem*>(a_smem)), SmemLayout{});
  Tensor sB0 = make_tensor(make_smem_ptr(reinterpret_cast<Smem*>(b0_smem)), SmemLayout{});
  Tensor sB1 = make_tensor(make_smem_ptr(reinterpret_cast<Smem*>(b1_smem)), SmemLayout{});

  auto tiled_mma = make_tile_mma<M>();
  auto thread_mma = tiled_mma.get_thread_slice(threadIdx.x);
  Tensor coordinates = make_identity_tensor(Shape<Int<kTileM>, Int<kTileN>>{});
  Tensor thread_coordinates = thread_mma.partition_C(coordinates);
  Tensor acc0 = thread_mma.make_fragment_C(thread_coordinates);
  Tensor acc1 = thread_mma.make_fragment_C(thread_coordinates);
  clear(acc0);
  clear(acc1);

  const bool a_vector = chunked<Raw>(a, K);
  const bool b0_vector = chunked<Raw>(b0, K);
  const bool b1_vector = Pair && chunked<Raw>(b1, K);
  const int64_t k_blocks = (K + kTileK - 1) / kTileK;
  auto stage_k_block = [&](int64_t k_block) {
    const int stage = int(k_block % kStages);
    const int64_t k0 = k_block * kTileK;
    stage_operand<Raw>(a_smem + stage * kOperandStageBytes, a, k0, K, a_vector);
    stage_operand<Raw>(b0_smem + stage * kOperandStageBytes, b0, k0, K, b0_vector);
    if constexpr (Pair) stage_operand<Raw>(b1_smem + stage * kOperandStageBytes, b1, k0, K, b1_vector);
    cp_async_commit();
  };

  __syncthreads();  // the previous user of this shared memory is done with it
  stage_k_block(0);
  for (int64_t k_block = 0; k_block < k_blocks; ++k_block) {
    const int stage = int(k_block % kStages);
    if (k_block + 1 < k_blocks) {
      stage_k_block(k_block + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (uses_wgmma<M>()) {
      // wgmma reads shared memory through the async proxy; the stage was written through the
      // generic one (cp.async, st.shared), so each writer fences before the barrier.
      asm volatile("fence.proxy.async.shared::cta;\n" : : : "memory");
    }
    __syncthreads();
    if constexpr (uses_wgmma<M>()) {
      Tensor tCsA = thread_mma.partition_A(sA);
      Tensor tCsB0 = thread_mma.partition_B(sB0);
      Tensor tCsB1 = thread_mma.partition_B(sB1);
      Tensor tCrA = thread_mma.make_fragment_A(tCsA);
      Tensor tCrB0 = thread_mma.make_fragment_B(tCsB0);
      Tensor tCrB1 = thread_mma.make_fragment_B(tCsB1);
      warpgroup_fence_operand(acc0);
      if constexpr (Pair) warpgroup_fence_operand(acc1);
      warpgroup_arrive();
      cute::gemm(tiled_mma, tCrA(_, _, _, stage), tCrB0(_, _, _, stage), acc0);
      if constexpr (Pair) cute::gemm(tiled_mma, tCrA(_, _, _, stage), tCrB1(_, _, _, stage), acc1);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc0);
      if constexpr (Pair) warpgroup_fence_operand(acc1);
    } else {
      Tensor tCsA = thread_mma.partition_A(sA(_, _, stage));
      Tensor tCsB0 = thread_mma.partition_B(sB0(_, _, stage));
      Tensor tCsB1 = thread_mma.partition_B(sB1(_, _, stage));
      // One k-slice of fragments at a time, not unrolled: registers hold a slice, and smem
      // addresses are recomputed per slice instead of being hoisted for the whole k-block.
      Tensor tCrA = make_fragment_like(tCsA(_, _, 0));
      Tensor tCrB0 = make_fragment_like(tCsB0(_, _, 0));
      Tensor tCrB1 = make_fragment_like(tCsB1(_, _, 0));
#pragma unroll 1
      for (int kk = 0; kk < size<2>(tCsA); ++kk) {
        copy(tCsA(_, _, kk), tCrA);
        copy(tCsB0(_, _, kk), tCrB0);
        cute::gemm(tiled_mma, tCrA, tCrB0, acc0);
        if constexpr (Pair) {
          copy(tCsB1(_, _, kk), tCrB1);
          cute::gemm(tiled_mma, tCrA, tCrB1, acc1);
        }
      }
    }
    __syncthreads();  // this stage is refilled two k-blocks later
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc0); ++i) {
    const auto coordinate = thread_coordinates(i);
    epilogue(int(get<0>(coordinate)), int(get<1>(coordinate)), acc0(i), Pair ? acc1(i) : 0.0f);
  }
}

#else  // host emulation

template <Math M>
float host_operand(const Operand& operand, int64_t row, int64_t k) {
  const int64_t at = operand.row_offset(row) + k;
  if constexpr (M == Math::bf16) return to_float(static_cast<const bfloat16*>(operand.base)[at]);
  else if constexpr (M == Math::f16) return to_float(static_cast<const float16*>(operand.base)[at]);
  else return static_cast<const float*>(operand.base)[at];
}

// The same contract as the GPU's gemm_tile, as a plain loop: every element of the 64×64 tile
// goes to the epilogue once, rows and columns past the operands as zeros.
template <Math M, bool Pair, typename Epilogue>
void gemm_tile(uint8_t*, const Operand& a, const Operand& b0, const Operand& b1, int64_t K, Epilogue&& epilogue) {
  __syncthreads();
  for (int i = int(threadIdx.x); i < kTileM * kTileN; i += kThreads) {
    const int m = i / kTileN, n = i % kTileN;
    float c0 = 0.0f, c1 = 0.0f;
    if (m < a.rows && n < b0.rows) {
      for (int64_t k = 0; k < K; ++k) {
        const float x = host_operand<M>(a, m, k);
        c0 += x * host_operand<M>(b0, n, k);
        if (Pair) c1 += x * host_operand<M>(b1, n, k);
      }
    }
    epilogue(m, n, c0, c1);
  }
  __syncthreads();
}

#endif

}  // namespace flashmoe::cuda
