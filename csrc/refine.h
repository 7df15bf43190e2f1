// refine (VARM / PAR, docs/method.md 4.1): the per-pixel math, written once and shared by the CPU
// (csrc/cpu/refine_cpu.cpp) and CUDA (csrc/cuda/refine_cuda.cu) kernels, so the CPU tests exercise
// the very code the GPU runs. The .cpp/.cu files add only loops/indexing and launches.
//
// Neighbourhood: for each dilation d (dilation-major) and the 8 offsets o in order
//   (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)    as (dy, dx),
// the neighbour of p=(y,x) is clamp(p + d*o) (replicate border). n = 8 * num_dilations.
// Weights (per pixel, n of them, stored o-major as (n, H, W) per image):
//   a_o = -mean_c[(rgb_scale * |I_c(p) - I_c(q_o)| / (sigma_c(p) + 1e-8))^2]
//   sigma_c(p) = unbiased std over the n neighbour values of channel c
//   VARM: w_o = softmax(a)_o + aux_weight * softmax(v)_o   (aux_weight = -0.01 by default)
//         v_o = mean_c[(X(p) - X(p_down))^2 + (X(p) - X(p_right))^2] on the shifted map X = I(clamp(. + d*o)),
//         p_down = (min(y+1, H-1), x), p_right = (y, min(x+1, W-1))
//   PAR:  w_o = softmax(a)_o + aux_weight * prior_o         (prior: softmax of the position term, host-made)
// Propagation (one step, per channel): M'(p) = sum_o w_o(p) * M(clamp(p + d*o)).
// Its transpose (the backward): G'(q) = sum_o sum_{p : clamp(p + d*o) = q} w_o(p) * G(p), computed as a
// scatter from each p (border pixels receive many contributions, so a gather would be uneven).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TSCD_UNROLL _Pragma("unroll")
#else
#define TSCD_UNROLL _Pragma("GCC unroll 8")
#endif

namespace tscd {
namespace refine {

constexpr int kMaxDilations = 16;
constexpr int kOffsets = 8;
constexpr int kModeVarm = 0;
constexpr int kModePar = 1;
constexpr double kStdEps = 1e-8;

struct Params {
  int H;
  int W;
  int num_dil;
  int dil[kMaxDilations];
  int mode;
  double rgb_scale;
  double aux_weight;
};

C10_HOST_DEVICE inline int off_y(int o) { return o < 3 ? -1 : (o < 5 ? 0 : 1); }
C10_HOST_DEVICE inline int off_x(int o) { return (o == 0 || o == 3 || o == 5) ? -1 : ((o == 1 || o == 6) ? 0 : 1); }
C10_HOST_DEVICE inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Flat index of neighbour slot (dilation j, offset o) of pixel (y, x): clamp((y, x) + d * o).
C10_HOST_DEVICE inline int64_t neighbour(const Params& p, int j, int o, int y, int x) {
  return (int64_t)clampi(y + p.dil[j] * off_y(o), 0, p.H - 1) * p.W + clampi(x + p.dil[j] * off_x(o), 0, p.W - 1);
}

// Squared forward differences (down + right) of the shifted image X = I(clamp(. + s)) at p, summed over
// channels and divided by 3 (the channel mean). img: (3, H, W) of one image.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t variation(const scalar_t* img, int64_t HW, int H, int W, int y, int x, int sy, int sx) {
  const int yq = clampi(y + sy, 0, H - 1), xq = clampi(x + sx, 0, W - 1);
  const int yd = clampi((y + 1 < H ? y + 1 : H - 1) + sy, 0, H - 1);
  const int xr = clampi((x + 1 < W ? x + 1 : W - 1) + sx, 0, W - 1);
  acc_t v = 0;
  for (int c = 0; c < 3; ++c) {
    const scalar_t* ch = img + c * HW;
    const acc_t xc = static_cast<acc_t>(ch[(int64_t)yq * W + xq]);
    const acc_t dd = xc - static_cast<acc_t>(ch[(int64_t)yd * W + xq]);
    const acc_t dr = xc - static_cast<acc_t>(ch[(int64_t)yq * W + xr]);
    v += dd * dd + dr * dr;
  }
  return v / acc_t(3);
}

// The n weights of pixel (y, x): written to w[k * w_stride], k = j * 8 + o. img: (3, H, W); prior: (n,) (PAR only).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void pixel_weights(const scalar_t* img, const Params& p, int y, int x, const scalar_t* prior,
                                          acc_t* w, int64_t w_stride) {
  const int H = p.H, W = p.W;
  const int64_t HW = (int64_t)H * W;
  const int n = p.num_dil * kOffsets;
  acc_t centre[3], mean[3] = {0, 0, 0}, inv_sigma[3] = {0, 0, 0};
  for (int c = 0; c < 3; ++c) centre[c] = static_cast<acc_t>(img[c * HW + (int64_t)y * W + x]);
  // pass 1: mean of the neighbours per channel
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int64_t q = neighbour(p, j, o, y, x);
      for (int c = 0; c < 3; ++c) mean[c] += static_cast<acc_t>(img[c * HW + q]);
    }
  }
  for (int c = 0; c < 3; ++c) mean[c] /= acc_t(n);
  // pass 2: unbiased variance -> 1 / (sigma + eps)
  acc_t var[3] = {0, 0, 0};
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int64_t q = neighbour(p, j, o, y, x);
      for (int c = 0; c < 3; ++c) {
        const acc_t dv = static_cast<acc_t>(img[c * HW + q]) - mean[c];
        var[c] += dv * dv;
      }
    }
  }
  for (int c = 0; c < 3; ++c) inv_sigma[c] = acc_t(1) / (static_cast<acc_t>(std::sqrt(var[c] / acc_t(n - 1))) + acc_t(kStdEps));
  // pass 3: appearance logits (kept in w) and online softmax statistics of both terms
  const acc_t scale = static_cast<acc_t>(p.rgb_scale);
  acc_t max_a = -INFINITY, sum_a = 0, max_v = -INFINITY, sum_v = 0;
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int sy = p.dil[j] * off_y(o), sx = p.dil[j] * off_x(o);
      const int64_t q = (int64_t)clampi(y + sy, 0, H - 1) * W + clampi(x + sx, 0, W - 1);
      acc_t a = 0;
      for (int c = 0; c < 3; ++c) {
        const acc_t t = scale * std::fabs(centre[c] - static_cast<acc_t>(img[c * HW + q])) * inv_sigma[c];
        a += t * t;
      }
      a = -a / acc_t(3);
      w[(int64_t)(j * kOffsets + o) * w_stride] = a;
      if (a > max_a) {
        sum_a = sum_a * static_cast<acc_t>(std::exp(max_a - a)) + acc_t(1);
        max_a = a;
      } else {
        sum_a += static_cast<acc_t>(std::exp(a - max_a));
      }
      if (p.mode == kModeVarm) {
        const acc_t v = variation<scalar_t, acc_t>(img, HW, H, W, y, x, sy, sx);
        if (v > max_v) {
          sum_v = sum_v * static_cast<acc_t>(std::exp(max_v - v)) + acc_t(1);
          max_v = v;
        } else {
          sum_v += static_cast<acc_t>(std::exp(v - max_v));
        }
      }
    }
  }
  // pass 4: normalise and add the second term
  const acc_t aux = static_cast<acc_t>(p.aux_weight);
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int k = j * kOffsets + o;
      acc_t wk = static_cast<acc_t>(std::exp(w[(int64_t)k * w_stride] - max_a)) / sum_a;
      if (p.mode == kModeVarm) {
        const acc_t v = variation<scalar_t, acc_t>(img, HW, H, W, y, x, p.dil[j] * off_y(o), p.dil[j] * off_x(o));
        wk += aux * static_cast<acc_t>(std::exp(v - max_v)) / sum_v;
      } else {
        wk += aux * static_cast<acc_t>(prior[k]);
      }
      w[(int64_t)k * w_stride] = wk;
    }
  }
}

// One propagation step for pixel (y, x) and channels [k0, k0 + kc), kc <= KC.
// src, dst: (K, H, W) of one image; w: (n, H, W) of that image.
template <typename scalar_t, typename acc_t, int KC>
C10_HOST_DEVICE inline void propagate_pixel(const scalar_t* src, scalar_t* dst, const acc_t* w, const Params& p,
                                            int y, int x, int k0, int kc) {
  const int H = p.H, W = p.W;
  const int64_t HW = (int64_t)H * W, pix = (int64_t)y * W + x;
  acc_t acc[KC];
TSCD_UNROLL
  for (int t = 0; t < KC; ++t) acc[t] = 0;
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int64_t q = neighbour(p, j, o, y, x);
      const acc_t wk = w[(int64_t)(j * kOffsets + o) * HW + pix];
TSCD_UNROLL
      for (int t = 0; t < KC; ++t) {
        if (t < kc) acc[t] += wk * static_cast<acc_t>(src[(int64_t)(k0 + t) * HW + q]);
      }
    }
  }
TSCD_UNROLL
  for (int t = 0; t < KC; ++t) {
    if (t < kc) dst[(int64_t)(k0 + t) * HW + pix] = static_cast<scalar_t>(acc[t]);
  }
}

// Accumulation policies for the transpose: a plain add where one thread owns the output plane (CPU),
// an atomic add on the GPU (csrc/cuda/refine_cuda.cu defines it).
struct PlainAdd {
  template <typename T>
  C10_HOST_DEVICE static void add(T* addr, T value) { *addr += value; }
};

// The transpose of propagate_pixel, as a scatter: pixel p adds w_o(p) * G(p) to the pixel q_o it reads
// through each neighbour slot o (dst must be zero-filled first). Same cost as the forward step.
template <typename scalar_t, typename acc_t, int KC, typename Adder>
C10_HOST_DEVICE inline void propagate_transpose_pixel(const scalar_t* src, scalar_t* dst, const acc_t* w,
                                                      const Params& p, int y, int x, int k0, int kc) {
  const int H = p.H, W = p.W;
  const int64_t HW = (int64_t)H * W, pix = (int64_t)y * W + x;
  acc_t g[KC];
TSCD_UNROLL
  for (int t = 0; t < KC; ++t) g[t] = t < kc ? static_cast<acc_t>(src[(int64_t)(k0 + t) * HW + pix]) : acc_t(0);
  for (int j = 0; j < p.num_dil; ++j) {
    for (int o = 0; o < kOffsets; ++o) {
      const int64_t q = neighbour(p, j, o, y, x);
      const acc_t wk = w[(int64_t)(j * kOffsets + o) * HW + pix];
TSCD_UNROLL
      for (int t = 0; t < KC; ++t) {
        if (t < kc) Adder::add(dst + (int64_t)(k0 + t) * HW + q, static_cast<scalar_t>(wk * g[t]));
      }
    }
  }
}

}  // namespace refine
}  // namespace tscd
