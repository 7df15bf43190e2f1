// correlation (SCD loss) on the CPU: at::parallel_for (OpenMP) over (image, block of kRows view-1 points);
// each block streams the view-2 points in chunks of kChunk, computing its (kRows x kChunk) tile of F and G
// in a small stack buffer. The backward computes each tile once and takes both sides' gradients from it
// (ds1 += D s2 and ds2 += D^T s1 in one sweep over the channels; view-2 sums in per-part buffers); the fused
// forward+backward (correlation_fwd_grad, for training) is that sweep with grad = 1 plus the forward's sums. The
// per-pair math is csrc/correlation.h; memory beyond the inputs is O(threads*B*N*C).
// Inner features are read transposed ((C, N) per image) so the innermost loops run over points, contiguous
// and vectorisable; each block of outer features is packed (C, kRows) so that the register blocks read it by
// broadcasts from memory; reductions use `omp simd reduction`. The loops (correlation_cpu_pass.h) are compiled for
// AVX-512, AVX2 + FMA and the baseline (isa_each.h), each with register blocks sized to its vector registers; each
// op call runs the copy of cpu::isa_level().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../correlation_host.h"
#include "isa.h"

namespace tscd {
namespace {

using correlation::Sizes;
constexpr int kRows = 8;      // outer points per block (register/L1 reuse of each inner feature read)
constexpr int kChunk = 256;   // inner points per tile
constexpr int kPanel = 64;    // outer points per backward work item (a multiple of kRows): each chunk of inner
                              // features and gradients is read from cache by its kPanel / kRows blocks

#define TSCD_ISA_LOOPS "correlation_cpu_pass.h"
#include "isa_each.h"

template <typename PassT, typename scalar_t>
PassT make_pass(const at::Tensor& out_s, const at::Tensor& out_t, const at::Tensor& in_sT, const at::Tensor& in_tT,
                const at::Tensor& offset, int64_t b, bool clamp) {
  const int64_t n_out = out_s.size(1), n_in = in_sT.size(2), Cs = out_s.size(2), Ct = out_t.size(2);
  PassT p;
  p.out_s = out_s.data_ptr<scalar_t>() + b * n_out * Cs;
  p.out_t = out_t.data_ptr<scalar_t>() + b * n_out * Ct;
  p.in_sT = in_sT.data_ptr<scalar_t>() + b * Cs * n_in;
  p.in_tT = in_tT.data_ptr<scalar_t>() + b * Ct * n_in;
  p.offset = offset.data_ptr<scalar_t>() + b * offset.size(1);
  p.n_out = n_out;
  p.n_in = n_in;
  p.Cs = Cs;
  p.Ct = Ct;
  p.clamp = clamp;
  return p;
}

inline int64_t blocks_of(int64_t n) { return (n + kRows - 1) / kRows; }

// out[b] = sum_k partial[b * n + k] for b < B, in double and in a fixed order (deterministic)
template <typename scalar_t>
void per_image_sums(const std::vector<double>& partial, int64_t B, at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(partial.size()) / B;
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t k = 0; k < n; ++k) s += partial[b * n + k];
    out.data_ptr<scalar_t>()[b] = static_cast<scalar_t>(s);
  }
}

// The loops of the forward and of the backward, for one instruction set's Pass.
template <template <typename> class PassT, typename scalar_t>
void forward_all(const at::Tensor& t1, const at::Tensor& s1, const at::Tensor& s2T, const at::Tensor& t2T,
                 const at::Tensor& offset, const Sizes& z, bool clamp, std::vector<double>& partial) {
  const int64_t nb = blocks_of(z.N1);
  at::parallel_for(0, z.B * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> pk(kRows * (z.Cs + z.Ct));  // packed-block scratch, one per thread's range
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / nb, o0 = (w % nb) * kRows;
      const auto pass = make_pass<PassT<scalar_t>, scalar_t>(s1, t1, s2T, t2T, offset, b, clamp);
      partial[w] = pass.forward(o0, static_cast<int>(std::min<int64_t>(kRows, z.N1 - o0)), pk.data());
    }
  });
}

// One sweep over (image, panel of kPanel view-1 points), split into `parts` contiguous ranges run in parallel.
// The view-1 gradients (ds1, dt1, dc) belong to their panel; the view-2 ones are summed over all panels, so each
// part accumulates them into its own transposed buffer (parts, B, C, N2), reduced at the end (the split and the
// summation order depend only on the thread count: deterministic for a given one). g == nullptr: the gradient of
// out_b itself (g_b = 1), and with `totals` (B * parts, image-major) the forward's per-part sums from the same tiles
// (the fused forward+backward).
template <template <typename> class PassT, typename scalar_t>
void backward_all(const scalar_t* g, const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1,
                  const at::Tensor& s2, const at::Tensor& offset, const Sizes& z, bool clamp, bool teacher_grad,
                  at::Tensor& ds1, at::Tensor& ds2, at::Tensor& dt1, at::Tensor& dt2, at::Tensor& dc,
                  std::vector<double>* totals = nullptr) {
  const at::Tensor s2T = s2.transpose(1, 2).contiguous(), t2T = t2.transpose(1, 2).contiguous();
  const int64_t np = (z.N1 + kPanel - 1) / kPanel, work = z.B * np;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work));
  at::Tensor ds2T = at::zeros({parts, z.B, z.Cs, z.N2}, s2.options());
  at::Tensor dt2T = teacher_grad ? at::zeros({parts, z.B, z.Ct, z.N2}, t2.options()) : at::Tensor();
  if (totals != nullptr) totals->assign(z.B * parts, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t w = work * q / parts; w < work * (q + 1) / parts; ++w) {
        const int64_t b = w / np, p0 = (w % np) * kPanel;
        const auto pass = make_pass<PassT<scalar_t>, scalar_t>(s1, t1, s2T, t2T, offset, b, clamp);
        scalar_t* dt2q = teacher_grad ? dt2T.data_ptr<scalar_t>() + (q * z.B + b) * z.Ct * z.N2 : nullptr;
        pass.backward(p0, std::min<int64_t>(kPanel, z.N1 - p0), g != nullptr ? g[b] : scalar_t(1), teacher_grad,
                      teacher_grad, ds1.data_ptr<scalar_t>() + b * z.N1 * z.Cs,
                      teacher_grad ? dt1.data_ptr<scalar_t>() + b * z.N1 * z.Ct : nullptr,
                      teacher_grad ? dc.data_ptr<scalar_t>() + b * z.N1 : nullptr,
                      ds2T.data_ptr<scalar_t>() + (q * z.B + b) * z.Cs * z.N2, dt2q,
                      totals != nullptr ? totals->data() + b * parts + q : nullptr);
      }
    }
  });
  ds2 = (parts == 1 ? ds2T[0] : ds2T.sum(0)).transpose(1, 2).contiguous();
  if (teacher_grad) dt2 = (parts == 1 ? dt2T[0] : dt2T.sum(0)).transpose(1, 2).contiguous();
}

at::Tensor correlation_fwd_cpu(const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1,
                               const at::Tensor& s2, const at::Tensor& offset, bool clamp_student) {
  TSCD_CHECK_CPU("correlation", t1);
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, at::Tensor());
  const at::Tensor s2T = s2.transpose(1, 2).contiguous(), t2T = t2.transpose(1, 2).contiguous();
  const int64_t nb = blocks_of(z.N1);
  std::vector<double> partial(z.B * nb, 0.0);
  at::Tensor out = at::empty({z.B}, t1.options());
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_fwd_cpu", [&] {
    with_isa([&](auto isa) {
      forward_all<decltype(isa)::template PassFor, scalar_t>(t1, s1, s2T, t2T, offset, z, clamp_student, partial);
    });
    per_image_sums<scalar_t>(partial, z.B, out);
  });
  return out;
}

std::vector<at::Tensor> correlation_bwd_cpu(const at::Tensor& grad, const at::Tensor& t1, const at::Tensor& t2,
                                            const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& offset,
                                            bool clamp_student, bool teacher_grad) {
  TSCD_CHECK_CPU("correlation", t1);
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, grad);
  at::Tensor ds1 = at::zeros_like(s1), ds2;
  at::Tensor dt1 = at::zeros_like(t1), dt2, dc = at::zeros_like(offset);
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_bwd_cpu", [&] {
    with_isa([&](auto isa) {
      backward_all<decltype(isa)::template PassFor, scalar_t>(grad.data_ptr<scalar_t>(), t1, t2, s1, s2, offset, z,
                                                              clamp_student, teacher_grad, ds1, ds2, dt1, dt2, dc);
    });
  });
  if (!dt2.defined()) dt2 = at::zeros_like(t2);
  return {ds1, ds2, dt1, dt2, dc};
}

// The fused forward+backward: out_b and the gradients of out_b itself (g_b = 1; the autograd backward scales them by
// the incoming g_b), from one sweep over the tiles, so a training step computes each tile once instead of twice
// (forward, then backward). The teacher gradients are empty (shape (0,)) unless teacher_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> correlation_fwd_grad_cpu(
    const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& offset,
    bool clamp_student, bool teacher_grad) {
  TSCD_CHECK_CPU("correlation", t1);
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, at::Tensor());
  at::Tensor ds1 = at::zeros_like(s1), ds2;
  at::Tensor dt1 = teacher_grad ? at::zeros_like(t1) : t1.new_empty({0}), dt2;
  at::Tensor dc = teacher_grad ? at::zeros_like(offset) : offset.new_empty({0});
  at::Tensor out = at::empty({z.B}, t1.options());
  std::vector<double> totals;
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_fwd_grad_cpu", [&] {
    with_isa([&](auto isa) {
      backward_all<decltype(isa)::template PassFor, scalar_t>(nullptr, t1, t2, s1, s2, offset, z, clamp_student,
                                                              teacher_grad, ds1, ds2, dt1, dt2, dc, &totals);
    });
    per_image_sums<scalar_t>(totals, z.B, out);
  });
  if (!dt2.defined()) dt2 = t2.new_empty({0});
  return {out, ds1, ds2, dt1, dt2, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CPU, m) {
  m.impl("correlation_fwd", &correlation_fwd_cpu);
  m.impl("correlation_bwd", &correlation_bwd_cpu);
  m.impl("correlation_fwd_grad", &correlation_fwd_grad_cpu);
}

}  // namespace tscd
