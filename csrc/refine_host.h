// refine: host-side argument checks and parameter packing, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "refine.h"

namespace tscd {
namespace refine {

// Checks the inputs of refine_weights/refine_fwd/refine_bwd and packs the scalar parameters.
// maps: cam (fwd) or grad_out (bwd); undefined for refine_weights.
inline Params make_params(const char* op, const at::Tensor& image, const at::Tensor& maps,
                          const c10::optional<at::Tensor>& num_channels, at::IntArrayRef dilations, int64_t mode,
                          double rgb_scale, double aux_weight, const c10::optional<at::Tensor>& prior) {
  TSCD_CHECK_DIM(op, image, 4, "(B, 3, H, W)");
  TORCH_CHECK(image.size(1) == 3, op, ": `image` must have 3 channels (B, 3, H, W); got shape ", image.sizes());
  TSCD_CHECK_FLOAT(op, image);
  TSCD_CHECK_CONTIGUOUS(op, image);
  TORCH_CHECK(image.size(2) * image.size(3) < (int64_t(1) << 31), op, ": `image` is too large (H*W >= 2^31)");
  if (maps.defined()) {
    TSCD_CHECK_DIM(op, maps, 4, "(B, K, H, W)");
    TORCH_CHECK(maps.size(0) == image.size(0) && maps.size(2) == image.size(2) && maps.size(3) == image.size(3), op,
                ": the maps must be (B, K, H, W) with the image's B, H, W; got ", maps.sizes(), " for an image of ",
                image.sizes());
    TSCD_CHECK_SAME_DTYPE(op, maps, image);
    TSCD_CHECK_CONTIGUOUS(op, maps);
    TSCD_CHECK_DEVICE(op, maps, image.device());
  }
  if (num_channels.has_value()) {
    const at::Tensor& nc = *num_channels;
    TORCH_CHECK(nc.dim() == 1 && nc.size(0) == image.size(0) && nc.scalar_type() == at::kLong, op,
                ": `num_channels` must be an int64 tensor of shape (B,); got ", nc.scalar_type(), " ", nc.sizes());
    TSCD_CHECK_CONTIGUOUS(op, nc);
    TSCD_CHECK_DEVICE(op, nc, image.device());
  }
  TORCH_CHECK(!dilations.empty() && (int64_t)dilations.size() <= kMaxDilations, op,
              ": `dilations` must hold 1 to ", kMaxDilations, " values; got ", dilations.size());
  TORCH_CHECK(mode == kModeVarm || mode == kModePar, op, ": `mode` must be 0 (varm) or 1 (par); got ", mode);
  Params p;
  p.H = static_cast<int>(image.size(2));
  p.W = static_cast<int>(image.size(3));
  p.num_dil = static_cast<int>(dilations.size());
  for (int j = 0; j < kMaxDilations; ++j) {
    p.dil[j] = j < p.num_dil ? static_cast<int>(dilations[j]) : 0;
    if (j < p.num_dil) TORCH_CHECK(dilations[j] > 0, op, ": `dilations` must be positive; got ", dilations);
  }
  p.mode = static_cast<int>(mode);
  p.rgb_scale = rgb_scale;
  p.aux_weight = aux_weight;
  if (mode == kModePar) {
    TORCH_CHECK(prior.has_value(), op, ": mode par needs the position prior `prior` (n,)");
    const at::Tensor& pr = *prior;
    TORCH_CHECK(pr.dim() == 1 && pr.size(0) == p.num_dil * kOffsets, op, ": `prior` must have shape (",
                p.num_dil * kOffsets, ",); got ", pr.sizes());
    TSCD_CHECK_SAME_DTYPE(op, pr, image);
    TSCD_CHECK_CONTIGUOUS(op, pr);
    TSCD_CHECK_DEVICE(op, pr, image.device());
  }
  return p;
}

inline const void* prior_ptr(const c10::optional<at::Tensor>& prior, int64_t mode) {
  return (mode == kModePar && prior.has_value()) ? prior->data_ptr() : nullptr;
}

}  // namespace refine
}  // namespace tscd
