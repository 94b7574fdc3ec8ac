// atskv::linear_rows: y = x W^T (+ bias) for the few rows of a decode step (one per sequence of a
// batch), each weight row read once for all of them, and every output computed by the same
// float operations whatever the number of rows and the row's place among them: a sequence decoded
// in a batch gets the logits it gets alone (BLAS picks other kernels, and other sums, for other
// row counts).
//
// x (M, K), weight (N, K), bias (N) optional -> (M, N), float32. Threads split N. y[m, n] is a sum
// over K in 16 lanes (lane j takes k = c + j, c in steps of 16), the lanes
// added as a fixed tree, then the last K % 16 terms in order, then the bias. Rows go through a
// weight row in passes of at most kRows, their lanes in registers. (The same code runs for every
// row: how the compiler rounds a multiply-add, fused or not, is the same for all of them.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

namespace atskv {

constexpr int64_t kRows = 8;
constexpr int64_t kGrain = 16;  // weight rows per task of the thread pool, at least

// 16 floats as one vector of GCC's vector extension (one AVX-512 register, two AVX ones, ...)
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float tree16(v16 v) {
  float lane[16], t8[8], t4[4];
  std::memcpy(lane, &v, sizeof lane);
  for (int j = 0; j < 8; ++j) t8[j] = lane[j] + lane[j + 8];
  for (int j = 0; j < 4; ++j) t4[j] = t8[j] + t8[j + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

// rows r0 .. r0 + R of x against weight rows n0 .. n1
template <int R>
void pass(const float* xp, const float* wp, const float* bp, float* yp, int64_t K, int64_t N,
          int64_t r0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = wp + n * K;
    v16 acc[R] = {};
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const v16 wv = load16(w + c);
      for (int r = 0; r < R; ++r) acc[r] += wv * load16(xp + (r0 + r) * K + c);
    }
    for (int r = 0; r < R; ++r) {
      const float* x = xp + (r0 + r) * K;
      float total = tree16(acc[r]);
      for (int64_t cc = c; cc < K; ++cc) total += w[cc] * x[cc];
      yp[(r0 + r) * N + n] = bp ? total + bp[n] : total;
    }
  }
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
    for (int64_t r0 = 0; r0 < M; r0 += kRows)
      kPasses[std::min(kRows, M - r0) - 1](xp, wp, bp, yp, K, N, r0, n0, n1);
  });
  return out;
}

}  // namespace atskv

TORCH_LIBRARY_FRAGMENT(atskv, m) {
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(atskv, CPU, m) { m.impl("linear_rows", &atskv::linear_rows_cpu); }
