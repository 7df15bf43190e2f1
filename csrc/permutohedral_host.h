// permutohedral: host-side argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "checks.h"
#include "permutohedral.h"

namespace tscd {
namespace perm {

// values (fwd) or grad_out (bwd): (B, K, N); features: (B, D, N), 1 <= D <= kMaxDim. Returns D.
inline int check_inputs(const char* op, const at::Tensor& values, const at::Tensor& features) {
  TSCD_CHECK_DIM(op, values, 3, "(B, K, N)");
  TSCD_CHECK_DIM(op, features, 3, "(B, D, N)");
  TSCD_CHECK_FLOAT(op, values);
  TSCD_CHECK_SAME_DTYPE(op, values, features);
  TSCD_CHECK_CONTIGUOUS(op, values);
  TSCD_CHECK_CONTIGUOUS(op, features);
  TSCD_CHECK_DEVICE(op, features, values.device());
  TORCH_CHECK(values.size(0) == features.size(0) && values.size(2) == features.size(2), op,
              ": `values` (B, K, N) and `features` (B, D, N) must share B and N; got ", values.sizes(), " and ",
              features.sizes());
  TORCH_CHECK(features.size(1) >= 1 && features.size(1) <= kMaxDim, op, ": `features` must have 1 to ", kMaxDim,
              " feature dimensions (dim 1); got ", features.size(1));
  TORCH_CHECK(values.size(2) * (features.size(1) + 1) < (int64_t(1) << 30), op,
              ": too many points for the lattice: N * (D + 1) must be < 2^30; got N = ", values.size(2));
  TORCH_CHECK(values.numel() > 0, op, ": `values` must not be empty; got shape ", values.sizes());
  return static_cast<int>(features.size(1));
}

// dense_crf_fwd: unary (B, K, N); one features tensor (B, D_k, N) and one weight per kernel.
inline void check_crf_inputs(const char* op, const at::Tensor& unary, at::TensorList features,
                             at::ArrayRef<double> weights, int64_t num_iter) {
  TORCH_CHECK(features.size() == weights.size(), op, ": one weight per kernel: got ", features.size(),
              " feature tensors and ", weights.size(), " weights");
  TORCH_CHECK(num_iter >= 0, op, ": `num_iter` must be >= 0; got ", num_iter);
  TSCD_CHECK_DIM(op, unary, 3, "(B, K, N)");
  TSCD_CHECK_CONTIGUOUS(op, unary);
  for (const at::Tensor& f : features) check_inputs(op, unary, f);
}

// Mean-field inference of docs/method.md 6 with `filter(k, values)` = K_k values (unnormalised, self term included),
// written once for both devices; the same loop as tscd/kernels/reference/permutohedral.py::mean_field.
//   Q = softmax(-U); num_iter times Q = softmax(-U + sum_k w_k n_k K_k (n_k Q)), n_k = (K_k 1)^-1/2
template <typename Filter>
at::Tensor mean_field(const at::Tensor& unary, at::ArrayRef<double> weights, int64_t num_iter, Filter&& filter) {
  std::vector<at::Tensor> norms;
  for (size_t k = 0; k < weights.size(); ++k) {
    norms.push_back(filter(k, at::ones_like(unary.narrow(1, 0, 1)).contiguous()).clamp_min(1e-20).rsqrt());
  }
  at::Tensor q = at::softmax(-unary, 1);
  for (int64_t it = 0; it < num_iter; ++it) {
    at::Tensor logits = -unary;
    for (size_t k = 0; k < weights.size(); ++k) {
      logits.add_(filter(k, (q * norms[k]).contiguous()) * norms[k], weights[k]);
    }
    q = at::softmax(logits, 1);
  }
  return q;
}

}  // namespace perm
}  // namespace tscd
