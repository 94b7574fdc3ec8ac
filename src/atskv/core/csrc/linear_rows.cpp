// atskv::linear_rows: y = x W^T (+ bias) for the few rows of a decode step (one per sequence of a
// batch), each weight row read once for all of them, and every output computed by the same
// float operations whatever the number of rows and the row's place among them: a sequence decoded
// in a batch gets the logits it gets alone (BLAS picks other kernels, and other sums, for other
// row counts).
//
// x (M, K), weight (N, K), bias (N) optional -> (M, N), float32. Threads split N. y[m, n] is a sum
// over K in 16 lanes (lane j takes k = c + j, c in steps of 16, by multiply-adds), the lanes
// added as a fixed tree (lane j + lane j+8, then j + j+4, then (0 + 2) + (1 + 3)), then the last
// K % 16 terms in order, then the bias. A pass takes R rows of x against W weight rows (R * W <= 16
// sums, in registers) and adds up the 16 sums' lanes together, pairing lanes as the tree does
// (float addition is commutative: the pairs, not their order, fix the result). Every row goes
// through the same code, whatever the pass: how the compiler rounds a multiply-add, fused or not,
// is the same for all of them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode.h"

#include <algorithm>
#include <cstring>
#include <optional>

namespace atskv {

constexpr int64_t kRows = 8;    // rows of x per pass, at most
constexpr int64_t kGrain = 32;  // weight rows per task of the thread pool, at least
constexpr int64_t kTile = 64;   // weight rows every pass of a batch of rows takes in turn
// floats ahead of the weights being read that a pass of several rows prefetches, into L2 from
// memory (kAhead) and into L1 from L2 (kNear): without it, the multiply-adds and the weights'
// reads took turns (at 8 rows, twice the time of reading the weights alone on a 2-core Xeon);
// one row's pass is bound by the reads and streams them as it is
constexpr int64_t kAhead = 2048;
constexpr int64_t kNear = 512;

// rows r0 .. r0 + R of x against weight rows n .. n + W (sum i = w * R + r)
template <int R, int W>
inline void block(const float* xp, const float* wp, const float* bp, float* yp, int64_t K,
                  int64_t N, int64_t r0, int64_t n) {
  v16 acc[R * W] = {};
  int64_t c = 0;
  for (; c + 16 <= K; c += 16) {
    v16 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load16(xp + (r0 + r) * K + c);
    for (int w = 0; w < W; ++w) {
      const v16 wv = load16(wp + (n + w) * K + c);
      if (R > 1) {
        __builtin_prefetch(wp + (n + w) * K + c + kAhead, 0, 2);  // from memory into L2
        __builtin_prefetch(wp + (n + w) * K + c + kNear, 0, 3);   // and from there into L1
      }
      for (int r = 0; r < R; ++r) acc[w * R + r] += wv * xv[r];
    }
  }
  float sums[16];
  const v16 t = tree16x16(acc, R * W);
  std::memcpy(sums, &t, sizeof sums);
  for (int w = 0; w < W; ++w) {
    const float* wr = wp + (n + w) * K;
    for (int r = 0; r < R; ++r) {
      const float* x = xp + (r0 + r) * K;
      float total = sums[w * R + r];
      for (int64_t cc = c; cc < K; ++cc) total += wr[cc] * x[cc];
      yp[(r0 + r) * N + n + w] = bp ? total + bp[n + w] : total;
    }
  }
}

// rows r0 .. r0 + R against weight rows n0 .. n1: W at a time, the last ones one at a time
template <int R>
void pass(const float* xp, const float* wp, const float* bp, float* yp, int64_t K, int64_t N,
          int64_t r0, int64_t n0, int64_t n1) {
  constexpr int W = 16 / R;
  int64_t n = n0;
  for (; n + W <= n1; n += W) block<R, W>(xp, wp, bp, yp, K, N, r0, n);
  for (; n < n1; ++n) block<R, 1>(xp, wp, bp, yp, K, N, r0, n);
}

using Pass = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                      int64_t, int64_t);
constexpr Pass kPasses[kRows] = {pass<1>, pass<2>, pass<3>, pass<4>,
                                 pass<5>, pass<6>, pass<7>, pass<8>};

at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "atskv::linear_rows: x (M, K) and weight (N, K) expected, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "atskv::linear_rows: float32 only, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat,
                "atskv::linear_rows: bias of ", N, " floats expected, got ", bias->sizes());
    b = bias->contiguous();
  }
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty({M, N}, x.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    // more rows than a pass takes: every pass over a tile of weight rows while it is in cache
    // (a pass over the whole range each read the weights from memory again)
    for (int64_t t0 = n0; t0 < n1; t0 += kTile)
      for (int64_t r0 = 0; r0 < M; r0 += kRows)
        kPasses[std::min(kRows, M - r0) - 1](xp, wp, bp, yp, K, N, r0, t0,
                                             std::min(t0 + kTile, n1));
  });
  return out;
}

}  // namespace atskv

TORCH_LIBRARY_FRAGMENT(atskv, m) {
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(atskv, CPU, m) { m.impl("linear_rows", &atskv::linear_rows_cpu); }
