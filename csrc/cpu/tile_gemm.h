// The CPU tile GEMM: C = A · Bᵀ with both operands in nn.Linear layout (contiguous along depth).
//
// Every MoE GEMM has this shape: A is a set of gathered activation rows, B is one expert's
// weight matrix [out, in]. Because both operands are contiguous along the reduction axis,
// the kernel needs no packing of the weights, so a decode step streams each weight byte once.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace flashmoe::cpu {

// Ordered tiers: each includes the ones below it. avx512_bf16 adds vdpbf16ps for bf16 operands.
enum class Isa : int32_t { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The best instruction set this process may use: detected once, overridable with the
// environment variable FLASHMOE_CPU_ISA=generic|avx2|avx512|avx512_bf16 (clamped to what the CPU has).
// Every tier gives bit-identical results, except that avx512_bf16 flushes bf16 subnormals to zero.
Isa active_isa();
const char* isa_name(Isa isa);

// c[i * ldc + n] (+)= sum_k a_rows[i][k] * b[n * ldb + k],  0 <= i < m, 0 <= n < n_cols, 0 <= k < depth.
//
// Determinism contract (the operator's bit-reproducibility rests on it):
// - the arithmetic producing c[i][n] depends only on row a_rows[i], row n of b and depth;
//   never on m, on i, on which other rows share the call, or on the thread that runs it;
// - so a token's result is the same whether it is computed alone or in a batch.
// With accumulate=false c is overwritten; with accumulate=true the new sum is added to c.
// Depth is summed in chunks that depend on depth alone (depth_chunk, tile_gemm_blocking.h), each
// added to c with one rounding; callers may split depth further with accumulate=true.
template <typename T>
void tile_gemm_nt(const T* const* a_rows, int64_t m, const T* b, int64_t ldb, int64_t n_cols,
                  int64_t depth, accum_t<T>* c, int64_t ldc, bool accumulate);

}  // namespace flashmoe::cpu
