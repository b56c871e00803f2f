// The dtype of tensors in global memory, and its fp32 conversions (round to nearest even).
#pragma once

#include "core/dtype.h"
#include "cuda/tile_mma.cuh"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace flashmoe::cuda {

template <Math M> struct Storage;

#if defined(__CUDACC__)

template <> struct Storage<Math::bf16> {
  using Type = __nv_bfloat16;
  FLASHMOE_DEVICE static float load(Type value) { return __bfloat162float(value); }
  FLASHMOE_DEVICE static Type store(float value) { return __float2bfloat16_rn(value); }
};
template <> struct Storage<Math::f16> {
  using Type = __half;
  FLASHMOE_DEVICE static float load(Type value) { return __half2float(value); }
  FLASHMOE_DEVICE static Type store(float value) { return __float2half_rn(value); }
};
#else  // host emulation: the torch-exact conversions of core/dtype.h
template <> struct Storage<Math::bf16> {
  using Type = bfloat16;
  static float load(Type value) { return to_float(value); }
  static Type store(float value) { return to_bfloat16(value); }
};
template <> struct Storage<Math::f16> {
  using Type = float16;
  static float load(Type value) { return to_float(value); }
  static Type store(float value) { return to_float16(value); }
};
#endif

template <Math M> struct FloatStorage {
  using Type = float;
  FLASHMOE_DEVICE static float load(Type value) { return value; }
  FLASHMOE_DEVICE static Type store(float value) { return value; }
};
template <> struct Storage<Math::tf32> : FloatStorage<Math::tf32> {};
template <> struct Storage<Math::f32> : FloatStorage<Math::f32> {};

}  // namespace flashmoe::cuda
