// Storage types and the dtype codes shared by Python, the bindings and every backend.
// bf16/fp16 are stored as raw bits; arithmetic always happens in float (or double for f64).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FLASHMOE_HD __host__ __device__ __forceinline__
#else
#define FLASHMOE_HD inline
#endif

namespace flashmoe {

// The integer codes travel through the pybind11 boundary; keep them in sync with
// _DTYPE_CODES in python/flashmoe/ops.py.
enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2, f64 = 3 };

struct bfloat16 { uint16_t bits; };
struct float16 { uint16_t bits; };

FLASHMOE_HD uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

FLASHMOE_HD float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

FLASHMOE_HD float to_float(bfloat16 value) { return bits_float(uint32_t(value.bits) << 16); }

// Round to nearest even, as torch does; NaN stays a quiet NaN.
FLASHMOE_HD bfloat16 to_bfloat16(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bfloat16{uint16_t((bits >> 16) | 0x40u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bfloat16{uint16_t(bits >> 16)};
}

FLASHMOE_HD float to_float(float16 value) {
  const uint32_t sign = uint32_t(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1fu;
  uint32_t mantissa = value.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: normalize into a float exponent.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    return bits_float(sign | (uint32_t(127 - 15 + 1 - shift) << 23) | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

// Round to nearest even with overflow to infinity and gradual underflow, as torch does.
FLASHMOE_HD float16 to_float16(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return float16{uint16_t(sign | 0x7e00u)};
  if (abs_bits >= 0x477ff000u) return float16{uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (abs_bits < 0x38800000u) {                                          // below the smallest normal half
    if (abs_bits < 0x33000000u) return float16{sign};                    // rounds to zero
    // Half subnormal r * 2^-24 from a float mantissa m * 2^(e - 150): r = m >> (126 - e), rounded to even.
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t total_shift = 126u - exponent;
    uint32_t result = mantissa >> total_shift;
    const uint32_t remainder = mantissa & ((1u << total_shift) - 1u);
    const uint32_t halfway = 1u << (total_shift - 1u);
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return float16{uint16_t(sign | result)};
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return float16{uint16_t(sign | (((rounded >> 23) - 127 + 15) << 10) | ((rounded >> 13) & 0x3ffu))};
}

FLASHMOE_HD float to_float(float value) { return value; }
FLASHMOE_HD double to_float(double value) { return value; }

template <typename T>
FLASHMOE_HD T from_float(float value);
template <>
FLASHMOE_HD float from_float<float>(float value) { return value; }
template <>
FLASHMOE_HD bfloat16 from_float<bfloat16>(float value) { return to_bfloat16(value); }
template <>
FLASHMOE_HD float16 from_float<float16>(float value) { return to_float16(value); }

// Accumulator type: fp32 for every storage type but f64.
template <typename T>
using accum_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Storage type -> value type conversion used by generic code: accum_t<T> value = load(x).
template <typename T>
FLASHMOE_HD accum_t<T> load_value(T value) { return to_float(value); }

template <typename T>
FLASHMOE_HD T store_value(accum_t<T> value) {
  if constexpr (std::is_same_v<T, double>) {
    return value;
  } else {
    return from_float<T>(value);
  }
}

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, bfloat16>) return DType::bf16;
  else if constexpr (std::is_same_v<T, float16>) return DType::f16;
  else return DType::f64;
}

FLASHMOE_HD int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::f64: return 8;
  }
  return 0;
}

}  // namespace flashmoe
