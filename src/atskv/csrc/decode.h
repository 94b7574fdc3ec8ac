// The CPU decode kernels' functions that one op calls from another file (atskv::paged_decode ranks
// with rank_pages_cpu, then attends with paged_attention_cpu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace atskv {

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& offsets, const at::Tensor& lens,
                               const std::optional<at::Tensor>& pages,
                               const std::optional<at::Tensor>& chosen, int64_t page,
                               double scale);

std::tuple<at::Tensor, at::Tensor> rank_pages_cpu(const at::Tensor& q, const at::Tensor& kmin,
                                                  const at::Tensor& kmax, const at::Tensor& ksum,
                                                  const at::Tensor& lens, const at::Tensor& pinned,
                                                  int64_t page, int64_t max_pages,
                                                  int64_t min_pages, double mass, double scale);

}  // namespace atskv
