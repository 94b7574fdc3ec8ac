// atskv::rank_pages: atskv's decode-time page ranking for one query step, per KV head in one pass
// (the reference, and the path on other devices and dtypes, is ATSKV.rank_pages_reference in
// atskv/methods/atskv.py; this computes the same thing in float32). CPU kernel; the schema is
// defined here and its shape function in atskv/kernels.py.
//
// q (H, g, d); kmin, kmax, ksum (H, P, d): each page slot's key min, max and sum; lens (H,): each
// head's token count (page slot p holds clamp(lens - p * page, 0, page) tokens); pinned (H, P).
// A page's estimated log-sum-exp is the mean of its upper bound sum_c max(q_c kmax_c, q_c kmin_c)
// and its lower bound q . (ksum / count), times scale, plus log(count); its estimated share is the
// softmax of that over the head's live pages, averaged over the g query heads. The first, the
// newest and the pinned pages are forced (every page, when the head's pages fit max_pages).
// Pages are ranked forced ones first (their share + 2, as the reference ranks them) and empty
// slots last, ties to the lower slot. Returns pages (H, K), K = min(max_pages, P): the K
// best-ranked page slots, in slot order (the reference returns them best first; attention over
// them is the same up to rounding); and chosen (H, K): those that are live and whose better-ranked
// pages' shares sum to less than `mass`, or are among the first `min_pages`, or are forced.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

std::tuple<at::Tensor, at::Tensor> rank_pages_cpu(const at::Tensor& q, const at::Tensor& kmin,
                                                  const at::Tensor& kmax, const at::Tensor& ksum,
                                                  const at::Tensor& lens, const at::Tensor& pinned,
                                                  int64_t page, int64_t max_pages,
                                                  int64_t min_pages, double mass, double scale) {
  TORCH_CHECK(q.dim() == 3 && kmin.dim() == 3 && kmin.sizes() == kmax.sizes() &&
                  kmin.sizes() == ksum.sizes(),
              "atskv::rank_pages: q must be (H, g, d) and kmin, kmax, ksum (H, P, d); got ",
              q.sizes(), ", ", kmin.sizes(), ", ", kmax.sizes(), ", ", ksum.sizes());
  for (const auto* t : {&q, &kmin, &kmax, &ksum})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "atskv::rank_pages: float32 only, got ",
                t->scalar_type());
  const int64_t H = q.size(0), G = q.size(1), D = q.size(2), P = kmin.size(1);
  TORCH_CHECK(kmin.size(0) == H && kmin.size(2) == D, "atskv::rank_pages: page summaries ",
              kmin.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(lens.numel() == H && pinned.dim() == 2 && pinned.size(0) == H &&
                  pinned.size(1) == P,
              "atskv::rank_pages: lens must be (H,) and pinned (H, P)");
  TORCH_CHECK(page >= 1 && max_pages >= 1, "atskv::rank_pages: page and max_pages must be >= 1");
  const int64_t K = std::min(max_pages, P);
  const auto qc = q.contiguous(), lo_c = kmin.contiguous(), hi_c = kmax.contiguous(),
             sum_c = ksum.contiguous();
  const auto lens_l = lens.to(at::kLong).contiguous();
  const auto pin_b = pinned.to(at::kBool).contiguous();
  auto order = at::empty({H, K}, q.options().dtype(at::kLong));
  auto chosen = at::empty({H, K}, q.options().dtype(at::kBool));
  const float* qp = qc.data_ptr<float>();
  const float* lop = lo_c.data_ptr<float>();
  const float* hip = hi_c.data_ptr<float>();
  const float* sump = sum_c.data_ptr<float>();
  const int64_t* lenp = lens_l.data_ptr<int64_t>();
  const bool* pinp = pin_b.data_ptr<bool>();
  int64_t* op = order.data_ptr<int64_t>();
  bool* cp = chosen.data_ptr<bool>();
  const float half = static_cast<float>(scale) / 2.f;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // heads in parallel only when each has enough work to pay for the threads' wake-up (a small
  // model's few heads at 4096 tokens ran faster on one thread)
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, G * P * D));
  at::parallel_for(0, H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> logit(P), est(P), key(P);
    std::vector<int64_t> count(P), idx(P);
    std::vector<char> forced(P), take(P);
    for (int64_t h = begin; h < end; ++h) {
      int64_t used = 0;
      for (int64_t p = 0; p < P; ++p) {
        count[p] = std::clamp<int64_t>(lenp[h] - p * page, 0, page);
        used += count[p] > 0;
      }
      std::fill(est.begin(), est.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const float* qv = qp + (h * G + g) * D;
        float mx = neg_inf;
        for (int64_t p = 0; p < P; ++p) {
          if (!count[p]) {
            logit[p] = neg_inf;
            continue;
          }
          // local restrict pointers: otherwise g++ vectorises this as gathers, 10x slower
          const float* __restrict hi = hip + (h * P + p) * D;
          const float* __restrict lo = lop + (h * P + p) * D;
          const float* __restrict sm = sump + (h * P + p) * D;
          const float n = static_cast<float>(count[p]), inv = 1.f / n;
          float bounds = 0.f;  // upper bound + lower bound, in one sum
#pragma omp simd reduction(+ : bounds)
          for (int64_t c = 0; c < D; ++c) {
            const float a = qv[c];
            bounds += std::max(a * hi[c], a * lo[c]) + a * sm[c] * inv;
          }
          logit[p] = bounds * half + std::log(n);
          mx = std::max(mx, logit[p]);
        }
        if (mx == neg_inf) continue;  // no live page
        float total = 0.f;
        for (int64_t p = 0; p < P; ++p) {
          logit[p] = count[p] ? std::exp(logit[p] - mx) : 0.f;
          total += logit[p];
        }
        for (int64_t p = 0; p < P; ++p) est[p] += logit[p] / total;
      }
      for (int64_t p = 0; p < P; ++p) {
        est[p] /= static_cast<float>(G);
        forced[p] = p == 0 || p == used - 1 || pinp[h * P + p] || used <= max_pages;
        key[p] = count[p] ? est[p] + (forced[p] ? 2.f : 0.f) : -1.f;  // empty slots last
      }
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), [&](int64_t a, int64_t b) {
        return key[a] > key[b] || (key[a] == key[b] && a < b);
      });
      float before = 0.f;  // estimated share of the better-ranked pages
      for (int64_t i = 0; i < K; ++i) {
        const int64_t p = idx[i];
        take[p] = count[p] > 0 && (before < mass || i < min_pages || forced[p]);
        before += est[p];
      }
      // returned in slot order: the attention then reads the store front to back, which the
      // hardware prefetcher follows (in rank order each page was a jump: about 1 ms more per
      // step at 4096 tokens on SmolLM2)
      std::sort(idx.begin(), idx.begin() + K);
      for (int64_t i = 0; i < K; ++i) {
        op[h * K + i] = idx[i];
        cp[h * K + i] = take[idx[i]];
      }
    }
  });
  return {order, chosen};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(atskv, m) {
  m.def(
      "rank_pages(Tensor q, Tensor kmin, Tensor kmax, Tensor ksum, Tensor lens, Tensor pinned, "
      "int page, int max_pages, int min_pages, float mass, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(atskv, CPU, m) { m.impl("rank_pages", &rank_pages_cpu); }
