// CPU kernels for the memory-bound steps of a decode: a few rows of activations times a large
// weight that is read once. XLA's CPU backend widens int8 and bfloat16 operands before its dot,
// so its reads run at a fraction of the memory bandwidth; these read the narrow values and
// widen them in registers. Built on first use by grokscope/kernels/__init__.py (XLA FFI).
//
//   grokscope_int8_rows: y[r, :] = sum over blocks b of s[e, b, :] * sum_{k in b} x[r, k] w[e, k, :]
//     x f32[R, K], w s8[E, K, N], s f32[E, B, N], e s32[], valid s32[] -> y f32[R, N];
//     rows r >= valid are zero (and not computed).
//   grokscope_bf16_rows: y[r, v] = sum_d x[r, d] t[v, d]
//     x f32[R, D], t bf16[V, D] -> y f32[R, V].
// Every product is exact in float32 (int8 and bfloat16 values widen exactly); only the order of
// the float32 sums differs from XLA's dot.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kStreams = 8;  // weight rows read side by side (sequential streams)

// tmp[r, :] += sum_{k in [k0, k1)} x[r, k] w[k, :] for r < R; w is [K, N] row-major.
template <int R>
void AccumulateInt8(const float* x, int64_t K, const int8_t* w, int64_t N, int64_t k0, int64_t k1,
                    float* tmp) {
  int64_t k = k0;
#if defined(__AVX512F__)
  if (N % 16 == 0) {
    for (; k + kStreams <= k1; k += kStreams) {
      const int8_t* wk = w + k * N;
      float xs[R][kStreams];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < kStreams; ++c) xs[r][c] = x[r * K + k + c];
      for (int64_t n = 0; n < N; n += 16) {
        __m512 wv[kStreams];
        for (int c = 0; c < kStreams; ++c)
          wv[c] = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + c * N + n))));
        for (int r = 0; r < R; ++r) {
          __m512 a = _mm512_loadu_ps(tmp + r * N + n);
          for (int c = 0; c < kStreams; ++c) a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r][c]), wv[c], a);
          _mm512_storeu_ps(tmp + r * N + n, a);
        }
      }
    }
  }
#endif
  for (; k < k1; ++k) {
    const int8_t* wk = w + k * N;
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      float* t = tmp + r * N;
      for (int64_t n = 0; n < N; ++n) t[n] += xr * static_cast<float>(wk[n]);
    }
  }
}

template <int R>
void Int8Rows(const float* x, int64_t K, const int8_t* w, int64_t N, const float* s, int64_t B, float* y,
              std::vector<float>& tmp) {
  const int64_t per_block = K / B;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(tmp.begin(), tmp.begin() + R * N, 0.0f);
    AccumulateInt8<R>(x, K, w, N, b * per_block, (b + 1) * per_block, tmp.data());
    const float* sb = s + b * N;
    for (int r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) y[r * N + n] += sb[n] * tmp[r * N + n];
  }
}

ffi::Error Int8RowsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> s,
                        ffi::Buffer<ffi::S32> expert, ffi::Buffer<ffi::S32> valid,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3)
    return ffi::Error::InvalidArgument("grokscope_int8_rows: expected x [R, K], w [E, K, N], s [E, B, N]");
  const int64_t R = xd[0], K = xd[1], E = wd[0], N = wd[2], B = sd[1];
  if (wd[1] != K || sd[0] != E || sd[2] != N || B <= 0 || K % B != 0)
    return ffi::Error::InvalidArgument("grokscope_int8_rows: shapes do not agree");
  const int32_t e = expert.typed_data()[0];
  if (e < 0 || e >= E) return ffi::Error::InvalidArgument("grokscope_int8_rows: expert out of range");
  const int64_t rows = std::clamp<int64_t>(valid.typed_data()[0], 0, R);
  float* out = y->typed_data();
  std::memset(out, 0, sizeof(float) * R * N);
  const int8_t* we = w.typed_data() + static_cast<int64_t>(e) * K * N;
  const float* se = s.typed_data() + static_cast<int64_t>(e) * B * N;
  std::vector<float> tmp(4 * N);
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* xr = x.typed_data() + r0 * K;
    float* yr = out + r0 * N;
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: Int8Rows<1>(xr, K, we, N, se, B, yr, tmp); break;
      case 2: Int8Rows<2>(xr, K, we, N, se, B, yr, tmp); break;
      case 3: Int8Rows<3>(xr, K, we, N, se, B, yr, tmp); break;
      default: Int8Rows<4>(xr, K, we, N, se, B, yr, tmp); break;
    }
  }
  return ffi::Error::Success();
}

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[r, v] for r < R and v in [v0, v1): two table rows at a time, R rows of x.
template <int R>
void Bf16Rows(const float* x, const uint16_t* t, int64_t D, int64_t V, int64_t v0, int64_t v1, float* y) {
  int64_t v = v0;
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (; v + 2 <= v1; v += 2) {
      const uint16_t* t0 = t + v * D;
      const uint16_t* t1 = t0 + D;
      __m512 acc0[R], acc1[R];
      for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t0 + d))), 16));
        __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t1 + d))), 16));
        for (int r = 0; r < R; ++r) {
          __m512 xv = _mm512_loadu_ps(x + r * D + d);
          acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
          acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        y[r * V + v] = _mm512_reduce_add_ps(acc0[r]);
        y[r * V + v + 1] = _mm512_reduce_add_ps(acc1[r]);
      }
    }
  }
#endif
  for (; v < v1; ++v) {
    const uint16_t* tv = t + v * D;
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += x[r * D + d] * Bf16ToF32(tv[d]);
      y[r * V + v] = acc;
    }
  }
}

ffi::Error Bf16RowsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> table, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), td = table.dimensions();
  if (xd.size() != 2 || td.size() != 2 || xd[1] != td[1])
    return ffi::Error::InvalidArgument("grokscope_bf16_rows: expected x [R, D] and table [V, D]");
  const int64_t R = xd[0], D = xd[1], V = td[0];
  const uint16_t* t = reinterpret_cast<const uint16_t*>(table.untyped_data());
  float* out = y->typed_data();
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const float* xr = x.typed_data() + r0 * D;
    float* yr = out + r0 * V;
    switch (std::min<int64_t>(8, R - r0)) {
      case 1: Bf16Rows<1>(xr, t, D, V, 0, V, yr); break;
      case 2: Bf16Rows<2>(xr, t, D, V, 0, V, yr); break;
      case 3: Bf16Rows<3>(xr, t, D, V, 0, V, yr); break;
      case 4: Bf16Rows<4>(xr, t, D, V, 0, V, yr); break;
      case 5: Bf16Rows<5>(xr, t, D, V, 0, V, yr); break;
      case 6: Bf16Rows<6>(xr, t, D, V, 0, V, yr); break;
      case 7: Bf16Rows<7>(xr, t, D, V, 0, V, yr); break;
      default: Bf16Rows<8>(xr, t, D, V, 0, V, yr); break;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokscopeInt8Rows, Int8RowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokscopeBf16Rows, Bf16RowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
