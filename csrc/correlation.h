// correlation (SCD loss, docs/method.md 4.2): the per-pair math, written once and shared by the CPU
// (csrc/cpu/correlation_cpu.cpp) and CUDA (csrc/cuda/correlation_cuda.cu) kernels; the .cpp/.cu files
// add only tiling, loops and launches.
//
// The fused core works on sampled, L2-normalised features of one image b:
//   t1 (N1, Ct), t2 (N2, Ct) teacher; s1 (N1, Cs), s2 (N2, Cs) student; offset c (N1,)
//   F_ij = t1_i . t2_j,  G_ij = s1_i . s2_j,  P(g) = max(g, 0) (clamp) or g
//   out_b = sum_{i,j} P(G_ij) * (F_ij + c_i)
// The Python wrapper folds centring and shift into c_i = -t1_i . mean_j t2_j + global mean - shift (O(N*C))
// and turns out_b into the loss -sum_b out_b / (B * N1 * N2).
// Backward, with g_b = dLoss/dout_b:
//   D_ij = g_b * P'(G_ij) * (F_ij + c_i)   (P'(g) = 1[g >= 0] with clamp, as torch's clamp gradient)
//   E_ij = g_b * P(G_ij)
//   ds1_i = sum_j D_ij s2_j   ds2_j = sum_i D_ij s1_i   dt1_i = sum_j E_ij t2_j   dt2_j = sum_i E_ij t1_i
//   dc_i = sum_j E_ij
// CUDA: a "row pass" streams j for a block of rows i (out_b, ds1, dt1, dc); a "column pass" streams i for
// a block of columns j (ds2, dt2). CPU: one backward sweep computes each (i, j) tile once and takes both
// sides' gradients from it. Neither materialises N1 x N2; tiles are recomputed in the backward.
#pragma once

#include <c10/macros/Macros.h>

namespace tscd {
namespace correlation {

// P(g): the clamped student correlation, NaN-propagating as torch's clamp (a NaN G stays NaN: a diverging
// student must not be hidden by the clamp).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t student_weight(acc_t g, bool clamp) {
  return (clamp && g < acc_t(0)) ? acc_t(0) : g;
}

// P'(g): 1 where the clamp lets the gradient through (g >= 0, torch's convention at 0), else 0 (also for a NaN
// G, as torch's clamp backward).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t student_mask(acc_t g, bool clamp) {
  return (!clamp || g >= acc_t(0)) ? acc_t(1) : acc_t(0);
}

// One pair's contribution to out_b.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t pair_value(acc_t g, acc_t f_plus_c, bool clamp) {
  return student_weight(g, clamp) * f_plus_c;
}

// One pair's gradient factors: *d = dLoss/dG_ij, *e = dLoss/dF_ij (= dLoss/dc_i share). The clamp selects
// (as torch's clamp backward), not multiplies: a clamped pair's d is 0 even when F + c is NaN or inf.
// Both products are computed unconditionally and then selected, so that compilers without masked vector arithmetic
// (AVX2) can vectorise the loop (they do not speculate a conditional multiply, which could raise an FP exception).
template <typename acc_t>
C10_HOST_DEVICE inline void pair_grads(acc_t g, acc_t f_plus_c, bool clamp, acc_t grad, acc_t* d, acc_t* e) {
  const acc_t d_pass = grad * f_plus_c;
  *d = student_mask(g, clamp) != acc_t(0) ? d_pass : acc_t(0);
  *e = grad * student_weight(g, clamp);
}

}  // namespace correlation
}  // namespace tscd
