// What one CPU decode op calls from another file: atskv::paged_decode (rank_pages.cpp) attends
// over the pages its ranking chose with paged_attention.cpp's attention, on raw pointers.
#pragma once

#include <cstdint>

namespace atskv {

void attend_pages(const float* qp, const float* kp, const float* vp, const int64_t* offp,
                  const int64_t* lenp, const int64_t* pgp, const bool* chp, int64_t H, int64_t G,
                  int64_t D, int64_t K, int64_t page, float sc, float* op);

}  // namespace atskv
