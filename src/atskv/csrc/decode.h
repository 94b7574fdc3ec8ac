// What the CPU decode ops share: atskv::paged_decode (rank_pages.cpp) attends over the pages its
// ranking chose with paged_attention.cpp's attention, on raw pointers; both sum over head dims
// with lane_sum.
#pragma once

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

void attend_pages(const float* qp, const float* kp, const float* vp, const int64_t* offp,
                  const int64_t* lenp, const int64_t* pgp, const bool* chp, int64_t H, int64_t G,
                  int64_t D, int64_t K, int64_t page, float sc, float* op);

}  // namespace atskv
