// refine (VARM / PAR) on the CPU: at::parallel_for (OpenMP) over image rows; the math is csrc/refine.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../refine_host.h"

namespace tscd {
namespace {

using refine::Params;
constexpr int kChunk = 4;  // channels per pixel visit: the 48 weights are read once per chunk

template <typename scalar_t>
void weights_cpu(const at::Tensor& image, const scalar_t* prior, const Params& p, at::Tensor& w) {
  const int64_t B = image.size(0), H = p.H, W = p.W, HW = H * W, n = p.num_dil * refine::kOffsets;
  const scalar_t* img = image.data_ptr<scalar_t>();
  scalar_t* wp = w.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, y = r % H;
      for (int64_t x = 0; x < W; ++x) {
        refine::pixel_weights<scalar_t, scalar_t>(img + b * 3 * HW, p, (int)y, (int)x, prior,
                                                  wp + b * n * HW + y * W + x, HW);
      }
    }
  });
}

// One step for all images and channels; channels >= num_channels[b] are set to 0. Parallel over rows.
template <typename scalar_t>
void step_cpu(const scalar_t* src, scalar_t* dst, const scalar_t* w, const int64_t* nc, const Params& p, int64_t B,
              int64_t K) {
  const int64_t H = p.H, W = p.W, HW = H * W, n = p.num_dil * refine::kOffsets;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (chunks * H), c = (r / H) % chunks, y = r % H;
      const int64_t k0 = c * kChunk, k_valid = nc ? std::min<int64_t>(nc[b], K) : K;
      const int kc = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kChunk, k_valid - k0)));
      scalar_t* d = dst + b * K * HW;
      for (int64_t x = 0; x < W; ++x) {
        refine::propagate_pixel<scalar_t, scalar_t, kChunk>(src + b * K * HW, d, w + b * n * HW, p, (int)y, (int)x,
                                                            (int)k0, kc);
      }
      for (int64_t k = k0 + kc; k < std::min<int64_t>(k0 + kChunk, K); ++k) {
        std::fill(d + k * HW + y * W, d + k * HW + (y + 1) * W, scalar_t(0));
      }
    }
  });
}

// The transposed step (a scatter): one task owns a (image, channel chunk) block of planes, so plain adds
// are race-free; channels >= num_channels[b] stay 0.
template <typename scalar_t>
void step_transpose_cpu(const scalar_t* src, scalar_t* dst, const scalar_t* w, const int64_t* nc, const Params& p,
                        int64_t B, int64_t K) {
  const int64_t H = p.H, W = p.W, HW = H * W, n = p.num_dil * refine::kOffsets;
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / chunks, k0 = (r % chunks) * kChunk, k_valid = nc ? std::min<int64_t>(nc[b], K) : K;
      const int kc = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kChunk, k_valid - k0)));
      scalar_t* d = dst + b * K * HW;
      std::fill(d + k0 * HW, d + std::min<int64_t>(k0 + kChunk, K) * HW, scalar_t(0));
      if (kc == 0) continue;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          refine::propagate_transpose_pixel<scalar_t, scalar_t, kChunk, refine::PlainAdd>(
              src + b * K * HW, d, w + b * n * HW, p, (int)y, (int)x, (int)k0, kc);
        }
      }
    }
  });
}

template <bool kTranspose>
at::Tensor propagate_cpu(const at::Tensor& maps, const at::Tensor& w, const c10::optional<at::Tensor>& num_channels,
                         const Params& p, int64_t num_iter) {
  TORCH_CHECK(num_iter >= 1, "refine: `num_iter` must be >= 1 in the kernel; got ", num_iter);
  const int64_t B = maps.size(0), K = maps.size(1);
  at::Tensor bufs[2] = {at::empty_like(maps), num_iter > 1 ? at::empty_like(maps) : at::Tensor()};
  const int64_t* nc = num_channels.has_value() ? num_channels->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "refine_propagate_cpu", [&] {
    const scalar_t* src = maps.data_ptr<scalar_t>();
    for (int64_t t = 0; t < num_iter; ++t) {
      // the last step writes bufs[0], which is returned
      scalar_t* dst = bufs[(num_iter - 1 - t) % 2].data_ptr<scalar_t>();
      if (kTranspose) {
        step_transpose_cpu<scalar_t>(src, dst, w.data_ptr<scalar_t>(), nc, p, B, K);
      } else {
        step_cpu<scalar_t>(src, dst, w.data_ptr<scalar_t>(), nc, p, B, K);
      }
      src = dst;
    }
  });
  return bufs[0];
}

at::Tensor weights_for(const char* op, const at::Tensor& image, const c10::optional<at::Tensor>& prior,
                       const Params& p, int64_t mode) {
  const int64_t n = p.num_dil * refine::kOffsets;
  at::Tensor w = at::empty({image.size(0), n, image.size(2), image.size(3)}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "refine_weights_cpu", [&] {
    weights_cpu<scalar_t>(image, static_cast<const scalar_t*>(refine::prior_ptr(prior, mode)), p, w);
  });
  return w;
}

at::Tensor refine_weights_cpu(const at::Tensor& image, at::IntArrayRef dilations, int64_t mode, double rgb_scale,
                              double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, at::Tensor(), c10::nullopt, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  return weights_for("refine_weights_cpu", image, prior, p, mode);
}

at::Tensor refine_fwd_cpu(const at::Tensor& image, const at::Tensor& cam, const c10::optional<at::Tensor>& num_channels,
                          at::IntArrayRef dilations, int64_t num_iter, int64_t mode, double rgb_scale,
                          double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, cam, num_channels, dilations, mode, rgb_scale, aux_weight,
                                       prior);
  const at::Tensor w = weights_for("refine_weights_cpu", image, prior, p, mode);
  return propagate_cpu<false>(cam, w, num_channels, p, num_iter);
}

at::Tensor refine_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& image,
                          const c10::optional<at::Tensor>& num_channels, at::IntArrayRef dilations, int64_t num_iter,
                          int64_t mode, double rgb_scale, double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CPU("refine", image);
  const Params p = refine::make_params("refine", image, grad_out, num_channels, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  const at::Tensor w = weights_for("refine_weights_cpu", image, prior, p, mode);
  return propagate_cpu<true>(grad_out, w, num_channels, p, num_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CPU, m) {
  m.impl("refine_weights", &refine_weights_cpu);
  m.impl("refine_fwd", &refine_fwd_cpu);
  m.impl("refine_bwd", &refine_bwd_cpu);
}

}  // namespace tscd
