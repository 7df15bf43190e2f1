// refine (VARM / PAR, docs/method.md 4.1): the per-pixel math, written once and shared by the CPU
// (csrc/cpu/refine_cpu.cpp) and CUDA (csrc/cuda/refine_cuda.cu) kernels, so the CPU tests exercise
// the very code the GPU runs. The .cpp/.cu files add only loops/indexing and launches.
//
// Neighbourhood: for each dilation d (dilation-major) and the 8 offsets o in order
//   (-1,-1) (-1,0) (-1,1) (0,-1) (0,1) (1,-1) (1,0) (1,1)    as (dy, dx),
// the neighbour of p=(y,x) is clamp(p + d*o) (replicate border). n = 8 * num_dilations.
// Weights (per pixel, n of them, stored o-major as (n, H, W) per image; the CPU pads each row):
//   a_o = -mean_c[(rgb_scale * |I_c(p) - I_c(q_o)| / (sigma_c(p) + 1e-8))^2]
//   sigma_c(p) = unbiased std over the n neighbour values of channel c
//   VARM: w_o = softmax(a)_o + aux_weight * softmax(v)_o   (aux_weight = -0.01 by default)
//         v_o = mean_c[(X(p) - X(p_down))^2 + (X(p) - X(p_right))^2] on the shifted map X = I(clamp(. + d*o)),
//         p_down = (min(y+1, H-1), x), p_right = (y, min(x+1, W-1))
//   PAR:  w_o = softmax(a)_o + aux_weight * prior_o         (prior: softmax of the position term, host-made)
// Propagation (one step, per channel): M'(p) = sum_o w_o(p) * M(clamp(p + d*o)).
// Its transpose (the backward): G'(q) = sum_o sum_{p : clamp(p + d*o) = q} w_o(p) * G(p). The CUDA kernel
// scatters from each p (atomics); the CPU kernel gathers per output row (source_rows below), reading the
// weights and G of the shifted pixel, and adds the clamped columns' sums at the two border columns.
#pragma once

#include <c10/macros/Macros.h>

#include "fast_exp.h"

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

// Slot k = j * 8 + o: its shift (sy, sx) = dil[j] * (off_y(o), off_x(o)).
C10_HOST_DEVICE inline int shift_y(const Params& p, int k) { return p.dil[k / kOffsets] * off_y(k % kOffsets); }
C10_HOST_DEVICE inline int shift_x(const Params& p, int k) { return p.dil[k / kOffsets] * off_x(k % kOffsets); }

// exp for the softmaxes: float uses fast_expf (fast_exp.h: vectorisable, about 1 ulp; the CPU kernel runs it 16
// pixels at a time), float64 std::exp.
template <typename T>
C10_HOST_DEVICE inline T exp_approx(T x) { return static_cast<T>(std::exp(x)); }

template <>
C10_HOST_DEVICE inline float exp_approx<float>(float x) { return fast_expf(x); }

// 1 / (sigma + eps) from the sum of squared deviations of n samples (unbiased std).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_sigma(acc_t sq_dev, int n) {
  return acc_t(1) / (static_cast<acc_t>(std::sqrt(sq_dev / acc_t(n - 1))) + acc_t(kStdEps));
}

// One channel's contribution to the appearance logit: (scale * |centre - q| * inv_sigma)^2.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t appearance_sq(acc_t centre, acc_t q, acc_t inv_sig, acc_t scale) {
  const acc_t t = scale * std::fabs(centre - q) * inv_sig;
  return t * t;
}

// Squared difference of the image's pixels at offsets `at` and `at + step`, summed over the 3 channels (planes
// `plane` apart).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t pair_sq(const scalar_t* img, int64_t plane, int64_t at, int64_t step) {
  acc_t s = 0;
  for (int c = 0; c < 3; ++c) {
    const acc_t d = static_cast<acc_t>(img[c * plane + at]) - static_cast<acc_t>(img[c * plane + at + step]);
    s += d * d;
  }
  return s;
}

// Squared down / right differences of the image at q = (y, x), summed over the 3 channels (0 on the last
// row / column). img: channel planes `plane` apart, rows `row` apart.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t down_sq(const scalar_t* img, int64_t plane, int64_t row, int H, int y, int x) {
  return y + 1 >= H ? acc_t(0) : pair_sq<scalar_t, acc_t>(img, plane, (int64_t)y * row + x, row);
}
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t right_sq(const scalar_t* img, int64_t plane, int64_t row, int W, int y, int x) {
  return x + 1 >= W ? acc_t(0) : pair_sq<scalar_t, acc_t>(img, plane, (int64_t)y * row + x, 1);
}

// The variation term v of slot (sy, sx) at p = (y, x): the squared forward differences of the shifted image
// X = I(clamp(. + s)) at p, channel mean. X(p) - X(p_down) is the down difference of I at q = p + s when
// p_down is a different pixel and q is not clamped in y (y < H-1, 0 <= y+sy < H-1), else it is I(q) - I(q)
// = 0 (NaN for a non-finite I(q), which makes the pixel's appearance logits NaN anyway); same for x.
C10_HOST_DEVICE inline bool variation_down_ok(int y, int sy, int H) { return y + 1 < H && y + sy >= 0 && y + sy + 1 < H; }
C10_HOST_DEVICE inline bool variation_right_ok(int x, int sx, int W) { return x + 1 < W && x + sx >= 0 && x + sx + 1 < W; }
template <typename acc_t>
C10_HOST_DEVICE inline acc_t variation(acc_t down, acc_t right) { return (down + right) * acc_t(1.0 / 3.0); }

// The variation term of one slot from the squared down and right differences at its neighbour q: each counts 0
// where variation_down_ok / variation_right_ok say the step leaves the shifted map (whatever its value there).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t slot_variation(bool down_ok, acc_t down, bool right_ok, acc_t right) {
  return variation(down_ok ? down : acc_t(0), right_ok ? right : acc_t(0));
}

// slot_variation of slot (sy, sx) at p = (y, x), with the differences read from the image (3, H, W), only where
// they count (the CUDA kernel; the CPU kernel reads them from planes of the image's squared differences).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t slot_variation_at(const scalar_t* img, int H, int W, int y, int x, int sy, int sx) {
  const int64_t HW = (int64_t)H * W;
  const int yq = clampi(y + sy, 0, H - 1), xq = clampi(x + sx, 0, W - 1);
  const bool down_ok = variation_down_ok(y, sy, H), right_ok = variation_right_ok(x, sx, W);
  return slot_variation(down_ok, down_ok ? down_sq<scalar_t, acc_t>(img, HW, W, H, yq, xq) : acc_t(0), right_ok,
                        right_ok ? right_sq<scalar_t, acc_t>(img, HW, W, W, yq, xq) : acc_t(0));
}

// The appearance logit from the sum of the 3 channels' appearance_sq: minus their mean. (A multiplication by
// the rounded 1/3, not a division: the CPU kernel runs it 96 times per pixel, and a vector division is slow.)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t appearance_logit(acc_t sum_sq) { return sum_sq * acc_t(-1.0 / 3.0); }

// A sum of squared deviations from the neighbourhood mean, with neighbour value q added.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t add_sq_dev(acc_t sq_dev, acc_t q, acc_t mean) {
  const acc_t d = q - mean;
  return sq_dev + d * d;
}

// The softmaxes over the n slots: the running maximum of the logits z, the numerators exp(z - max) and their sum
// (softmax_term adds its numerator to the sum), and the value numerator * (1 / sum).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t running_max(acc_t max, acc_t z) { return z > max ? z : max; }
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_numerator(acc_t z, acc_t max) { return exp_approx(z - max); }
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_term(acc_t z, acc_t max, acc_t& sum) {
  const acc_t e = softmax_numerator(z, max);
  sum += e;
  return e;
}
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_value(acc_t numerator, acc_t inv_sum) { return numerator * inv_sum; }

// The weight of a slot: softmax(a)_k + aux * second, second = softmax(v)_k (VARM) or prior_k (PAR).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t slot_weight(acc_t softmax_a, acc_t aux, acc_t second) { return softmax_a + aux * second; }

// The weights of pixel (y, x), scalar (the CUDA kernel; the CPU kernel runs the same steps 16 pixels at a
// time): written to w[k * w_stride], k = j * 8 + o. img: (3, H, W); prior: (n,) (PAR only).
// Steps: neighbour mean, unbiased variance -> 1 / (sigma + eps); logits a_k and v_k with their maxima;
// the two softmaxes; w_k = slot_weight(softmax(a)_k, aux, softmax(v)_k or prior_k). v_k is recomputed, not stored.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void pixel_weights(const scalar_t* img, const Params& p, int y, int x, const scalar_t* prior,
                                          acc_t* w, int64_t w_stride) {
  const int H = p.H, W = p.W;
  const int64_t HW = (int64_t)H * W;
  const int n = p.num_dil * kOffsets;
  acc_t centre[3], mean[3] = {0, 0, 0}, var[3] = {0, 0, 0}, isg[3];
  for (int c = 0; c < 3; ++c) centre[c] = static_cast<acc_t>(img[c * HW + (int64_t)y * W + x]);
  for (int k = 0; k < n; ++k) {
    const int64_t q = (int64_t)clampi(y + shift_y(p, k), 0, H - 1) * W + clampi(x + shift_x(p, k), 0, W - 1);
    for (int c = 0; c < 3; ++c) mean[c] += static_cast<acc_t>(img[c * HW + q]);
  }
  for (int c = 0; c < 3; ++c) mean[c] /= acc_t(n);
  for (int k = 0; k < n; ++k) {
    const int64_t q = (int64_t)clampi(y + shift_y(p, k), 0, H - 1) * W + clampi(x + shift_x(p, k), 0, W - 1);
    for (int c = 0; c < 3; ++c) var[c] = add_sq_dev(var[c], static_cast<acc_t>(img[c * HW + q]), mean[c]);
  }
  for (int c = 0; c < 3; ++c) isg[c] = inv_sigma(var[c], n);
  const acc_t scale = static_cast<acc_t>(p.rgb_scale), aux = static_cast<acc_t>(p.aux_weight);
  const bool varm = p.mode == kModeVarm;
  acc_t max_a = -INFINITY, max_v = -INFINITY;
  for (int k = 0; k < n; ++k) {  // logits: a_k kept in w, v_k recomputed below
    const int sy = shift_y(p, k), sx = shift_x(p, k);
    const int64_t q = (int64_t)clampi(y + sy, 0, H - 1) * W + clampi(x + sx, 0, W - 1);
    acc_t a = 0;
    for (int c = 0; c < 3; ++c) a += appearance_sq(centre[c], static_cast<acc_t>(img[c * HW + q]), isg[c], scale);
    a = appearance_logit(a);
    w[(int64_t)k * w_stride] = a;
    max_a = running_max(max_a, a);
    if (varm) max_v = running_max(max_v, slot_variation_at<scalar_t, acc_t>(img, H, W, y, x, sy, sx));
  }
  acc_t sum_a = 0, sum_v = 0;
  for (int k = 0; k < n; ++k) {
    w[(int64_t)k * w_stride] = softmax_term(w[(int64_t)k * w_stride], max_a, sum_a);
    if (varm) {
      const acc_t v = slot_variation_at<scalar_t, acc_t>(img, H, W, y, x, shift_y(p, k), shift_x(p, k));
      softmax_term(v, max_v, sum_v);
    }
  }
  const acc_t inv_a = acc_t(1) / sum_a, inv_v = acc_t(1) / sum_v;
  for (int k = 0; k < n; ++k) {
    acc_t second;
    if (varm) {
      const acc_t v = slot_variation_at<scalar_t, acc_t>(img, H, W, y, x, shift_y(p, k), shift_x(p, k));
      second = softmax_value(softmax_numerator(v, max_v), inv_v);
    } else {
      second = static_cast<acc_t>(prior[k]);
    }
    w[(int64_t)k * w_stride] = slot_weight(softmax_value(w[(int64_t)k * w_stride], inv_a), aux, second);
  }
}

// One tap of the propagation: the weighted neighbour value w * v, which the step adds to its pixel's sum (add_tap)
// and the transposed step to the neighbour's. (add_tap takes w and v by reference: so GCC compiles the CPU's
// channel-tile loop with one load of w per tap, as the plain expression; by value it reloaded w for every channel.)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tap(acc_t w, acc_t v) { return w * v; }
template <typename acc_t>
C10_HOST_DEVICE inline acc_t add_tap(acc_t acc, const acc_t& w, const acc_t& v) { return acc + tap(w, v); }

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
        if (t < kc) acc[t] = add_tap(acc[t], wk, static_cast<acc_t>(src[(int64_t)(k0 + t) * HW + q]));
      }
    }
  }
TSCD_UNROLL
  for (int t = 0; t < KC; ++t) {
    if (t < kc) dst[(int64_t)(k0 + t) * HW + pix] = static_cast<scalar_t>(acc[t]);
  }
}

// The source rows of the transposed step: the rows y in [0, H) with clamp(y + sy) = qy form [*lo, *hi]
// (empty when *lo > *hi): one row inside, a run of rows at the two borders.
C10_HOST_DEVICE inline void source_rows(int qy, int sy, int H, int* lo, int* hi) {
  int a = qy - sy, b = qy - sy;
  if (qy == 0) a = 0;
  if (qy == H - 1) b = H - 1;
  *lo = a < 0 ? 0 : a;
  *hi = b > H - 1 ? H - 1 : b;
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
        if (t < kc) Adder::add(dst + (int64_t)(k0 + t) * HW + q, static_cast<scalar_t>(tap(wk, g[t])));
      }
    }
  }
}

}  // namespace refine
}  // namespace tscd
