// atskv's CPU decode ops: atskv::rank_pages, its decode-time page ranking for one query step, per
// KV head in one pass (the reference, and the path on other devices and dtypes, is
// ATSKV.rank_pages in atskv/methods/atskv.py; this computes the same thing in float32), and
// atskv::paged_decode (at the end): one layer's append, ranking and attention in one call. CPU
// kernels; the schemas are defined here and the shape functions in atskv/kernels.py.
//
// q (H, g, d); kmin, kmax, ksum (H, P, d): each page slot's key min, max and sum; lens (H,): each
// head's token count (page slot p holds clamp(lens - p * page, 0, page) tokens); pinned (H, P).
// A page's estimated log-sum-exp is the mean of its upper bound sum_c max(q_c kmax_c, q_c kmin_c)
// and its lower bound q . (ksum / count), times scale, plus log(count); its estimated share is the
// softmax of that over the head's live pages, averaged over the g query heads. The first, the
// newest and the pinned pages are forced (every page, when the head holds at most fit_pages).
// Pages are ranked forced ones first (their share + 2, as the reference ranks them) and empty
// slots last, ties to the lower slot. Returns pages (H, K), K = min(max(max_pages, fit_pages), P):
// the K best-ranked page slots, in slot order (the reference returns them best first; attention
// over them is the same up to rounding); and chosen (H, K): those that are live and whose
// better-ranked pages' shares sum to less than `mass`, or are among the first `min_pages`, or are
// forced; at most the max_pages best of a head holding more than fit_pages.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <vector>

namespace atskv {

// The page slots per head the ranking returns: room for every page of a head it does not rank
// (at most fit_pages) and for the max_pages of one it does, at most the P a head has.
inline int64_t page_slots(int64_t max_pages, int64_t fit_pages, int64_t P) {
  return std::min(std::max(max_pages, fit_pages), P);
}

// The ranking itself, on raw pointers: contiguous float32 q (H, g, d); page slot p of head h has
// its key min, max and sum at lop, hip, sump + (first[h] + p) * stride (first[h] = h * P and
// stride d for three (H, P, d) arrays; atskv's store packs every page's three in a row, stride
// 3 d, head h's pages from its first row / page); int64 lens, bool pinned (H, P). Writes the
// K = min(max(max_pages, fit_pages), P) page slots per head to op (H, K) and which of them are
// chosen to cp (H, K).
void rank_pages_into(const float* qp, const float* lop, const float* hip, const float* sump,
                     int64_t stride, const int64_t* first, const int64_t* lenp, const bool* pinp,
                     int64_t H, int64_t G, int64_t D, int64_t P, int64_t page, int64_t max_pages,
                     int64_t fit_pages, int64_t min_pages, double mass, double scale,
                     int64_t* op, bool* cp) {
  const int64_t K = page_slots(max_pages, fit_pages, P);
  const float half = static_cast<float>(scale) / 2.f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float inv_page = 1.f / static_cast<float>(page);
  const float log_page = std::log(static_cast<float>(page));
  const auto count = [&](int64_t h, int64_t p) {
    return std::clamp<int64_t>(lenp[h] - p * page, 0, page);
  };

  // a head holding at most fit_pages pages has every page forced: the K best are its live slots
  // (a prefix), then empty ones (ties to the lower slot), and exactly the live ones are chosen,
  // so no summary need be read. The other heads are ranked, in parallel when two or more are.
  std::vector<int64_t> ranked, used(H);  // used: each head's page slots holding a token
  for (int64_t h = 0; h < H; ++h) {
    used[h] = std::clamp<int64_t>((lenp[h] + page - 1) / page, 0, P);
    if (used[h] > fit_pages) {
      ranked.push_back(h);
      continue;
    }
    for (int64_t i = 0; i < K; ++i) {
      op[h * K + i] = i;
      cp[h * K + i] = i < used[h];
    }
  }
  const int64_t n_ranked = static_cast<int64_t>(ranked.size());
  at::parallel_for(0, n_ranked, n_ranked > 1 ? 1 : n_ranked, [&](int64_t begin, int64_t end) {
    std::vector<float> logit(G * P), est(P), key(P), mx(G), qsplit(2 * G * D);
    std::vector<int64_t> idx(P);
    std::vector<char> forced(P), take(P);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = ranked[r];
      // pages outer, query heads inner: each page's summaries are read once for the g heads
      std::fill(mx.begin(), mx.end(), neg_inf);
      const float* qh = qp + h * G * D;
      // max(a hi, a lo) = max(a, 0) hi + min(a, 0) lo (hi >= lo): two multiply-adds per dim
      // instead of two products and a max
      for (int64_t i = 0; i < G * D; ++i) {
        qsplit[i] = std::max(qh[i], 0.f);
        qsplit[G * D + i] = std::min(qh[i], 0.f);
      }
      for (int64_t p = 0; p < P; ++p) {
        const int64_t at = (first[h] + p) * stride;
        const int64_t c = count(h, p);
        if (!c) {
          for (int64_t g = 0; g < G; ++g) logit[g * P + p] = neg_inf;
          continue;
        }
        // local restrict pointers: otherwise g++ vectorises this as gathers, 10x slower
        const float* __restrict hi = hip + at;
        const float* __restrict lo = lop + at;
        const float* __restrict sm = sump + at;
        // every page but a head's newest is full: its count's log and inverse computed once
        const float inv = c == page ? inv_page : 1.f / static_cast<float>(c);
        const float log_n = c == page ? log_page : std::log(static_cast<float>(c));
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict qv = qh + g * D;
          const float* __restrict qpos = qsplit.data() + g * D;
          const float* __restrict qneg = qpos + G * D;
          const float bounds = lane_sum(D, [&](int64_t i) {  // upper + lower bound, one sum
            return qpos[i] * hi[i] + qneg[i] * lo[i] + qv[i] * inv * sm[i];
          });
          const float v = bounds * half + log_n;
          logit[g * P + p] = v;
          mx[g] = std::max(mx[g], v);
        }
      }
      std::fill(est.begin(), est.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {  // softmax over the pages (an empty one's logit: -inf)
        float* __restrict lg = logit.data() + g * P;
        const float top = mx[g];
        for (int64_t p = 0; p < P; ++p) lg[p] = exp_nonpos(lg[p] - top);
        const float inv_total = 1.f / lane_sum(P, [&](int64_t p) { return lg[p]; });
        for (int64_t p = 0; p < P; ++p) est[p] += lg[p] * inv_total;
      }
      for (int64_t p = 0; p < P; ++p) {
        est[p] /= static_cast<float>(G);
        forced[p] = p == 0 || p == used[h] - 1 || pinp[h * P + p];
        key[p] = count(h, p) ? est[p] + (forced[p] ? 2.f : 0.f) : -1.f;  // empty slots last
      }
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + K, idx.end(), [&](int64_t a, int64_t b) {
        return key[a] > key[b] || (key[a] == key[b] && a < b);
      });
      float before = 0.f;  // estimated share of the better-ranked pages
      for (int64_t i = 0; i < K; ++i) {
        const int64_t p = idx[i];
        take[p] = count(h, p) > 0 && i < max_pages &&
                  (before < mass || i < min_pages || forced[p]);
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
}

std::tuple<at::Tensor, at::Tensor> rank_pages_cpu(const at::Tensor& q, const at::Tensor& kmin,
                                                  const at::Tensor& kmax, const at::Tensor& ksum,
                                                  const at::Tensor& lens, const at::Tensor& pinned,
                                                  int64_t page, int64_t max_pages,
                                                  int64_t fit_pages, int64_t min_pages,
                                                  double mass, double scale) {
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
  TORCH_CHECK(page >= 1 && max_pages >= 1 && fit_pages >= 1,
              "atskv::rank_pages: page, max_pages and fit_pages must be >= 1");
  const int64_t K = page_slots(max_pages, fit_pages, P);
  const auto qc = q.contiguous(), lo_c = kmin.contiguous(), hi_c = kmax.contiguous(),
             sum_c = ksum.contiguous();
  const auto lens_l = lens.to(at::kLong).contiguous();
  const auto pin_b = pinned.to(at::kBool).contiguous();
  auto order = at::empty({H, K}, q.options().dtype(at::kLong));
  auto chosen = at::empty({H, K}, q.options().dtype(at::kBool));
  std::vector<int64_t> first(H);
  for (int64_t h = 0; h < H; ++h) first[h] = h * P;
  rank_pages_into(qc.data_ptr<float>(), lo_c.data_ptr<float>(), hi_c.data_ptr<float>(),
                  sum_c.data_ptr<float>(), D, first.data(), lens_l.data_ptr<int64_t>(),
                  pin_b.data_ptr<bool>(), H, G, D, P, page, max_pages, fit_pages, min_pages, mass,
                  scale,
                  order.data_ptr<int64_t>(), chosen.data_ptr<bool>());
  return {order, chosen};
}

// atskv::paged_decode: one layer's decode step over atskv's store (StaticPagedKV) in one call. The
// store: k, v (N, d); summary (N / page, 3, d), each page's key min, max and sum (head h's page p
// at index[0, h] / page + p); index (3, H) int64, each head's first row, token count and rows
// owned (whole pages); pinned (H, P), P the most pages a head owns. First the append: for every
// head h, the new key and value (knew, vnew (H, d)) go to row index[0, h] + index[1, h], the
// min, max and sum of the page that row falls in take the key in (a page's first token replaces
// them) and index[1, h] grows by one. Then rank_pages_into, and attend_pages over the pages it
// chose: on raw pointers, with no tensor between them. (Compiled PyTorch ran the summaries'
// read-modify-write as single-threaded regions, each ending in a barrier of the step's threads,
// and the ranking and the attention as two calls with tensors between them.)
at::Tensor paged_decode_cpu(const at::Tensor& q, const at::Tensor& knew, const at::Tensor& vnew,
                            at::Tensor& k, at::Tensor& v, at::Tensor& summary, at::Tensor& index,
                            const at::Tensor& pinned, int64_t page, int64_t max_pages,
                            int64_t fit_pages, int64_t min_pages, double mass, double scale) {
  TORCH_CHECK(page >= 1 && max_pages >= 1 && fit_pages >= 1,
              "atskv::paged_decode: page, max_pages and fit_pages must be >= 1, got ", page, ", ",
              max_pages, ", ", fit_pages);
  TORCH_CHECK(k.dim() == 2 && v.sizes() == k.sizes() && summary.dim() == 3 &&
                  summary.size(0) * page == k.size(0) && summary.size(1) == 3 &&
                  index.dim() == 2 && index.size(0) == 3 && pinned.dim() == 2,
              "atskv::paged_decode: k, v must be (N, d), summary (N / page, 3, d), index (3, H) "
              "and pinned (H, P); got ",
              k.sizes(), ", ", v.sizes(), ", ", summary.sizes(), ", ", index.sizes(), ", ",
              pinned.sizes(), " at page ", page);
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&q, &k, &v, &summary, &knew, &vnew})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "atskv::paged_decode: float32 only, got ",
                t->scalar_type());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &summary, &index,
                                                                      &pinned})
    TORCH_CHECK(t->is_contiguous(), "atskv::paged_decode: the store's tensors must be contiguous");
  TORCH_CHECK(index.scalar_type() == at::kLong && pinned.scalar_type() == at::kBool,
              "atskv::paged_decode: index must be int64 and pinned bool");
  const int64_t H = index.size(1), P = pinned.size(1), D = summary.size(2), N = k.size(0);
  const int64_t G = q.size(1);
  TORCH_CHECK(k.size(1) == D && q.dim() == 3 && q.size(0) == H && q.size(2) == D &&
                  knew.sizes() == at::IntArrayRef({H, D}) && vnew.sizes() == knew.sizes() &&
                  pinned.size(0) == H,
              "atskv::paged_decode: q must be (", H, ", g, ", D, "), the new keys and values (",
              H, ", ", D, ") and pinned (", H, ", ", P, "); got ", q.sizes(), ", ", knew.sizes(),
              ", ", vnew.sizes(), ", ", pinned.sizes());
  int64_t* offp = index.data_ptr<int64_t>();  // its rows: offsets, lens, caps
  int64_t* lenp = offp + H;
  const int64_t* capp = offp + 2 * H;
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* lop = summary.data_ptr<float>();  // page (h, p): its min, max, sum in a row
  float* hip = lop + D;
  float* sump = lop + 2 * D;
  const auto qc = q.contiguous(), kn = knew.contiguous(), vn = vnew.contiguous();  // no copy if so
  const float* knp = kn.data_ptr<float>();
  const float* vnp = vn.data_ptr<float>();
  std::vector<int64_t> first(H);  // each head's first page
  for (int64_t h = 0; h < H; ++h) {  // every head checked before any is written
    const int64_t n = lenp[h];
    TORCH_CHECK(offp[h] >= 0 && offp[h] % page == 0 && capp[h] % page == 0 &&
                    offp[h] + capp[h] <= N && capp[h] / page <= P,
                "atskv::paged_decode: head ", h, "'s rows ", offp[h], " + ", capp[h],
                " are not whole pages of ", page, " within the store's ", N, " rows and ", P,
                " page slots");
    TORCH_CHECK(n >= 0 && n < capp[h], "atskv::paged_decode: head ", h,
                " is full (its capacity was sized for fewer generated tokens)");
    first[h] = offp[h] / page;
  }
  for (int64_t h = 0; h < H; ++h) {
    const int64_t n = lenp[h], row = offp[h] + n, p = n / page;
    const float* kr = knp + h * D;
    std::copy(kr, kr + D, kp + row * D);
    std::copy(vnp + h * D, vnp + (h + 1) * D, vp + row * D);
    float* lo = lop + (first[h] + p) * 3 * D;
    float* hi = lo + D;
    float* sm = lo + 2 * D;
    if (n % page == 0) {  // the page's first token
      std::copy(kr, kr + D, lo);
      std::copy(kr, kr + D, hi);
      std::copy(kr, kr + D, sm);
    } else {
      for (int64_t c = 0; c < D; ++c) {
        lo[c] = std::min(lo[c], kr[c]);
        hi[c] = std::max(hi[c], kr[c]);
        sm[c] += kr[c];
      }
    }
    lenp[h] = n + 1;
  }
  const int64_t K = page_slots(max_pages, fit_pages, P);
  std::vector<int64_t> pages(H * K);
  std::unique_ptr<bool[]> chosen(new bool[H * K]);
  const float* qp = qc.data_ptr<float>();
  rank_pages_into(qp, lop, hip, sump, 3 * D, first.data(), lenp, pinned.data_ptr<bool>(), H, G,
                  D, P, page, max_pages, fit_pages, min_pages, mass, scale, pages.data(),
                  chosen.get());
  auto out = at::empty({H, G, D}, q.options());
  attend_pages(qp, kp, vp, offp, lenp, pages.data(), chosen.get(), H, G, D, K, page,
               static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

}  // namespace atskv

TORCH_LIBRARY_FRAGMENT(atskv, m) {
  m.def(
      "rank_pages(Tensor q, Tensor kmin, Tensor kmax, Tensor ksum, Tensor lens, Tensor pinned, "
      "int page, int max_pages, int fit_pages, int min_pages, float mass, float scale) -> "
      "(Tensor, Tensor)");
  m.def(
      "paged_decode(Tensor q, Tensor knew, Tensor vnew, Tensor(a!) k, Tensor(b!) v, "
      "Tensor(c!) summary, Tensor(d!) index, Tensor pinned, int page, int max_pages, "
      "int fit_pages, int min_pages, float mass, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(atskv, CPU, m) {
  m.impl("rank_pages", &atskv::rank_pages_cpu);
  m.impl("paged_decode", &atskv::paged_decode_cpu);
}
