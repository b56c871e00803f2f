// Standalone test of the CPU tile GEMM (csrc/cpu/tile_gemm*.{h,cpp}): accuracy against a long-double
// reference, the determinism contract (batch invariance, bit-identical ISAs), NaN propagation.
//
// Build and run from the repository root:
//   g++ -O3 -std=c++17 -Wall -Wextra -Icsrc tests/cpp/test_tile_gemm.cpp csrc/cpu/tile_gemm*.cpp -o /tmp/test_tile_gemm
//   /tmp/test_tile_gemm
// It exits non-zero on any failure. Run without FLASHMOE_CPU_ISA, it also re-runs itself once under
// each FLASHMOE_CPU_ISA value and checks that the override took effect (clamped to this CPU).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cpu/tile_gemm.h"
#include "cpu/tile_gemm_blocking.h"
#include "cpu/tile_gemm_isa.h"

namespace {

using namespace flashmoe;
using namespace flashmoe::cpu;

int g_failures = 0;
int g_checks = 0;

#define CHECK(condition, ...)                                         \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(condition)) {                                               \
      if (++g_failures <= 40) {                                       \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
        std::fprintf(stderr, __VA_ARGS__);                            \
        std::fprintf(stderr, "\n");                                   \
      }                                                               \
    }                                                                 \
  } while (0)

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, double>) return "f64";
  else if constexpr (std::is_same_v<T, bfloat16>) return "bf16";
  else return "f16";
}

template <typename T>
T make_value(double value) {
  if constexpr (std::is_same_v<T, double>) return value;
  else return from_float<T>(float(value));
}

template <typename T>
long double widen(T value) {
  return (long double)load_value(value);
}

template <typename T>
using Acc = accum_t<T>;

template <typename T>
using GemmFn = std::function<void(const T* const*, int64_t, const T*, int64_t, int64_t, int64_t, Acc<T>*, int64_t, bool)>;

// Operands laid out the way the MoE gathers them: A rows at irregular, unaligned offsets; B with a
// padded leading dimension.
template <typename T>
struct Problem {
  int64_t m, n, depth, ldb;
  std::vector<T> a_storage;
  std::vector<const T*> a_rows;
  std::vector<T> b;

  Problem(int64_t m_, int64_t n_, int64_t depth_, uint64_t seed) : m(m_), n(n_), depth(depth_) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uniform(-1.0, 1.0);
    ldb = depth + int64_t(seed % 3);
    std::vector<int64_t> offsets(m);
    int64_t size = 0;
    for (int64_t i = 0; i < m; ++i) {
      size += 1 + (i * 7 + int64_t(seed)) % 5;
      offsets[i] = size;
      size += depth;
    }
    a_storage.resize(size);  // exact, so the sanitizers see any read past a row
    for (T& value : a_storage) value = make_value<T>(uniform(rng));
    for (int64_t i = 0; i < m; ++i) a_rows.push_back(a_storage.data() + offsets[i]);
    b.resize((n - 1) * ldb + depth);
    for (T& value : b) value = make_value<T>(uniform(rng));
  }

  T* a_mut(int64_t i) { return const_cast<T*>(a_rows[i]); }
};

template <typename T>
std::vector<Acc<T>> run(const GemmFn<T>& gemm, const Problem<T>& p, bool accumulate, const std::vector<Acc<T>>& c0,
                        int64_t ldc) {
  std::vector<Acc<T>> c = c0;
  gemm(p.a_rows.data(), p.m, p.b.data(), p.ldb, p.n, p.depth, c.data(), ldc, accumulate);
  return c;
}

template <typename T>
bool same_bits(Acc<T> x, Acc<T> y) {
  return std::memcmp(&x, &y, sizeof(x)) == 0;
}

template <typename T>
GemmFn<T> public_gemm() {
  return [](const T* const* a, int64_t m, const T* b, int64_t ldb, int64_t n, int64_t depth, Acc<T>* c, int64_t ldc,
            bool accumulate) { tile_gemm_nt<T>(a, m, b, ldb, n, depth, c, ldc, accumulate); };
}

// Every ISA entry point this CPU can run, called directly (bypassing the process-wide choice).
template <typename T>
std::vector<std::pair<std::string, GemmFn<T>>> isa_gemms() {
  using Entry = void (*)(const TileGemmArgs<T>&);
  std::vector<std::pair<std::string, Entry>> entries = {{"generic", &tile_gemm_generic}};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx2) entries.push_back({"avx2", &tile_gemm_avx2});
  if (avx512) entries.push_back({"avx512", &tile_gemm_avx512});
  if constexpr (std::is_same_v<T, bfloat16>) {
    if (avx512 && __builtin_cpu_supports("avx512bf16")) entries.push_back({"avx512_bf16", &tile_gemm_avx512_bf16});
  }
#endif
  std::vector<std::pair<std::string, GemmFn<T>>> gemms;
  for (auto& [name, entry] : entries) {
    gemms.push_back({name, [entry](const T* const* a, int64_t m, const T* b, int64_t ldb, int64_t n, int64_t depth,
                                   Acc<T>* c, int64_t ldc, bool accumulate) {
                       entry(TileGemmArgs<T>{a, m, b, ldb, n, depth, depth_chunk<T>(depth), c, ldc, accumulate});
                     }});
  }
  return gemms;
}

// |c - ref| <= 2 L u sum|a b| (+ u |c0|): the forward error bound of a length-L FMA recurrence,
// L = per-lane steps + the halving tree + one add per chunk.
template <typename T>
void check_accuracy(const Problem<T>& p, const std::vector<Acc<T>>& c, const std::vector<Acc<T>>& c0, int64_t ldc,
                    bool accumulate, const char* what) {
  const long double unit = std::numeric_limits<Acc<T>>::epsilon() / 2;
  const int64_t lanes = std::is_same_v<T, double> ? 8 : 16;
  const int64_t chunk = depth_chunk<T>(p.depth);
  const int64_t chunks = (p.depth + chunk - 1) / chunk;
  const long double length = (long double)((p.depth + lanes - 1) / lanes + 4 + chunks + 1);
  // Normwise error relative to sum |a b|, which (unlike |ref|) does not blow up where a dot product cancels.
  long double err2 = 0, magnitude2 = 0;
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t n = 0; n < p.n; ++n) {
      long double ref = 0, magnitude = 0;
      for (int64_t k = 0; k < p.depth; ++k) {
        const long double product = widen(p.a_rows[i][k]) * widen(p.b[n * p.ldb + k]);
        ref += product;
        magnitude += std::fabs(product);
      }
      long double bound = 2 * length * unit * magnitude;
      if (accumulate) {
        ref += c0[i * ldc + n];
        bound += 2 * unit * std::fabs((long double)c0[i * ldc + n]);
      }
      const long double error = std::fabs((long double)c[i * ldc + n] - ref);
      CHECK(error <= bound, "%s %s m=%ld n=%ld depth=%ld acc=%d c[%ld][%ld]=%.9Lg ref=%.9Lg err=%.3Lg bound=%.3Lg",
            type_name<T>(), what, long(p.m), long(p.n), long(p.depth), int(accumulate), long(i), long(n),
            (long double)c[i * ldc + n], ref, error, bound);
      err2 += error * error;
      magnitude2 += magnitude * magnitude;
    }
  }
  const long double relative = magnitude2 > 0 ? std::sqrt(err2 / magnitude2) : std::sqrt(err2);
  const long double budget = std::is_same_v<T, double> ? 1e-14L : 1e-6L;
  CHECK(relative <= budget, "%s %s m=%ld n=%ld depth=%ld: relative error %.3Lg > %.3Lg", type_name<T>(), what,
        long(p.m), long(p.n), long(p.depth), relative, budget);
}

template <typename T>
std::vector<Acc<T>> random_c(int64_t m, int64_t ldc, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(-4.0, 4.0);
  std::vector<Acc<T>> c(m * ldc);
  for (auto& value : c) value = Acc<T>(uniform(rng));
  return c;
}

template <typename T>
void test_accuracy(const GemmFn<T>& gemm) {
  const int64_t sizes[] = {1, 3, 5, 17, 33};
  const int64_t depths[] = {1, 3, 5, 17, 33, 257, 1000, 2049};
  uint64_t seed = 1;
  for (int64_t m : sizes)
    for (int64_t n : sizes)
      for (int64_t depth : depths) {
        const Problem<T> p(m, n, depth, ++seed);
        const int64_t ldc = n + int64_t(seed % 2);
        const std::vector<Acc<T>> c0 = random_c<T>(m, ldc, seed);
        for (bool accumulate : {false, true}) {
          const auto c = run(gemm, p, accumulate, c0, ldc);
          check_accuracy(p, c, c0, ldc, accumulate, "grid");
        }
      }
  // Several depth chunks, and their rounded-up lengths, for every type.
  const int64_t large[][3] = {{33, 257, 4099}, {17, 64, 1025}, {6, 40, 8192 + 33}, {4, 12, 2048}};
  for (const auto& shape : large) {
    const Problem<T> p(shape[0], shape[1], shape[2], ++seed);
    const std::vector<Acc<T>> c0 = random_c<T>(p.m, p.n, seed);
    for (bool accumulate : {false, true}) check_accuracy(p, run(gemm, p, accumulate, c0, p.n), c0, p.n, accumulate, "large");
  }
}

// A row's result is the same alone, in any batch, in any order, with any neighbouring columns.
template <typename T>
void test_batch_invariance(const GemmFn<T>& gemm) {
  // Both panel orders (up to 18 rows streams B; more sweeps it) and several column blocks.
  const int64_t shapes[][3] = {{33, 37, 1000}, {17, 13, 2049}, {9, 31, 4099}, {7, 7, 33}, {13, 19, 5},
                               {40, 300, 1500}};
  uint64_t seed = 100;
  for (const auto& shape : shapes) {
    Problem<T> p(shape[0], shape[1], shape[2], ++seed);
    const int64_t m = p.m, n = p.n, depth = p.depth;
    for (bool accumulate : {false, true}) {
      const std::vector<Acc<T>> c0 = random_c<T>(m, n, seed);
      const auto batch = run(gemm, p, accumulate, c0, n);
      // Each row alone.
      for (int64_t i = 0; i < m; ++i) {
        std::vector<Acc<T>> alone(c0.begin() + i * n, c0.begin() + (i + 1) * n);
        gemm(&p.a_rows[i], 1, p.b.data(), p.ldb, n, depth, alone.data(), n, accumulate);
        for (int64_t col = 0; col < n; ++col)
          CHECK(same_bits<T>(alone[col], batch[i * n + col]), "%s row %ld alone differs at col %ld (m=%ld n=%ld d=%ld)",
                type_name<T>(), long(i), long(col), long(m), long(n), long(depth));
      }
      // Shuffled rows in random groups.
      std::mt19937_64 rng(seed);
      std::vector<int64_t> order(m);
      for (int64_t i = 0; i < m; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t begin = 0; begin < m;) {
        const int64_t group = std::min<int64_t>(m - begin, 1 + int64_t(rng() % 7));
        std::vector<const T*> rows;
        std::vector<Acc<T>> out;
        for (int64_t g = 0; g < group; ++g) {
          rows.push_back(p.a_rows[order[begin + g]]);
          out.insert(out.end(), c0.begin() + order[begin + g] * n, c0.begin() + (order[begin + g] + 1) * n);
        }
        gemm(rows.data(), group, p.b.data(), p.ldb, n, depth, out.data(), n, accumulate);
        for (int64_t g = 0; g < group; ++g)
          for (int64_t col = 0; col < n; ++col)
            CHECK(same_bits<T>(out[g * n + col], batch[order[begin + g] * n + col]),
                  "%s grouped row %ld differs at col %ld", type_name<T>(), long(order[begin + g]), long(col));
        begin += group;
      }
      // A window of columns.
      const int64_t col_begin = n / 3, cols = std::max<int64_t>(1, n / 2);
      std::vector<Acc<T>> window(m * cols);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t col = 0; col < cols; ++col) window[i * cols + col] = c0[i * n + col_begin + col];
      gemm(p.a_rows.data(), m, p.b.data() + col_begin * p.ldb, p.ldb, cols, depth, window.data(), cols, accumulate);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t col = 0; col < cols; ++col)
          CHECK(same_bits<T>(window[i * cols + col], batch[i * n + col_begin + col]),
                "%s column window differs at [%ld][%ld]", type_name<T>(), long(i), long(col_begin + col));
    }
    // With one depth chunk, accumulate adds exactly the overwrite result.
    if (depth_chunk<T>(depth) == depth) {
      const std::vector<Acc<T>> c0 = random_c<T>(m, n, seed + 1);
      const auto fresh = run(gemm, p, false, c0, n);
      const auto added = run(gemm, p, true, c0, n);
      for (int64_t index = 0; index < m * n; ++index)
        CHECK(same_bits<T>(added[index], Acc<T>(c0[index] + fresh[index])), "%s accumulate != c0 + sum at %ld",
              type_name<T>(), long(index));
    }
  }
}

// Every ISA gives the same bits as the generic path (inputs have no bf16 subnormals).
template <typename T>
void test_isas_agree() {
  const auto gemms = isa_gemms<T>();
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 17}, {5, 17, 33}, {17, 33, 257}, {33, 13, 1000}, {7, 29, 2049},
                               {4, 6, 4099}, {2, 3, 31}, {9, 11, 8192 + 1}};
  uint64_t seed = 300;
  for (const auto& shape : shapes) {
    const Problem<T> p(shape[0], shape[1], shape[2], ++seed);
    for (bool accumulate : {false, true}) {
      const std::vector<Acc<T>> c0 = random_c<T>(p.m, p.n, seed);
      const auto expected = run(gemms[0].second, p, accumulate, c0, p.n);
      for (size_t g = 1; g < gemms.size(); ++g) {
        const auto got = run(gemms[g].second, p, accumulate, c0, p.n);
        int64_t mismatches = 0;
        for (int64_t index = 0; index < p.m * p.n; ++index) mismatches += !same_bits<T>(got[index], expected[index]);
        CHECK(mismatches == 0, "%s %s differs from generic in %ld of %ld outputs (m=%ld n=%ld depth=%ld acc=%d)",
              type_name<T>(), gemms[g].first.c_str(), long(mismatches), long(p.m * p.n), long(p.m), long(p.n),
              long(p.depth), int(accumulate));
      }
    }
  }
}

// A NaN (or inf * 0) anywhere in a row or column makes exactly that row or column NaN.
template <typename T>
void test_nan(const GemmFn<T>& gemm) {
  const T nan = make_value<T>(std::numeric_limits<double>::quiet_NaN());
  const T inf = make_value<T>(std::numeric_limits<double>::infinity());
  const T zero = make_value<T>(0.0);
  const int64_t depths[] = {1, 17, 33, 1000, 2049, 4099};
  uint64_t seed = 500;
  for (int64_t depth : depths) {
    for (int64_t k : {int64_t(0), depth / 2, depth - 1}) {
      for (int variant = 0; variant < 3; ++variant) {
        Problem<T> p(7, 9, depth, ++seed);
        const int64_t bad_row = 3, bad_col = 5;
        if (variant == 0) p.a_mut(bad_row)[k] = nan;
        if (variant == 1) p.b[bad_col * p.ldb + k] = nan;
        if (variant == 2) {  // inf * 0 = NaN
          p.a_mut(bad_row)[k] = inf;
          p.b[bad_col * p.ldb + k] = zero;
        }
        const std::vector<Acc<T>> c0(p.m * p.n, Acc<T>(1));
        const auto c = run(gemm, p, true, c0, p.n);
        for (int64_t i = 0; i < p.m; ++i)
          for (int64_t col = 0; col < p.n; ++col) {
            const bool expect_nan = variant == 0 ? i == bad_row : variant == 1 ? col == bad_col : (i == bad_row && col == bad_col);
            const Acc<T> value = c[i * p.n + col];
            CHECK(std::isnan(value) == expect_nan, "%s NaN variant %d depth=%ld k=%ld: c[%ld][%ld]=%g", type_name<T>(),
                  variant, long(depth), long(k), long(i), long(col), double(value));
          }
      }
    }
  }
}

template <typename T>
void test_empty(const GemmFn<T>& gemm) {
  Problem<T> p(3, 4, 5, 900);
  std::vector<Acc<T>> c(12, Acc<T>(7));
  gemm(p.a_rows.data(), 3, p.b.data(), p.ldb, 4, 0, c.data(), 4, true);
  CHECK(std::all_of(c.begin(), c.end(), [](Acc<T> v) { return v == 7; }), "%s depth 0 accumulate changed c", type_name<T>());
  gemm(p.a_rows.data(), 3, p.b.data(), p.ldb, 4, 0, c.data(), 4, false);
  CHECK(std::all_of(c.begin(), c.end(), [](Acc<T> v) { return v == 0; }), "%s depth 0 did not zero c", type_name<T>());
  gemm(p.a_rows.data(), 0, p.b.data(), p.ldb, 4, 5, nullptr, 4, false);
  gemm(p.a_rows.data(), 3, p.b.data(), p.ldb, 0, 5, nullptr, 4, false);
}

template <typename T>
void test_depth_chunk() {
  for (int64_t depth = 1; depth < 20000; depth += 1 + depth / 7) {
    const int64_t chunk = depth_chunk<T>(depth);
    const int64_t chunks = (depth + chunk - 1) / chunk;
    CHECK(chunk <= kMaxDepthChunk<T> || chunk == depth, "%s chunk %ld too long", type_name<T>(), long(chunk));
    CHECK(chunk == depth || chunk % kDepthStep<T> == 0, "%s chunk %ld not whole steps", type_name<T>(), long(chunk));
    CHECK(chunks == (depth + kMaxDepthChunk<T> - 1) / kMaxDepthChunk<T>, "%s depth %ld: %ld chunks", type_name<T>(),
          long(depth), long(chunks));
  }
}

template <typename T>
void test_type() {
  const GemmFn<T> gemm = public_gemm<T>();
  const int before = g_failures;
  test_depth_chunk<T>();
  test_accuracy<T>(gemm);
  test_batch_invariance<T>(gemm);
  test_nan<T>(gemm);
  test_empty<T>(gemm);
  test_isas_agree<T>();
  std::printf("  %-4s %s\n", type_name<T>(), g_failures == before ? "ok" : "FAILED");
}

}  // namespace

int main(int argc, char** argv) {
  const char* requested = std::getenv("FLASHMOE_CPU_ISA");
  std::printf("tile_gemm: active ISA %s%s%s\n", isa_name(active_isa()), requested ? ", FLASHMOE_CPU_ISA=" : "",
              requested ? requested : "");
  if (argc == 3 && std::string(argv[1]) == "--expect-isa") {
    CHECK(std::string(isa_name(active_isa())) == argv[2], "override gave %s, expected %s", isa_name(active_isa()), argv[2]);
  }
  test_type<float>();
  test_type<double>();
  test_type<bfloat16>();
  test_type<float16>();

  if (requested == nullptr) {
    // The override is clamped: asking for more than this CPU has gives what it has.
    const Isa detected = active_isa();
    for (Isa isa : {Isa::generic, Isa::avx2, Isa::avx512, Isa::avx512_bf16}) {
      const Isa expected = isa < detected ? isa : detected;
      const std::string command = std::string("FLASHMOE_CPU_ISA=") + isa_name(isa) + " '" + argv[0] +
                                  "' --expect-isa " + isa_name(expected);
      std::fflush(stdout);
      const int status = std::system(command.c_str());
      CHECK(status == 0, "run with FLASHMOE_CPU_ISA=%s failed (status %d)", isa_name(isa), status);
    }
  }
  std::printf("tile_gemm: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
