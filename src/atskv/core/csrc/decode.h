// What the CPU decode ops share: atskv::paged_decode (rank_pages.cpp) attends over the pages its
// ranking chose with paged_attention.cpp's attention, on raw pointers; both sum over head dims
// with lane_sum, and the attention and atskv::linear_rows sum 16 vectors' lanes at once with
// tree16x16 (the same tree as lane_sum's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace atskv {

// 16 floats as one vector of GCC's vector extension (one AVX-512 register, two AVX ones, ...)
typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));

// each lane's index
inline constexpr i16 kLane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// lane i of the result: the tree sum of a[i]'s 16 lanes (a[i], i < n; the rest are not read)
inline v16 tree16x16(const v16* a, int n) {
  v16 s[16];
  for (int i = 0; i < 16; ++i) s[i] = i < n ? a[i] : v16{};
  v16 b[8], c[4], d[2];
  // lanes j + j+8 of two sums side by side: b[p] = t8 of s[2p] (lanes 0-7), of s[2p+1] (8-15)
  for (int p = 0; p < 8; ++p)
    b[p] = __builtin_shuffle(s[2 * p], s[2 * p + 1],
                             i16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(s[2 * p], s[2 * p + 1],
                             i16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  // t4 = t8 j + j+4: c[r] = t4 of s[4r .. 4r + 3], four lanes each
  for (int r = 0; r < 4; ++r)
    c[r] = __builtin_shuffle(b[2 * r], b[2 * r + 1],
                             i16{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(b[2 * r], b[2 * r + 1],
                             i16{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  // (t4 0 + 2, t4 1 + 3): d[q] lanes 2i, 2i + 1 for s[8q + i]
  for (int q = 0; q < 2; ++q)
    d[q] = __builtin_shuffle(c[2 * q], c[2 * q + 1],
                             i16{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(c[2 * q], c[2 * q + 1],
                             i16{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(d[0], d[1],
                           i16{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(d[0], d[1],
                           i16{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

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

// One store's attention (paged_attention.cpp): queries qp (H, g, d) over the rows of kp, vp, head h
// owning rows offp[h] .. offp[h] + lenp[h]; the page slots pgp (H, K) where chp (both null:
// every page, K of them); the output to op (H, g, d).
struct Task {
  const float *qp, *kp, *vp;
  const int64_t *offp, *lenp, *pgp;
  const bool* chp;
  int64_t H, K, page;
  float* op;
};

// the attention of every task, the threads dealt over all of them at once; each task's result as
// if it ran alone
void attend_tasks(const Task* tasks, int64_t n_tasks, int64_t G, int64_t D, float sc);

void attend_pages(const float* qp, const float* kp, const float* vp, const int64_t* offp,
                  const int64_t* lenp, const int64_t* pgp, const bool* chp, int64_t H, int64_t G,
                  int64_t D, int64_t K, int64_t page, float sc, float* op);

}  // namespace atskv
