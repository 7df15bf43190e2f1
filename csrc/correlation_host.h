// correlation: host-side argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "correlation.h"

namespace tscd {
namespace correlation {

struct Sizes {
  int64_t B, N1, N2, Ct, Cs;
};

// t1 (B, N1, Ct), t2 (B, N2, Ct), s1 (B, N1, Cs), s2 (B, N2, Cs), offset (B, N1); grad (B,) when defined.
inline Sizes check_inputs(const char* op, const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1,
                          const at::Tensor& s2, const at::Tensor& offset, const at::Tensor& grad) {
  TSCD_CHECK_DIM(op, t1, 3, "(B, N1, Ct)");
  TSCD_CHECK_DIM(op, t2, 3, "(B, N2, Ct)");
  TSCD_CHECK_DIM(op, s1, 3, "(B, N1, Cs)");
  TSCD_CHECK_DIM(op, s2, 3, "(B, N2, Cs)");
  TSCD_CHECK_DIM(op, offset, 2, "(B, N1)");
  const Sizes z{t1.size(0), t1.size(1), t2.size(1), t1.size(2), s1.size(2)};
  TORCH_CHECK(t2.size(0) == z.B && s1.size(0) == z.B && s2.size(0) == z.B && offset.size(0) == z.B, op,
              ": batch sizes differ: t1 ", t1.sizes(), ", t2 ", t2.sizes(), ", s1 ", s1.sizes(), ", s2 ", s2.sizes(),
              ", offset ", offset.sizes());
  TORCH_CHECK(s1.size(1) == z.N1 && offset.size(1) == z.N1, op, ": `t1`, `s1` and `offset` must share N1; got ",
              t1.sizes(), ", ", s1.sizes(), ", ", offset.sizes());
  TORCH_CHECK(s2.size(1) == z.N2, op, ": `t2` and `s2` must share N2; got ", t2.sizes(), " and ", s2.sizes());
  TORCH_CHECK(t2.size(2) == z.Ct, op, ": `t1` and `t2` must share Ct; got ", t1.sizes(), " and ", t2.sizes());
  TORCH_CHECK(s2.size(2) == z.Cs, op, ": `s1` and `s2` must share Cs; got ", s1.sizes(), " and ", s2.sizes());
  TORCH_CHECK(z.B > 0 && z.N1 > 0 && z.N2 > 0 && z.Ct > 0 && z.Cs > 0, op, ": empty inputs: t1 ", t1.sizes(),
              ", t2 ", t2.sizes(), ", s1 ", s1.sizes());
  TSCD_CHECK_FLOAT(op, t1);
  for (const at::Tensor* t : {&t2, &s1, &s2, &offset}) {
    TORCH_CHECK(t->scalar_type() == t1.scalar_type(), op, ": all inputs must share a dtype; got ", t1.scalar_type(),
                " and ", t->scalar_type());
    TORCH_CHECK(t->device() == t1.device(), op, ": all inputs must be on one device; got ", t1.device(), " and ",
                t->device());
  }
  TSCD_CHECK_CONTIGUOUS(op, t1);
  TSCD_CHECK_CONTIGUOUS(op, t2);
  TSCD_CHECK_CONTIGUOUS(op, s1);
  TSCD_CHECK_CONTIGUOUS(op, s2);
  TSCD_CHECK_CONTIGUOUS(op, offset);
  if (grad.defined()) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == z.B, op, ": `grad` must have shape (B,) = (", z.B, ",); got ",
                grad.sizes());
    TORCH_CHECK(grad.scalar_type() == t1.scalar_type() && grad.device() == t1.device(), op,
                ": `grad` must match the inputs' dtype and device; got ", grad.scalar_type(), " on ", grad.device());
    TSCD_CHECK_CONTIGUOUS(op, grad);
  }
  return z;
}

}  // namespace correlation
}  // namespace tscd
