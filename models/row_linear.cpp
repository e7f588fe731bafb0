// draftsmith's row-invariant linear kernel for CPU decoding (models/row_kernel.py builds and loads it).
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for the few rows (1-16) a decoding step sends through a layer.
// Each output y[m, n] is summed the same way whatever the number of rows M and however the work is split across
// threads: one 8-lane accumulator over k in steps of 8 (a fused multiply-add where the CPU has one), its lanes
// added in a fixed order ((0+1)+(2+3))+((4+5)+(6+7)), the k % 8 tail added one by one, then the bias. So a row
// of a verify is bit-identical to the same row decoded alone: what lossless speculative decoding needs of the
// target's linear layers. The tiles (4 weight rows x 1 or 2 input rows, 2 x 4 for four rows or more) only group
// independent sums: each weight row is read from memory once per call (the next block prefetched) and reused from
// L1 by every input row, which is what a decoding step's memory-bound matrix-vector work wants.
//
// Weights fp32 or bf16 (bf16 is widened to fp32 on load: half the bytes streamed, fp32 arithmetic), inputs and
// output of the weight's dtype, the sum in fp32 and rounded once to bf16 for a bf16 layer. Built with
// -ffp-contract=off so the compiler fuses nothing on its own: the only fused multiply-adds are fma8's.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 fma8(v8 acc, v8 w, v8 x) {
#if defined(__FMA__)
  return (v8)_mm256_fmadd_ps((__m256)w, (__m256)x, (__m256)acc);
#else
  return acc + w * x;
#endif
}

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8 load8(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
#if defined(__AVX2__)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  v8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// A vector kept in a register (an empty asm: no instruction, the same sums).
inline v8 in_register(v8 v) {
#if defined(__AVX__)
  asm("" : "+x"(v));
#endif
  return v;
}

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

inline float lanes_sum(v8 a) {  // ((0+1)+(2+3))+((4+5)+(6+7))
#if defined(__AVX2__)
  __m256 h = _mm256_hadd_ps((__m256)a, (__m256)a);
  h = _mm256_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
#endif
}

// lanes_sum of four accumulators at once: the same additions of the same operands in the same order, four to a
// vector (hadd pairs lanes 0+1, 2+3 within each half; the second hadd pairs those; the halves are added last).
inline void lanes_sum4(v8 a, v8 b, v8 c, v8 d, float out[4]) {
#if defined(__AVX2__)
  __m256 ab = _mm256_hadd_ps((__m256)a, (__m256)b), cd = _mm256_hadd_ps((__m256)c, (__m256)d);
  __m256 h = _mm256_hadd_ps(ab, cd);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  out[0] = lanes_sum(a); out[1] = lanes_sum(b); out[2] = lanes_sum(c); out[3] = lanes_sum(d);
#endif
}

template <typename T>
struct Call {
  const T* w;      // [N, K]
  const float* x;  // [M, K], fp32
  const T* bias;   // [N] or null
  T* y;            // [M, N]
  int64_t K, N, K8;

  // The sum's one order, for every tile: the accumulator's lanes, then the tail, then the bias.
  inline void finish(float s, int64_t n, int64_t m) const {
    const T* wn = w + n * K;
    const float* xm = x + m * K;
    for (int64_t k = K8; k < K; ++k) s += widen(wn[k]) * xm[k];
    if (bias) s += widen(bias[n]);
    y[m * N + n] = static_cast<T>(s);
  }

  // An input vector for the FMAs that share it. For bf16 weights it is held in a register: the compiler would fold
  // its load into each FMA, loading it once per weight row (two or four loads instead of one) beside the weights'
  // widening; a bf16 forward's linear layers ran 7-15% faster at 5-16 rows for it on the AVX2 EPYC (as fast at 1-4),
  // fp32 as fast or slower (bench/results/cpu-avx2/row-kernel-held), so fp32 keeps the folded loads.
  static inline v8 hold(v8 v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else return in_register(v);
  }

  inline void out(v8 acc, int64_t n, int64_t m) const { finish(lanes_sum(acc), n, m); }

  inline void out4(v8 a0, v8 a1, v8 a2, v8 a3, int64_t n, int64_t m) const {  // rows n..n+3 of input row m
    float s[4];
    lanes_sum4(a0, a1, a2, a3, s);
    for (int i = 0; i < 4; ++i) finish(s[i], n + i, m);
  }

  // Four weight rows (from `wb`, rows K apart) against input rows m and m+1. `pf`: the next block's bytes to
  // prefetch as this one's are read (null: fetched by an earlier tile).
  inline void tile4x2(const T* wb, int64_t n, int64_t m, const char* pf) const {
    const T *w0 = wb, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float *x0 = x + m * K, *x1 = x0 + K;
    v8 a00 = {}, a10 = {}, a20 = {}, a30 = {}, a01 = {}, a11 = {}, a21 = {}, a31 = {};
    for (int64_t k = 0; k < K8; k += 8) {
      if (pf) { __builtin_prefetch(pf + 4 * k * sizeof(T)); __builtin_prefetch(pf + 4 * k * sizeof(T) + 64); }
      v8 v0 = load8(w0 + k), v1 = load8(w1 + k), v2 = load8(w2 + k), v3 = load8(w3 + k);
      v8 u = hold(load8(x0 + k));
      a00 = fma8(a00, v0, u); a10 = fma8(a10, v1, u); a20 = fma8(a20, v2, u); a30 = fma8(a30, v3, u);
      u = hold(load8(x1 + k));
      a01 = fma8(a01, v0, u); a11 = fma8(a11, v1, u); a21 = fma8(a21, v2, u); a31 = fma8(a31, v3, u);
    }
    out4(a00, a10, a20, a30, n, m);
    out4(a01, a11, a21, a31, n, m + 1);
  }

  inline void tile4x1(const T* wb, int64_t n, int64_t m, const char* pf) const {
    const T *w0 = wb, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float* x0 = x + m * K;
    v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t k = 0; k < K8; k += 8) {
      if (pf) { __builtin_prefetch(pf + 4 * k * sizeof(T)); __builtin_prefetch(pf + 4 * k * sizeof(T) + 64); }
      v8 u = hold(load8(x0 + k));
      a0 = fma8(a0, load8(w0 + k), u); a1 = fma8(a1, load8(w1 + k), u);
      a2 = fma8(a2, load8(w2 + k), u); a3 = fma8(a3, load8(w3 + k), u);
    }
    out4(a0, a1, a2, a3, n, m);
  }

  // Two weight rows against input rows m..m+3: for 4+ input rows, each weight vector loaded (and for bf16 widened)
  // once for four rows instead of two.
  inline void tile2x4(const T* wb, int64_t n, int64_t m, const char* pf) const {
    const T *w0 = wb, *w1 = w0 + K;
    const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
    v8 a00 = {}, a10 = {}, a01 = {}, a11 = {}, a02 = {}, a12 = {}, a03 = {}, a13 = {};
    for (int64_t k = 0; k < K8; k += 8) {
      if (pf) __builtin_prefetch(pf + 2 * k * sizeof(T));     // two rows' bytes: <= one line an iteration
      v8 v0 = load8(w0 + k), v1 = load8(w1 + k), u;
      u = hold(load8(x0 + k)); a00 = fma8(a00, v0, u); a10 = fma8(a10, v1, u);
      u = hold(load8(x1 + k)); a01 = fma8(a01, v0, u); a11 = fma8(a11, v1, u);
      u = hold(load8(x2 + k)); a02 = fma8(a02, v0, u); a12 = fma8(a12, v1, u);
      u = hold(load8(x3 + k)); a03 = fma8(a03, v0, u); a13 = fma8(a13, v1, u);
    }
    float s[4];
    lanes_sum4(a00, a10, a01, a11, s);
    finish(s[0], n, m); finish(s[1], n + 1, m); finish(s[2], n, m + 1); finish(s[3], n + 1, m + 1);
    lanes_sum4(a02, a12, a03, a13, s);
    finish(s[0], n, m + 2); finish(s[1], n + 1, m + 2); finish(s[2], n, m + 3); finish(s[3], n + 1, m + 3);
  }

  inline void tile1x1(int64_t n, int64_t m) const {
    const T* w0 = w + n * K;
    const float* x0 = x + m * K;
    v8 a = {};
    for (int64_t k = 0; k < K8; k += 8) a = fma8(a, load8(w0 + k), load8(x0 + k));
    out(a, n, m);
  }

  // All input rows against the block of weight rows n..n+3.
  inline void block(const T* wb, int64_t n, int64_t M, const char* pf) const {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4, pf = nullptr) {
      tile2x4(wb, n, m, pf);
      tile2x4(wb + 2 * K, n + 2, m, pf ? pf + 2 * K * sizeof(T) : nullptr);
    }
    for (; m + 2 <= M; m += 2, pf = nullptr) tile4x2(wb, n, m, pf);
    for (; m < M; ++m, pf = nullptr) tile4x1(wb, n, m, pf);
  }

  void run(int64_t M) const {
    const int64_t blocks = N / 4;
    at::parallel_for(0, blocks, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const T* wb = w + 4 * b * K;
        block(wb, 4 * b, M, b + 1 < hi ? reinterpret_cast<const char*>(wb + 4 * K) : nullptr);
      }
    });
    for (int64_t n = 4 * blocks; n < N; ++n)
      for (int64_t m = 0; m < M; ++m) tile1x1(n, m);
  }
};

template <typename T>
void run(const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
  const float* x;
  std::vector<float> wide;
  if constexpr (std::is_same_v<T, float>) {
    x = rows.data_ptr<float>();
  } else {
    wide.resize(M * K);
    const T* r = rows.data_ptr<T>();
    for (int64_t i = 0; i < M * K; ++i) wide[i] = static_cast<float>(r[i]);
    x = wide.data();
  }
  Call<T> call{weight.data_ptr<T>(), x, bias ? bias->data_ptr<T>() : nullptr, out.data_ptr<T>(), K, N, K & ~int64_t(7)};
  call.run(M);
}

at::Tensor row_linear(const at::Tensor& rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(rows.dim() == 2 && weight.dim() == 2 && rows.size(1) == weight.size(1),
              "draftsmith row_linear: rows [M, K] and weight [N, K], got ", rows.sizes(), " and ", weight.sizes());
  TORCH_CHECK(rows.scalar_type() == weight.scalar_type() && (!bias || bias->scalar_type() == weight.scalar_type()),
              "draftsmith row_linear: rows, weight and bias of one dtype, got ", rows.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "draftsmith row_linear: bias [N], got ", bias ? bias->sizes() : rows.sizes());
  at::Tensor x = rows.contiguous(), w = weight.contiguous();
  c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, w, b, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "draftsmith row_linear: fp32 or bf16, got ", x.scalar_type());
    run<c10::BFloat16>(x, w, b, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(draftsmith_rows, m) {
  m.def("linear(Tensor rows, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, &row_linear);
}
