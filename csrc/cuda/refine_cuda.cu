// refine (VARM / PAR) on CUDA: one thread per pixel (weights) or per (pixel, channel chunk) (propagation).
// The math is csrc/refine.h, shared with the CPU kernels; this file adds indexing and launches only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../refine_host.h"
#include "common.cuh"

namespace tscd {
namespace {

using refine::Params;
constexpr int kChunk = 4;

struct AtomicAdd {
  template <typename T>
  __device__ static void add(T* addr, T value) { atomicAdd(addr, value); }
};

template <typename scalar_t>
__global__ void refine_weights_kernel(const scalar_t* __restrict__ img, const scalar_t* __restrict__ prior,
                                      scalar_t* __restrict__ w, Params p, int64_t B) {
  const int64_t HW = (int64_t)p.H * p.W, n = p.num_dil * refine::kOffsets;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * HW) return;
  const int64_t b = idx / HW, pix = idx % HW;
  refine::pixel_weights<scalar_t, scalar_t>(img + b * 3 * HW, p, (int)(pix / p.W), (int)(pix % p.W), prior,
                                            w + b * n * HW + pix, HW);
}

// grid.x over pixels, grid.y over (image, channel chunk)
template <typename scalar_t, bool kTranspose>
__global__ void refine_step_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                   const scalar_t* __restrict__ w, const int64_t* __restrict__ nc, Params p,
                                   int64_t K, int64_t chunks) {
  const int64_t HW = (int64_t)p.H * p.W, n = p.num_dil * refine::kOffsets;
  const int64_t pix = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (pix >= HW) return;
  const int64_t b = blockIdx.y / chunks, k0 = (blockIdx.y % chunks) * kChunk;
  const int64_t k_valid = nc ? min(nc[b], K) : K;
  const int kc = (int)max((int64_t)0, min((int64_t)kChunk, k_valid - k0));
  const scalar_t* s = src + b * K * HW;
  scalar_t* d = dst + b * K * HW;
  const scalar_t* wb = w + b * n * HW;
  const int y = (int)(pix / p.W), x = (int)(pix % p.W);
  if (kTranspose) {  // dst was zero-filled; channels beyond kc stay 0
    refine::propagate_transpose_pixel<scalar_t, scalar_t, kChunk, AtomicAdd>(s, d, wb, p, y, x, (int)k0, kc);
  } else {
    refine::propagate_pixel<scalar_t, scalar_t, kChunk>(s, d, wb, p, y, x, (int)k0, kc);
    for (int64_t k = k0 + kc; k < min(k0 + kChunk, K); ++k) d[k * HW + pix] = scalar_t(0);
  }
}

at::Tensor weights_for(const at::Tensor& image, const c10::optional<at::Tensor>& prior, const Params& p, int64_t mode) {
  const int64_t B = image.size(0), HW = image.size(2) * image.size(3), n = p.num_dil * refine::kOffsets;
  at::Tensor w = at::empty({B, n, image.size(2), image.size(3)}, image.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "refine_weights_cuda", [&] {
    refine_weights_kernel<scalar_t><<<cuda::blocks_for(B * HW), cuda::kThreads, 0, stream>>>(
        image.data_ptr<scalar_t>(), static_cast<const scalar_t*>(refine::prior_ptr(prior, mode)),
        w.data_ptr<scalar_t>(), p, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w;
}

template <bool kTranspose>
at::Tensor propagate_cuda(const at::Tensor& maps, const at::Tensor& w, const c10::optional<at::Tensor>& num_channels,
                          const Params& p, int64_t num_iter) {
  TORCH_CHECK(num_iter >= 1, "refine: `num_iter` must be >= 1 in the kernel; got ", num_iter);
  const int64_t B = maps.size(0), K = maps.size(1), HW = maps.size(2) * maps.size(3);
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  TORCH_CHECK(B * chunks < 65536, "refine: too many (image, channel) blocks for one launch: B * ceil(K/4) = ",
              B * chunks, " (max 65535)");
  at::Tensor bufs[2] = {at::empty_like(maps), num_iter > 1 ? at::empty_like(maps) : at::Tensor()};
  const int64_t* nc = num_channels.has_value() ? num_channels->data_ptr<int64_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(cuda::blocks_for(HW), static_cast<unsigned int>(B * chunks));
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "refine_propagate_cuda", [&] {
    const scalar_t* src = maps.data_ptr<scalar_t>();
    for (int64_t t = 0; t < num_iter; ++t) {
      at::Tensor& out = bufs[(num_iter - 1 - t) % 2];
      if (kTranspose) out.zero_();  // the scatter accumulates
      scalar_t* dst = out.data_ptr<scalar_t>();
      refine_step_kernel<scalar_t, kTranspose><<<grid, cuda::kThreads, 0, stream>>>(
          src, dst, w.data_ptr<scalar_t>(), nc, p, K, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      src = dst;
    }
  });
  return bufs[0];
}

at::Tensor refine_weights_cuda(const at::Tensor& image, at::IntArrayRef dilations, int64_t mode, double rgb_scale,
                               double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CUDA("refine", image);
  const c10::cuda::CUDAGuard guard(image.device());
  const Params p = refine::make_params("refine", image, at::Tensor(), c10::nullopt, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  return weights_for(image, prior, p, mode);
}

at::Tensor refine_fwd_cuda(const at::Tensor& image, const at::Tensor& cam,
                           const c10::optional<at::Tensor>& num_channels, at::IntArrayRef dilations, int64_t num_iter,
                           int64_t mode, double rgb_scale, double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CUDA("refine", image);
  const c10::cuda::CUDAGuard guard(image.device());
  const Params p = refine::make_params("refine", image, cam, num_channels, dilations, mode, rgb_scale, aux_weight,
                                       prior);
  const at::Tensor w = weights_for(image, prior, p, mode);
  return propagate_cuda<false>(cam, w, num_channels, p, num_iter);
}

at::Tensor refine_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& image,
                           const c10::optional<at::Tensor>& num_channels, at::IntArrayRef dilations, int64_t num_iter,
                           int64_t mode, double rgb_scale, double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_CUDA("refine", image);
  const c10::cuda::CUDAGuard guard(image.device());
  const Params p = refine::make_params("refine", image, grad_out, num_channels, dilations, mode, rgb_scale,
                                       aux_weight, prior);
  const at::Tensor w = weights_for(image, prior, p, mode);
  return propagate_cuda<true>(grad_out, w, num_channels, p, num_iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(tscd, CUDA, m) {
  m.impl("refine_weights", &refine_weights_cuda);
  m.impl("refine_fwd", &refine_fwd_cuda);
  m.impl("refine_bwd", &refine_bwd_cuda);
}

}  // namespace tscd
