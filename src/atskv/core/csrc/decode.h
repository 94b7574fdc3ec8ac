// What the CPU decode ops share: atskv::paged_decode (rank_pages.cpp) attends over the pages its
// ranking chose with paged_attention.cpp's attention, on raw pointers; both sum over head dims
// with lane_sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace atskv {

// sum of term(c) for c in 0 .. d, in 16 lanes added up as a tree at the end. GCC ends an
// `omp simd reduction` with a chain of 16 dependent scalar adds, which at d = 64 took as long as
// the products (a perf profile of the ranking showed it as the hot spot).
template <class Term>
inline float lane_sum(int64_t d, Term term) {
  float lane[16] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int j = 0; j < 16; ++j) lane[j] += term(c + j);
#if defined(__AVX512F__)
  float total = _mm512_reduce_add_ps(_mm512_loadu_ps(lane));  // GCC's own: 15 scalar adds
#else
  for (int j = 0; j < 8; ++j) lane[j] += lane[j + 8];  // written out: GCC keeps a loop over
  for (int j = 0; j < 4; ++j) lane[j] += lane[j + 4];  // the halvings on the stack
  for (int j = 0; j < 2; ++j) lane[j] += lane[j + 2];
  float total = lane[0] + lane[1];
#endif
  for (; c < d; ++c) total += term(c);
  return total;
}

// e^x for x <= 0 (a softmax's exponents, less their max): within 1 ulp of std::exp over every
// float in (-110, 0], denormal results included, and exactly 0 below e^-104 and at -inf. Plain
// float and integer arithmetic, so that GCC vectorises a loop of it: std::exp is a library call
// per element, and those calls took a quarter of the attention's time in a perf profile.
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 and n an integer, e^r by a degree-7 polynomial,
// times 2^n, as two powers of two so that n down to -150 (denormal results) stays exact.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -104.f);  // -inf and below: 0 (the select at the end)
  // n: x log2(e) rounded to the nearest integer, by adding and taking away 1.5 * 2^23 (what
  // GCC vectorises; std::floor it does not)
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts: exact n ln2
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t ni = static_cast<int32_t>(n), half = ni / 2;  // n in [-150, 0]: both halves
  const float a = __builtin_bit_cast(float, (half + 127) << 23);  // are normal powers of two
  const float b = __builtin_bit_cast(float, (ni - half + 127) << 23);
  return x < -104.f ? 0.f : y * a * b;
}

void attend_pages(const float* qp, const float* kp, const float* vp, const int64_t* offp,
                  const int64_t* lenp, const int64_t* pgp, const bool* chp, int64_t H, int64_t G,
                  int64_t D, int64_t K, int64_t page, float sc, float* op);

}  // namespace atskv
