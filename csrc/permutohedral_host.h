// permutohedral: host-side argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace perm
}  // namespace tscd
