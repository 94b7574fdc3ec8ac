// atskv::paged_attention: one decode query step's exact attention over a static ragged KV store,
// reading the rows in place (no gather copy). CPU kernel; the op's schema is defined here and its
// shape function (fake kernel) in atskv/kernels.py, so that torch.compile(fullgraph=True) keeps
// it as one opaque call.
//
// q (H, g, d): the g query heads of each of H KV heads. k, v (N, d): every head's rows, head h
// owning rows offsets[h] .. offsets[h] + lens[h]; or (H, C, d) without offsets: head h's rows
// 0 .. min(lens[h], C). Rows are read in pages of `page` rows: the page
// slots pages[h, i] where chosen[h, i] (both optional: every page of the head when absent); rows
// of a page past lens[h] are skipped. Softmax(scale * q.k) over the rows read, times v.
//
// Each (KV head, slice of page slots) keeps, per query head of its group, a running max, sum and
// value-weighted sum (online softmax) over its pages, each key and value row loaded once for up to
// 4 query heads; the slices are merged at the end (flash-decoding). The slices hold about equal
// numbers of pages read (at most kSlice rows), dealt to the threads in equal shares.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace atskv {

constexpr int64_t kRun = 128;  // rows read as one block, at most (unless a page is longer)
constexpr int64_t kSlice = 512;  // rows of a slice of a head's pages, at most (or one page)
// floats ahead of the keys being read that are prefetched, with each key's value row: without
// it the attention read a batch's stores at 13-15 GB/s where the weights stream at 23
constexpr int64_t kAhead = 1024;

struct Item {
  int64_t task, h, lo, hi;  // its task; page slots lo .. hi of KV head h, for its g query heads
};

// What the threads share: the items, their tasks, and each item's query heads' partial max, sum
// and values ((items, g) and (items, g, d)).
struct Items {
  const Item* items;
  const int64_t* first_of_thread;
  const Task* tasks;
  int64_t G, D;
  float sc;
  float *part_m, *part_l, *part_acc;
};

// Query heads j0 .. j0 + GG of an item's KV head: online softmax over the item's pages, in runs
// of consecutive chosen pages read as one block, each key and value row loaded once for the GG
// heads. A head's sums are the operations, in the order, that it gets on its own. DD: the head
// dim if known at compile time (the running sums of values then stay in registers), else 0 (and
// GG = 1). s: scratch for the scores.
template <int64_t DD, int GG>
void attend_group(const Items& w, int64_t item, int64_t j0, std::vector<float>& s) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const Item& it = w.items[item];
  const Task& t = w.tasks[it.task];
  const int64_t D = DD ? DD : w.D, G = w.G, K = t.K, page = t.page, h = it.h;
  const int64_t *pgp = t.pgp, *lenp = t.lenp;
  const bool* chp = t.chp;
  const int64_t cap = std::max(kRun, page) + 16;  // scores of a run, per head
  if (static_cast<int64_t>(s.size()) < GG * cap) s.resize(GG * cap);
  constexpr int64_t kV = DD ? DD / 16 : 1;
  v16 vals[GG][kV];
  float m[GG], l[GG];
  const float* qv[GG];
  float* acc[GG];
  for (int g = 0; g < GG; ++g) {
    m[g] = neg_inf;
    l[g] = 0.f;
    qv[g] = t.qp + (h * G + j0 + g) * D;
    acc[g] = w.part_acc + (item * G + j0 + g) * D;
    if (DD)
      for (int64_t c = 0; c < kV; ++c) vals[g][c] = v16{};
    else
      std::fill(acc[g], acc[g] + D, 0.f);
  }
  for (int64_t i = it.lo; i < it.hi;) {
    if (chp && !chp[h * K + i]) {
      ++i;
      continue;
    }
    // a run of chosen pages that follow each other in the store, read as one block of rows
    // (up to kRun): 16-row pages one at a time cost 3 us more per call at 700 rows per head
    const int64_t first = pgp ? pgp[h * K + i] : i;
    int64_t last = first;
    for (++i; i < it.hi && (last - first + 2) * page <= kRun; ++i) {
      if ((chp && !chp[h * K + i]) || (pgp ? pgp[h * K + i] : i) != last + 1) break;
      ++last;
    }
    const int64_t start = first * page;
    const int64_t n = std::min((last + 1) * page, lenp[h]) - start;
    if (start < 0 || n <= 0) continue;
    const float* kr = t.kp + (t.offp[h] + start) * D;
    const float* vr = t.vp + (t.offp[h] + start) * D;
    float pm[GG];
    if (DD) {  // 16 rows' dot products at a time, their lanes added up together
      v16 pmv[GG];  // the scores' max, lane by lane
      for (int g = 0; g < GG; ++g) pmv[g] = v16{} + neg_inf;
      for (int64_t r0 = 0; r0 < n; r0 += 16) {
        const int rows = static_cast<int>(std::min<int64_t>(16, n - r0));
        v16 dots[GG][16];
        for (int r = 0; r < rows; ++r) {
          const float* krow = kr + (r0 + r) * D;
          v16 a[GG] = {};
          for (int64_t c = 0; c < DD; c += 16) {
            const v16 kc = load16(krow + c);
            __builtin_prefetch(krow + c + kAhead, 0, 2);  // to L2: keys ahead, this row's value
            __builtin_prefetch(vr + (r0 + r) * D + c, 0, 2);
            for (int g = 0; g < GG; ++g) a[g] += load16(qv[g] + c) * kc;
          }
          for (int g = 0; g < GG; ++g) dots[g][r] = a[g];
        }
        for (int g = 0; g < GG; ++g) {
          v16 sc = tree16x16(dots[g], rows) * w.sc;
          std::memcpy(s.data() + g * cap + r0, &sc, rows * sizeof(float));
          if (rows < 16) sc = kLane < rows ? sc : pmv[g];
          pmv[g] = sc > pmv[g] ? sc : pmv[g];
        }
      }
      for (int g = 0; g < GG; ++g) {
        float lanes[16];
        std::memcpy(lanes, &pmv[g], sizeof lanes);
        pm[g] = *std::max_element(lanes, lanes + 16);
      }
    } else {
      pm[0] = neg_inf;
      for (int64_t j = 0; j < n; ++j) {
        const float* krow = kr + j * D;
        const float dot = lane_sum(D, [&](int64_t c) { return qv[0][c] * krow[c]; });
        s[j] = dot * w.sc;
        pm[0] = std::max(pm[0], s[j]);
      }
    }
    for (int g = 0; g < GG; ++g) {
      const float nm = std::max(m[g], pm[g]);
      const float corr = std::exp(m[g] - nm);
      l[g] *= corr;
      if (DD) {
        for (int64_t c = 0; c < kV; ++c) vals[g][c] *= corr;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) acc[g][c] *= corr;
      }
      float* __restrict e = s.data() + g * cap;  // apart from the values' loop, which it slowed
      for (int64_t j = 0; j < n; ++j) e[j] = exp_nonpos(e[j] - nm);  // vectorised
      l[g] += lane_sum(n, [&](int64_t j) { return e[j]; });
      m[g] = nm;
    }
    if (DD) {
      for (int64_t j = 0; j < n; ++j) {
        const float* vrow = vr + j * D;
        for (int64_t c = 0; c < kV; ++c) {
          const v16 vc = load16(vrow + 16 * c);
          for (int g = 0; g < GG; ++g) vals[g][c] += s[g * cap + j] * vc;
        }
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float e = s[j];
        const float* vrow = vr + j * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) acc[0][c] += e * vrow[c];
      }
    }
  }
  for (int g = 0; g < GG; ++g) {
    w.part_m[item * G + j0 + g] = m[g];
    w.part_l[item * G + j0 + g] = l[g];
    if (DD) std::memcpy(acc[g], vals[g], sizeof vals[g]);
  }
}

// The items of threads t_begin .. t_end, their query heads up to 4 at a time (2 at head dim 128,
// whose running sums take twice the registers; one at a time at other head dims).
template <int64_t DD>
void attend_items(const Items& w, int64_t t_begin, int64_t t_end) {
  std::vector<float> s;
  constexpr int64_t most = DD == 64 ? 4 : DD == 128 ? 2 : 1;
  for (int64_t item = w.first_of_thread[t_begin]; item < w.first_of_thread[t_end]; ++item) {
    for (int64_t j0 = 0; j0 < w.G;) {
      const int64_t gg = std::min(most, w.G - j0);
      if constexpr (most >= 4) {
        if (gg == 4) attend_group<DD, 4>(w, item, j0, s);
        if (gg == 3) attend_group<DD, 3>(w, item, j0, s);
      }
      if constexpr (most >= 2)
        if (gg == 2) attend_group<DD, 2>(w, item, j0, s);
      if (gg == 1) attend_group<DD, 1>(w, item, j0, s);
      j0 += gg;
    }
  }
}

// The attention of every task, on raw pointers, in one dealing of the threads. A task's result
// depends on nothing but the task: its slices are cut by its own pages read, and each query
// head's slices are merged in their order, whichever thread ran them and whatever the other
// tasks (a sequence of a batch gets what it gets alone).
void attend_tasks(const Task* tasks, int64_t n_tasks, int64_t G, int64_t D, float sc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // the work is dealt by pages read, not by heads: heads are ragged (one head of a layer may hold
  // four times another's rows), and one item per query head left a thread idle while the other
  // read the long heads. Each head's slots are cut into slices of about `per` pages read (about
  // 8 per thread in a task, at most kSlice rows); a slice is one item, for its g query heads;
  // each thread takes the items whose middle falls in its share of all tasks' pages.
  std::vector<Item> items;
  std::vector<int64_t> work_of;  // pages read by each item, times its query heads
  int64_t total_all = 0;
  for (int64_t ti = 0; ti < n_tasks; ++ti) {
    const Task& t = tasks[ti];
    const int64_t H = t.H, K = t.K, page = t.page;
    // page slot i of head h is read when chosen and holding a row
    const auto reads = [&](int64_t h, int64_t i) {
      const int64_t start = (t.pgp ? t.pgp[h * K + i] : i) * page;
      return (!t.chp || t.chp[h * K + i]) && start >= 0 && start < t.lenp[h];
    };
    std::vector<int64_t> n_read(H, 0);
    int64_t total = 0;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < K; ++i) n_read[h] += reads(h, i);
      total += G * n_read[h];
    }
    total_all += total;
    // slices of at most kSlice rows (items are ordered head, slice)
    const int64_t per = std::clamp<int64_t>((total + 8 * threads - 1) / (8 * threads), 1,
                                            std::max<int64_t>(1, kSlice / page));
    for (int64_t h = 0; h < H; ++h) {
      std::vector<int64_t> cuts{0};
      for (int64_t i = 0, n = 0; i < K; ++i)
        if (reads(h, i) && ++n % per == 0 && n < n_read[h]) cuts.push_back(i + 1);
      for (size_t c = 0; c < cuts.size(); ++c) {
        const int64_t lo = cuts[c], hi = c + 1 < cuts.size() ? cuts[c + 1] : K;
        const int64_t work = std::min(per, n_read[h] - static_cast<int64_t>(c) * per);
        items.push_back({ti, h, lo, hi});
        work_of.push_back(G * work);
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<int64_t> first_of_thread(threads + 1, -1);
  for (int64_t p = 0, done = 0; p < n_items; ++p) {
    const int64_t mid = 2 * done + work_of[p];  // twice the item's middle, in pages read
    const int64_t t =
        std::min(threads - 1, mid * threads / (2 * std::max<int64_t>(total_all, 1)));
    for (int64_t u = t; u >= 0 && first_of_thread[u] < 0; --u) first_of_thread[u] = p;
    done += work_of[p];
  }
  for (int64_t u = threads; u >= 0 && first_of_thread[u] < 0; --u) first_of_thread[u] = n_items;
  std::vector<float> part_m(n_items * G, neg_inf), part_l(n_items * G, 0.f),
      part_acc(n_items * G * D);

  const Items work{items.data(), first_of_thread.data(), tasks, G, D, sc,
                   part_m.data(), part_l.data(), part_acc.data()};
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    // the head dims models use, known at compile time: the running sum of values stays in
    // registers and the dot products unroll (at run time it went through memory every row)
    if (D == 64)
      attend_items<64>(work, t_begin, t_end);
    else if (D == 128)
      attend_items<128>(work, t_begin, t_end);
    else
      attend_items<0>(work, t_begin, t_end);
  });

  // each task's query heads' slices merged: rescaled to its largest max (no row read: zeros)
  for (int64_t p = 0, first = 0; first < n_items; first = p) {
    const Task& t = tasks[items[first].task];
    const int64_t HG = t.H * G;
    for (; p < n_items && items[p].task == items[first].task; ++p) {}
    std::vector<float> mx(HG, neg_inf), norm(HG, 0.f);
    for (int64_t i = first; i < p; ++i)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t hg = items[i].h * G + j;
        mx[hg] = std::max(mx[hg], part_m[i * G + j]);
      }
    std::fill(t.op, t.op + HG * D, 0.f);
    for (int64_t i = first; i < p; ++i)
      for (int64_t j = 0; j < G; ++j) {
        const int64_t hg = items[i].h * G + j, ij = i * G + j;
        if (part_m[ij] == neg_inf) continue;
        const float w = std::exp(part_m[ij] - mx[hg]);
        norm[hg] += part_l[ij] * w;
        const float* a = part_acc.data() + ij * D;
        float* o = t.op + hg * D;
        for (int64_t c = 0; c < D; ++c) o[c] += w * a[c];
      }
    for (int64_t hg = 0; hg < HG; ++hg) {
      if (mx[hg] == neg_inf) continue;
      float* o = t.op + hg * D;
      for (int64_t c = 0; c < D; ++c) o[c] /= norm[hg];
    }
  }
}

void attend_pages(const float* qp, const float* kp, const float* vp, const int64_t* offp,
                  const int64_t* lenp, const int64_t* pgp, const bool* chp, int64_t H, int64_t G,
                  int64_t D, int64_t K, int64_t page, float sc, float* op) {
  const Task task{qp, kp, vp, offp, lenp, pgp, chp, H, K, page, op};
  attend_tasks(&task, 1, G, D, sc);
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& offsets, const at::Tensor& lens,
                               const std::optional<at::Tensor>& pages,
                               const std::optional<at::Tensor>& chosen, int64_t page,
                               double scale) {
  TORCH_CHECK(q.dim() == 3 && (k.dim() == 2 || k.dim() == 3) && v.sizes() == k.sizes(),
              "atskv::paged_attention: q must be (H, g, d) and k, v (N, d) or (H, C, d); got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "atskv::paged_attention: float32 only, got ", q.scalar_type());
  TORCH_CHECK(k.size(-1) == q.size(2), "atskv::paged_attention: head dims differ");
  TORCH_CHECK(page >= 1, "atskv::paged_attention: page must be >= 1, got ", page);
  TORCH_CHECK(chosen.has_value() <= pages.has_value(),
              "atskv::paged_attention: chosen needs pages");
  TORCH_CHECK(offsets.has_value() == (k.dim() == 2),
              "atskv::paged_attention: offsets go with flat (N, d) rows, not with (H, C, d)");
  const int64_t H = q.size(0), G = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dim() == 2 || k.size(0) == H, "atskv::paged_attention: k has ", k.size(0),
              " heads, q ", H);
  TORCH_CHECK(lens.numel() == H && (!offsets.has_value() || offsets->numel() == H),
              "atskv::paged_attention: offsets and lens need one entry per KV head");
  const auto qc = q.contiguous();
  // (H, C, d) whose rows are contiguous but heads further apart (the first C rows of each head
  // of a larger buffer) is read in place, not copied
  const bool in_place = k.dim() == 3 && k.stride(2) == 1 && k.stride(1) == D &&
                        k.stride(0) % D == 0 && k.stride(0) >= k.size(1) * D &&
                        v.strides() == k.strides();
  const auto kc = in_place ? k : k.contiguous();
  const auto vc = in_place ? v : v.contiguous();
  // (H, C, d): head h owns rows h * S .. h * S + min(lens[h], C) (a ring's count passes C), S
  // the rows from one head to the next (C when contiguous)
  const int64_t C = k.dim() == 3 ? k.size(1) : 0;
  const int64_t S = k.dim() == 3 ? kc.stride(0) / D : 0;
  std::vector<int64_t> off(H), len(H);
  const auto lens_l = lens.to(at::kLong).contiguous();
  const auto offs_l = offsets.has_value() ? offsets->to(at::kLong).contiguous() : at::Tensor();
  for (int64_t h = 0; h < H; ++h) {
    off[h] = offs_l.defined() ? offs_l.data_ptr<int64_t>()[h] : h * S;
    len[h] = lens_l.data_ptr<int64_t>()[h];
    if (C) len[h] = std::min(len[h], C);
  }
  const int64_t* offp = off.data();
  const int64_t* lenp = len.data();
  const int64_t N = k.dim() == 3 ? (H - 1) * S + C : k.size(0);
  at::Tensor pg, ch;
  int64_t K = 0;  // page slots per head
  if (pages.has_value()) {
    TORCH_CHECK(pages->dim() == 2 && pages->size(0) == H,
                "atskv::paged_attention: pages must be (H, K)");
    pg = pages->to(at::kLong).contiguous();
    K = pg.size(1);
    if (chosen.has_value()) {
      TORCH_CHECK(chosen->sizes() == pages->sizes(),
                  "atskv::paged_attention: chosen must have the shape of pages");
      ch = chosen->to(at::kBool).contiguous();
    }
  } else {
    for (int64_t h = 0; h < H; ++h) K = std::max(K, (lenp[h] + page - 1) / page);
  }
  for (int64_t h = 0; h < H; ++h)
    TORCH_CHECK(offp[h] >= 0 && lenp[h] >= 0 && offp[h] + lenp[h] <= N,
                "atskv::paged_attention: head ", h, "'s rows fall outside k");
  const int64_t* pgp = pg.defined() ? pg.data_ptr<int64_t>() : nullptr;
  const bool* chp = ch.defined() ? ch.data_ptr<bool>() : nullptr;
  auto out = at::empty({H, G, D}, q.options());
  attend_pages(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), offp, lenp, pgp,
               chp, H, G, D, K, page, static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

// atskv::rows_decode: one layer's decode step for the rows of a batch whose layer is an append
// and exact attention over their own static store (every row of every head, in blocks of `page`),
// in one call: each row's stores and sizes are its own, and the threads are dealt over all rows'
// heads at once. Row b of those taken is row rows[b] of the step: its queries q[rows[b]] (H, g, d),
// its new key and value knew[rows[b]], vnew[rows[b]] (H, d) (the step's whole tensors go in, not
// a gather of the rows taken, which a compiled step fused with the queries' rotary and rounded
// otherwise than for a batch of one); its store
// k[b], v[b] either (H, C, d) with index[b] (H,) the rows written per head (StaticKV), or (N, d)
// with index[b] (3, H) each head's first row, rows written and rows owned (StaticPagedKV). The new
// key and value go to each head's next row (a ring's, sinks[b] >= 0: once full, its oldest row
// after the sinks) and its count grows by one (every row checked first), then the attention, as
// paged_attention over the row's store. (B, H, g, d) for the B rows taken.
at::Tensor rows_decode_cpu(const at::Tensor& q, const at::Tensor& knew, const at::Tensor& vnew,
                           at::IntArrayRef rows, at::TensorList k, at::TensorList v,
                           at::TensorList index, at::IntArrayRef sinks, int64_t page,
                           double scale) {
  const int64_t B = static_cast<int64_t>(k.size());
  TORCH_CHECK(q.dim() == 4 && static_cast<int64_t>(rows.size()) == B && v.size() == k.size() &&
                  index.size() == k.size() && static_cast<int64_t>(sinks.size()) == B,
              "atskv::rows_decode: q must be (n, H, g, d) with one store per row taken; got q ",
              q.sizes(), ", ", rows.size(), " rows and ", k.size(), " stores");
  const int64_t H = q.size(1), G = q.size(2), D = q.size(3);
  TORCH_CHECK(knew.dim() == 3 && knew.size(0) == q.size(0) && knew.size(1) == H &&
                  knew.size(2) == D && vnew.sizes() == knew.sizes(),
              "atskv::rows_decode: the new keys and values must be (", q.size(0), ", ", H, ", ",
              D, "); got ", knew.sizes(), ", ", vnew.sizes());
  for (const int64_t r : rows)
    TORCH_CHECK(r >= 0 && r < q.size(0), "atskv::rows_decode: row ", r, " out of range");
  TORCH_CHECK(page >= 1, "atskv::rows_decode: page must be >= 1, got ", page);
  for (const at::Tensor* t : {&q, &knew, &vnew})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "atskv::rows_decode: float32 only");
  std::vector<std::vector<int64_t>> off(B, std::vector<int64_t>(H)), len(B, std::vector<int64_t>(H));
  std::vector<int64_t*> count(B);
  std::vector<int64_t> stride(B);  // rows per head of an (H, C, d) store, else 0
  for (int64_t b = 0; b < B; ++b) {  // every row checked before any is written
    const at::Tensor &kb = k[b], &vb = v[b], &ib = index[b];
    TORCH_CHECK((kb.dim() == 2 || (kb.dim() == 3 && kb.size(0) == H)) && vb.sizes() == kb.sizes() &&
                    kb.size(-1) == D && kb.scalar_type() == at::kFloat &&
                    vb.scalar_type() == at::kFloat && kb.is_contiguous() && vb.is_contiguous(),
                "atskv::rows_decode: row ", b, "'s store must be contiguous float32 (", H,
                ", C, ", D, ") or (N, ", D, "); got ", kb.sizes());
    TORCH_CHECK(ib.scalar_type() == at::kLong && ib.is_contiguous() &&
                    ib.sizes() == (kb.dim() == 3 ? at::IntArrayRef({H}) : at::IntArrayRef({3, H})),
                "atskv::rows_decode: row ", b, "'s index must be int64 (H,) or (3, H); got ",
                ib.sizes());
    int64_t* ip = ib.data_ptr<int64_t>();
    const int64_t C = kb.dim() == 3 ? kb.size(1) : 0;
    stride[b] = C;
    count[b] = C ? ip : ip + H;
    TORCH_CHECK(sinks[b] < 0 || (C && sinks[b] < C),
                "atskv::rows_decode: row ", b, ": a ring (sinks ", sinks[b],
                ") needs an (H, C, d) store with C above its sinks");
    for (int64_t h = 0; h < H; ++h) {
      off[b][h] = C ? h * C : ip[h];
      const int64_t n = count[b][h], cap = C ? C : ip[2 * H + h];
      TORCH_CHECK(n >= 0 && (n < cap || sinks[b] >= 0) &&
                      off[b][h] + cap <= (C ? H * C : kb.size(0)),
                  "atskv::rows_decode: row ", b, ", head ", h,
                  " is full (its capacity was sized for fewer generated tokens)");
    }
  }
  const auto qc = q.contiguous(), kn = knew.contiguous(), vn = vnew.contiguous();
  auto out = at::empty({B, H, G, D}, q.options());
  float* op = out.data_ptr<float>();
  std::vector<Task> tasks(B);
  for (int64_t b = 0; b < B; ++b) {
    float* kp = k[b].data_ptr<float>();
    float* vp = v[b].data_ptr<float>();
    int64_t K = 0;
    const int64_t C = stride[b], ring = sinks[b];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = count[b][h];
      // a ring, once full, overwrites its oldest row after the sinks (StaticKV.append)
      const int64_t slot = ring < 0 || n < C ? n : ring + (n - C) % (C - ring);
      const int64_t row = off[b][h] + slot;
      const float* kr = kn.data_ptr<float>() + (rows[b] * H + h) * D;
      const float* vr = vn.data_ptr<float>() + (rows[b] * H + h) * D;
      std::copy(kr, kr + D, kp + row * D);
      std::copy(vr, vr + D, vp + row * D);
      ++count[b][h];
      len[b][h] = C ? std::min(count[b][h], C) : count[b][h];
      K = std::max(K, (len[b][h] + page - 1) / page);
    }
    tasks[b] = {qc.data_ptr<float>() + rows[b] * H * G * D, kp, vp, off[b].data(), len[b].data(),
                nullptr, nullptr, H, K, page, op + b * H * G * D};
  }
  attend_tasks(tasks.data(), B, G, D, static_cast<float>(scale));
  return out;
}

}  // namespace atskv

TORCH_LIBRARY(atskv, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor? offsets, Tensor lens, Tensor? pages, "
      "Tensor? chosen, int page, float scale) -> Tensor");
  m.def(
      "rows_decode(Tensor q, Tensor knew, Tensor vnew, int[] rows, Tensor(a!)[] k, Tensor(b!)[] v, "
      "Tensor(c!)[] index, int[] sinks, int page, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(atskv, CPU, m) {
  m.impl("paged_attention", &atskv::paged_attention_cpu);
  m.impl("rows_decode", &atskv::rows_decode_cpu);
}
