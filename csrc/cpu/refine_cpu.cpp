// refine (VARM / PAR) on the CPU; the math is csrc/refine.h (the CUDA kernel runs the same functions per pixel).
//
// Layout: every plane the kernels read (the image, its squared down / right differences, the n weights and
// the propagated maps) is stored with its rows padded by P = min(max dilation, W - 1) columns on each side
// and rounded up to whole 16-pixel vectors, so a neighbour clamp(x + sx) in x is the plain address x + sx
// (replicate padding; zeros where the math needs zeros) and every inner loop runs over 16 consecutive pixels
// without clamping. Rows are clamped once per row and slot. The pixels past W in the last vector compute values
// that are never read (the pads are refilled). The row loops (refine_cpu_loops.h) are compiled for AVX-512, AVX2 +
// FMA and the baseline (isa_each.h); each op call runs the copy of cpu::isa_level().
// Parallel over (image, row) everywhere: the forward step gathers, and so does the transposed step (per
// output row, from the rows that clamp onto it), so no two threads write the same row.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../refine_host.h"
#include "isa.h"

namespace tscd {
namespace {

using refine::Params;
constexpr int kV = 16;       // pixels per inner loop (one AVX-512 vector of float)
constexpr int kChunk = 8;    // channels per pass over a row's weights
constexpr int kMaxN = refine::kMaxDilations * refine::kOffsets;

struct Layout {
  int H, W, P, Wp;  // pad columns per side, padded row length
  int64_t plane;    // H * Wp
};

Layout make_layout(const Params& p) {
  int dmax = 0;
  for (int j = 0; j < p.num_dil; ++j) dmax = std::max(dmax, p.dil[j]);
  Layout L;
  L.H = p.H;
  L.W = p.W;
  L.P = std::min(dmax, p.W - 1);
  const int Wv = (p.W + kV - 1) / kV * kV;
  L.Wp = (Wv + 2 * L.P + kV - 1) / kV * kV;
  L.plane = (int64_t)p.H * L.Wp;
  return L;
}

// Per-row slot offsets: the clamped source row (times Wp) and the column shift, clamped to [-P, P] (the same
// clamp(x + sx) for every x in [0, W)).
struct Slots {
  int64_t row[kMaxN];
  int sx[kMaxN];
  int sy[kMaxN];
};

void make_slots(const Params& p, const Layout& L, int y, Slots& s) {
  const int n = p.num_dil * refine::kOffsets;
  for (int k = 0; k < n; ++k) {
    s.sy[k] = refine::shift_y(p, k);
    s.row[k] = (int64_t)refine::clampi(y + s.sy[k], 0, p.H - 1) * L.Wp;
    s.sx[k] = refine::clampi(refine::shift_x(p, k), -L.P, L.P);
  }
}

// (d0, d1, H, Wp) with kV elements of slack after the end (the border sums of the transposed step read
// whole vectors).
at::Tensor empty_padded(int64_t d0, int64_t d1, const Layout& L, const at::TensorOptions& opt) {
  const int64_t numel = d0 * d1 * L.plane;
  return at::empty({numel + kV}, opt).narrow(0, 0, numel).view({d0, d1, L.H, L.Wp});
}

template <typename T>
void fill_pads(T* row, const Layout& L, bool replicate) {
  const T left = replicate ? row[L.P] : T(0), right = replicate ? row[L.P + L.W - 1] : T(0);
  std::fill(row, row + L.P, left);
  std::fill(row + L.P + L.W, row + L.Wp, right);
}

// Copies (K, H, W) planes into the padded layout.
template <typename T>
void to_padded(const T* src, T* dst, int64_t planes, const Layout& L, bool replicate) {
  at::parallel_for(0, planes * L.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* d = dst + r * L.Wp;
      std::copy(src + r * L.W, src + (r + 1) * L.W, d + L.P);
      fill_pads(d, L, replicate);
    }
  });
}

template <typename T>
at::Tensor from_padded(const at::Tensor& padded, const Layout& L) {
  return padded.narrow(3, L.P, L.W).contiguous();
}

// ------------------------------------------------------------------------------------------------
// Weights
// ------------------------------------------------------------------------------------------------

// The padded image planes, its squared down differences (replicate pads: the column is clamp(x + sx)) and
// its squared right differences (zero pads: x + sx outside [0, W - 1) contributes 0), for one row.
template <typename T>
void prepare_row(const T* img, const Layout& L, int y, T* imgp, T* dd, T* dr) {
  const int64_t HW = (int64_t)L.H * L.W, yo = (int64_t)y * L.Wp;
  for (int c = 0; c < 3; ++c) {
    T* d = imgp + c * L.plane + yo;
    std::copy(img + c * HW + (int64_t)y * L.W, img + c * HW + (int64_t)(y + 1) * L.W, d + L.P);
    fill_pads(d, L, true);
  }
  for (int x = 0; x < L.W; ++x) {
    dd[yo + L.P + x] = refine::down_sq<T, T>(img, HW, L.W, L.H, y, x);
    dr[yo + L.P + x] = refine::right_sq<T, T>(img, HW, L.W, L.W, y, x);
  }
  fill_pads(dd + yo, L, true);
  fill_pads(dr + yo, L, false);
}

#define TSCD_ISA_LOOPS "refine_cpu_loops.h"
#include "isa_each.h"

// (B, n, H, Wp) weights in the padded layout (zero pads).
template <typename T>
at::Tensor weights_padded(const at::Tensor& image, const T* prior, const Params& p, const Layout& L) {
  const int64_t B = image.size(0), H = p.H, n = p.num_dil * refine::kOffsets, HW = (int64_t)p.H * p.W;
  at::Tensor w = empty_padded(B, n, L, image.options());
  at::Tensor aux = at::empty({B, 5, H, L.Wp}, image.options());  // 3 image planes, down and right differences
  const T* img = image.data_ptr<T>();
  T* ap = aux.data_ptr<T>();
  T* wp = w.data_ptr<T>();
  at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H;
      T* base = ap + b * 5 * L.plane;
      prepare_row<T>(img + b * 3 * HW, L, (int)(r % H), base, base + 3 * L.plane, base + 4 * L.plane);
    }
  });
  with_isa([&](auto isa) {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(2 * n * kV);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H;
        const T* base = ap + b * 5 * L.plane;
        decltype(isa)::template weights_row<T>(base, base + 3 * L.plane, base + 4 * L.plane, prior, p, L, (int)(r % H),
                                               wp + b * n * L.plane, scratch.data());
      }
    });
  });
  return w;
}

// ------------------------------------------------------------------------------------------------
// Propagation
// ------------------------------------------------------------------------------------------------

// One step (forward or transposed) for all images, rows and channels, with the row functions of Isa; channels >=
// num_channels[b] are 0.
template <typename Isa, typename T>
void step_cpu(bool transpose, const T* src, T* dst, const T* w, const int64_t* nc, const Params& p, const Layout& L,
              int64_t B, int64_t K) {
  const int64_t H = p.H, n = p.num_dil * refine::kOffsets;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Slots s;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H;
      const int y = (int)(r % H);
      const int64_t k_valid = nc ? std::min<int64_t>(nc[b], K) : K;
      if (!transpose) make_slots(p, L, y, s);
      for (int64_t k0 = 0; k0 < k_valid; k0 += kChunk) {
        const int kc = (int)std::min<int64_t>(kChunk, k_valid - k0);
        const int64_t off = (b * K + k0) * L.plane;
        Isa::template step_row<T>(transpose, src + off, dst + off, w + b * n * L.plane, &s, p, L, y, kc);
      }
      for (int64_t k = std::max<int64_t>(k_valid, 0); k < K; ++k) {
        T* d = dst + (b * K + k) * L.plane + (int64_t)y * L.Wp;
        std::fill(d, d + L.Wp, T(0));
      }
    }
  });
}

at::Tensor propagate_cpu(bool transpose, const at::Tensor& maps, const at::Tensor& w,
                         const c10::optional<at::Tensor>& num_channels, const Params& p, const Layout& L,
                         int64_t num_iter) {
  TORCH_CHECK(num_iter >= 1, "refine: `num_iter` must be >= 1 in the kernel; got ", num_iter);
  const int64_t B = maps.size(0), K = maps.size(1);
  at::Tensor bufs[2] = {empty_padded(B, K, L, maps.options()), empty_padded(B, K, L, maps.options())};
  const int64_t* nc = num_channels.has_value() ? num_channels->data_ptr<int64_t>() : nullptr;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "refine_propagate_cpu", [&] {
    to_padded<scalar_t>(maps.data_ptr<scalar_t>(), bufs[1].data_ptr<scalar_t>(), B * K, L, !transpose);
    with_isa([&](auto isa) {
      for (int64_t t = 0; t < num_iter; ++t) {
        const scalar_t* src = bufs[(t + 1) % 2].data_ptr<scalar_t>();
        scalar_t* dst = bufs[t % 2].data_ptr<scalar_t>();
        step_cpu<decltype(isa), scalar_t>(transpose, src, dst, w.data_ptr<scalar_t>(), nc, p, L, B, K);
      }
    });
    out = from_padded<scalar_t>(bufs[(num_iter - 1) % 2], L);
  });
  return out;
}

at::Tensor weights_for(const at::Tensor& image, const c10::optional<at::Tensor>& prior, const Params& p,
                       const Layout& L, int64_t mode) {
  at::Tensor w;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "refine_weights_cpu", [&] {
    w = weights_padded<scalar_t>(image, static_cast<const scalar_t*>(refine::prior_ptr(prior, mode)), p, L);
  });
  return w;
}

at::Tensor refine_weights_cpu(const at::Tensor& image, at::IntArrayRef dilations, int64_t mode, double rgb_scale,
                              double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, at::Tensor(), c10::nullopt, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  const Layout L = make_layout(p);
  return weights_for(image, prior, p, L, mode).narrow(3, L.P, L.W).contiguous();
}

at::Tensor refine_fwd_cpu(const at::Tensor& image, const at::Tensor& cam, const c10::optional<at::Tensor>& num_channels,
                          at::IntArrayRef dilations, int64_t num_iter, int64_t mode, double rgb_scale,
                          double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, cam, num_channels, dilations, mode, rgb_scale, aux_weight,
                                       prior);
  const Layout L = make_layout(p);
  return propagate_cpu(false, cam, weights_for(image, prior, p, L, mode), num_channels, p, L, num_iter);
}

at::Tensor refine_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                          const c10::optional<at::Tensor>& num_channels, at::IntArrayRef dilations, int64_t num_iter,
                          int64_t mode, double rgb_scale, double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, grad_out, num_channels, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  const Layout L = make_layout(p);
  return propagate_cpu(true, grad_out, weights_for(image, prior, p, L, mode), num_channels, p, L, num_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CPU, m) {
  m.impl("refine_weights", &refine_weights_cpu);
  m.impl("refine_fwd", &refine_fwd_cpu);
  m.impl("refine_bwd", &refine_bwd_cpu);
}

}  // namespace tscd
