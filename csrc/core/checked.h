// Overflow-checked size arithmetic. Every size and offset derived from user values (heap layout,
// workspace, task bound, capacities, buffers) is written once, as a template over its number type:
// int64_t in the hot paths, CheckedInt once per shape on the host, where an overflow becomes a
// SizeError naming the argument that caused it. A layout whose total was checked has every offset
// below it in range too: the formulas only add and multiply non-negative numbers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "core/dtype.h"

namespace flashmoe {

// An impossible size. pybind11 maps std::invalid_argument to Python's ValueError.
class SizeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A non-negative int64 that remembers whether any step of its computation left [0, INT64_MAX].
struct CheckedInt {
  int64_t value = 0;
  bool overflow = false;

  FLASHMOE_HD CheckedInt(int64_t v = 0) : value(v), overflow(v < 0) {}
  FLASHMOE_HD static CheckedInt invalid() {
    CheckedInt out;
    out.overflow = true;
    return out;
  }

  FLASHMOE_HD friend CheckedInt operator+(CheckedInt a, CheckedInt b) {
    if (a.overflow || b.overflow || a.value > INT64_MAX - b.value) return invalid();
    return CheckedInt(a.value + b.value);
  }
  FLASHMOE_HD friend CheckedInt operator-(CheckedInt a, CheckedInt b) {
    if (a.overflow || b.overflow || a.value < b.value) return invalid();
    return CheckedInt(a.value - b.value);
  }
  FLASHMOE_HD friend CheckedInt operator*(CheckedInt a, CheckedInt b) {
    if (a.overflow || b.overflow || (a.value != 0 && b.value > INT64_MAX / a.value)) return invalid();
    return CheckedInt(a.value * b.value);
  }
  FLASHMOE_HD friend CheckedInt operator/(CheckedInt a, CheckedInt b) {
    if (a.overflow || b.overflow || b.value == 0) return invalid();
    return CheckedInt(a.value / b.value);
  }
  // An overflowed value compares above every valid one, so a bound check can never pass it.
  FLASHMOE_HD friend bool operator<(CheckedInt a, CheckedInt b) {
    return b.overflow ? !a.overflow : !a.overflow && a.value < b.value;
  }
  FLASHMOE_HD friend bool operator>(CheckedInt a, CheckedInt b) { return b < a; }
};

// A parameter of type Number<N> does not take part in deduction: size functions run in int64_t
// unless called as f<CheckedInt>(...), whatever integer type the caller passes.
template <typename N>
struct NumberOf {
  using type = N;
};
template <typename N>
using Number = typename NumberOf<N>::type;

FLASHMOE_HD int64_t plain_value(int64_t n) { return n; }
FLASHMOE_HD int64_t plain_value(CheckedInt n) { return n.value; }

// (a + b - 1) / b for a >= 0, b >= 1, in either number type.
template <typename N>
FLASHMOE_HD N ceil_div_as(N a, N b) {
  return (a + (b - N(1))) / b;
}

// Throws SizeError unless `size` was computed without overflow and is at most `limit`.
// `argument` names what the user passed (max_tokens, hidden, ...), `quantity` what it sized.
inline int64_t require_size(CheckedInt size, const char* argument, int64_t argument_value, const char* quantity,
                            int64_t limit = INT64_MAX) {
  if (!size.overflow && size.value <= limit) return size.value;
  std::string message = std::string(argument) + " = " + std::to_string(argument_value) + " is too large: " + quantity;
  message += size.overflow ? " overflows int64" : " exceeds " + std::to_string(limit);
  throw SizeError(message);
}

}  // namespace flashmoe
