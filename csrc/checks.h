// Argument checks for the C++/CUDA ops. Messages name the op, the argument and the constraint, in
// the same words as the Python checks (tscd/kernels/_checks.py), which run first for users.
// `op` is a C string (the op's public name), `t` the argument (its name is printed).
#pragma once
#include <ATen/ATen.h>

#define TSCD_CHECK_CONTIGUOUS(op, t) \
  TORCH_CHECK((t).is_contiguous(), op, ": `" #t "` must be contiguous; call .contiguous() first")
#define TSCD_CHECK_DIM(op, t, n, layout) \
  TORCH_CHECK((t).dim() == (n), op, ": `" #t "` must be a " #n "-D tensor " layout "; got shape ", (t).sizes())
#define TSCD_CHECK_DEVICE(op, t, dev) \
  TORCH_CHECK((t).device() == (dev), op, ": `" #t "` must be on ", (dev), "; got ", (t).device())
#define TSCD_CHECK_CPU(op, t) \
  TORCH_CHECK((t).device().is_cpu(), op, ": `" #t "` must be a CPU tensor; got ", (t).device())
#define TSCD_CHECK_CUDA(op, t) \
  TORCH_CHECK((t).device().is_cuda(), op, ": `" #t "` must be a CUDA tensor; got ", (t).device())
#define TSCD_CHECK_FLOAT(op, t)                                                                      \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble, op,            \
              ": `" #t "` must be float32 or float64 (the Python wrapper upcasts half types); got ", \
              (t).scalar_type())
#define TSCD_CHECK_SAME_DTYPE(op, a, b)                                                                      \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": `" #a "` and `" #b "` must share a dtype; got ", \
              (a).scalar_type(), " and ", (b).scalar_type())
