// correlation (SCD loss) on the CPU: at::parallel_for (OpenMP) over (image, block of kRows outer points);
// each block streams the inner points in chunks of kChunk, recomputing its (kRows x kChunk) tile of F and G
// in a small stack buffer. The per-pair math is csrc/correlation.h; memory beyond the inputs is O(B*N*C).
// Inner features are read transposed ((C, N) per image) so the innermost loops run over points, contiguous
// and vectorisable; reductions use `omp simd reduction`.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../correlation_host.h"

namespace tscd {
namespace {

using correlation::Sizes;
constexpr int kRows = 4;      // outer points per block (register/L1 reuse of each inner feature read)
constexpr int kChunk = 256;   // inner points per tile

// One pass over one image. Outer points o (n_out, *) row-major, inner points transposed (C, n_in).
// kOffsetInner: the offset c is indexed by the inner point (column pass) instead of the outer one.
template <typename scalar_t, bool kOffsetInner>
struct Pass {
  const scalar_t* out_s;  // (n_out, Cs)
  const scalar_t* out_t;  // (n_out, Ct)
  const scalar_t* in_sT;  // (Cs, n_in)
  const scalar_t* in_tT;  // (Ct, n_in)
  const scalar_t* offset;
  int64_t n_out, n_in, Cs, Ct;
  bool clamp;

  // g[r][j] = out_s[o0 + r] . in_s[j0 + j], f likewise (r < rows, j < nj)
  void tile(int64_t o0, int rows, int64_t j0, int nj, scalar_t (*g)[kChunk], scalar_t (*f)[kChunk]) const {
    for (int r = 0; r < rows; ++r) {
      std::fill(g[r], g[r] + nj, scalar_t(0));
      std::fill(f[r], f[r] + nj, scalar_t(0));
    }
    for (int64_t c = 0; c < Cs; ++c) {
      const scalar_t* col = in_sT + c * n_in + j0;
      for (int r = 0; r < rows; ++r) {
        const scalar_t a = out_s[(o0 + r) * Cs + c];
        scalar_t* gr = g[r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) gr[j] += a * col[j];
      }
    }
    for (int64_t c = 0; c < Ct; ++c) {
      const scalar_t* col = in_tT + c * n_in + j0;
      for (int r = 0; r < rows; ++r) {
        const scalar_t a = out_t[(o0 + r) * Ct + c];
        scalar_t* fr = f[r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) fr[j] += a * col[j];
      }
    }
    for (int r = 0; r < rows; ++r) {
      scalar_t* fr = f[r];
      if (kOffsetInner) {
        const scalar_t* off = offset + j0;
#pragma omp simd
        for (int j = 0; j < nj; ++j) fr[j] += off[j];
      } else {
        const scalar_t off = offset[o0 + r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) fr[j] += off;
      }
    }
  }

  // sum over the block's pairs of P(G) * (F + c), accumulated in double across tiles
  double forward(int64_t o0, int rows) const {
    scalar_t g[kRows][kChunk], f[kRows][kChunk];
    double total = 0;
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      tile(o0, rows, j0, nj, g, f);
      for (int r = 0; r < rows; ++r) {
        scalar_t s = 0;
        const bool cl = clamp;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < nj; ++j) s += correlation::pair_value<scalar_t>(g[r][j], f[r][j], cl);
        total += static_cast<double>(s);
      }
    }
    return total;
  }

  // gradients of the block's outer points: ds (rows, Cs), dt (rows, Ct) (if with_t), dc (rows) (if with_c)
  void backward(int64_t o0, int rows, scalar_t grad, bool with_t, bool with_c, scalar_t* ds, scalar_t* dt,
                scalar_t* dc) const {
    scalar_t d[kRows][kChunk], e[kRows][kChunk];
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      tile(o0, rows, j0, nj, d, e);  // d <- G, e <- F + c
      const bool cl = clamp;
      for (int r = 0; r < rows; ++r) {
        scalar_t* dr = d[r];
        scalar_t* er = e[r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) {
          scalar_t dd, ee;
          correlation::pair_grads<scalar_t>(dr[j], er[j], cl, grad, &dd, &ee);
          dr[j] = dd;
          er[j] = ee;
        }
        for (int64_t c = 0; c < Cs; ++c) {
          const scalar_t* col = in_sT + c * n_in + j0;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int j = 0; j < nj; ++j) s += dr[j] * col[j];
          ds[(o0 + r) * Cs + c] += s;
        }
        if (with_t) {
          for (int64_t c = 0; c < Ct; ++c) {
            const scalar_t* col = in_tT + c * n_in + j0;
            scalar_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < nj; ++j) s += er[j] * col[j];
            dt[(o0 + r) * Ct + c] += s;
          }
        }
        if (with_c) {
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int j = 0; j < nj; ++j) s += er[j];
          dc[o0 + r] += s;
        }
      }
    }
  }
};

template <typename scalar_t, bool kOffsetInner>
Pass<scalar_t, kOffsetInner> make_pass(const at::Tensor& out_s, const at::Tensor& out_t, const at::Tensor& in_sT,
                                       const at::Tensor& in_tT, const at::Tensor& offset, int64_t b, bool clamp) {
  const int64_t n_out = out_s.size(1), n_in = in_sT.size(2), Cs = out_s.size(2), Ct = out_t.size(2);
  Pass<scalar_t, kOffsetInner> p;
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

at::Tensor correlation_fwd_cpu(const at::Tensor& t1, const at::Tensor& t2, const at::Tensor& s1,
                               const at::Tensor& s2, const at::Tensor& offset, bool clamp_student) {
  TSCD_CHECK_CPU("correlation", t1);
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, at::Tensor());
  const at::Tensor s2T = s2.transpose(1, 2).contiguous(), t2T = t2.transpose(1, 2).contiguous();
  const int64_t nb = blocks_of(z.N1);
  std::vector<double> partial(z.B * nb, 0.0);
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_fwd_cpu", [&] {
    at::parallel_for(0, z.B * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / nb, o0 = (w % nb) * kRows;
        const auto pass = make_pass<scalar_t, false>(s1, t1, s2T, t2T, offset, b, clamp_student);
        partial[w] = pass.forward(o0, static_cast<int>(std::min<int64_t>(kRows, z.N1 - o0)));
      }
    });
  });
  at::Tensor out = at::empty({z.B}, t1.options());
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_fwd_cpu_sum", [&] {
    for (int64_t b = 0; b < z.B; ++b) {
      double s = 0;
      for (int64_t k = 0; k < nb; ++k) s += partial[b * nb + k];
      out.data_ptr<scalar_t>()[b] = static_cast<scalar_t>(s);
    }
  });
  return out;
}

std::vector<at::Tensor> correlation_bwd_cpu(const at::Tensor& grad, const at::Tensor& t1, const at::Tensor& t2,
                                            const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& offset,
                                            bool clamp_student, bool teacher_grad) {
  TSCD_CHECK_CPU("correlation", t1);
  const Sizes z = correlation::check_inputs("correlation", t1, t2, s1, s2, offset, grad);
  at::Tensor ds1 = at::zeros_like(s1), ds2 = at::zeros_like(s2);
  at::Tensor dt1 = at::zeros_like(t1), dt2 = at::zeros_like(t2), dc = at::zeros_like(offset);
  const at::Tensor s1T = s1.transpose(1, 2).contiguous(), t1T = t1.transpose(1, 2).contiguous();
  const at::Tensor s2T = s2.transpose(1, 2).contiguous(), t2T = t2.transpose(1, 2).contiguous();
  const at::Tensor offset_t = offset;  // the column pass reads c_i by the inner index i
  const int64_t nb1 = blocks_of(z.N1), nb2 = blocks_of(z.N2);
  AT_DISPATCH_FLOATING_TYPES(t1.scalar_type(), "correlation_bwd_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // row pass: ds1, dt1, dc (outer = view-1 points)
    at::parallel_for(0, z.B * nb1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / nb1, o0 = (w % nb1) * kRows;
        const auto pass = make_pass<scalar_t, false>(s1, t1, s2T, t2T, offset, b, clamp_student);
        pass.backward(o0, static_cast<int>(std::min<int64_t>(kRows, z.N1 - o0)), g[b], teacher_grad, teacher_grad,
                      ds1.data_ptr<scalar_t>() + b * z.N1 * z.Cs, dt1.data_ptr<scalar_t>() + b * z.N1 * z.Ct,
                      dc.data_ptr<scalar_t>() + b * z.N1);
      }
    });
    // column pass: ds2, dt2 (outer = view-2 points, offset by the inner index)
    at::parallel_for(0, z.B * nb2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t b = w / nb2, o0 = (w % nb2) * kRows;
        const auto pass = make_pass<scalar_t, true>(s2, t2, s1T, t1T, offset_t, b, clamp_student);
        pass.backward(o0, static_cast<int>(std::min<int64_t>(kRows, z.N2 - o0)), g[b], teacher_grad, false,
                      ds2.data_ptr<scalar_t>() + b * z.N2 * z.Cs, dt2.data_ptr<scalar_t>() + b * z.N2 * z.Ct,
                      nullptr);
      }
    });
  });
  return {ds1, ds2, dt1, dt2, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CPU, m) {
  m.impl("correlation_fwd", &correlation_fwd_cpu);
  m.impl("correlation_bwd", &correlation_bwd_cpu);
}

}  // namespace tscd
