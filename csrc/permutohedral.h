// permutohedral (docs/method.md 4.5, 6): the lattice math of Adams, Baek & Davis (2010), "Fast High-Dimensional
// Filtering Using the Permutohedral Lattice", written once and shared by the CPU (csrc/cpu/permutohedral_cpu.cpp)
// and CUDA (csrc/cuda/permutohedral_cuda.cu) kernels. The .cpp/.cu files add the hash tables, loops and launches.
//
// Features f (d values per point) are in "std-1" units: the target kernel is exp(-|f_i - f_j|^2 / 2).
//   1. Scale:    s_j = f_j * sigma_L / sqrt((j+1)(j+2)),  sigma_L = sqrt(2/3) * (d+1)
//      (sqrt((j+1)(j+2)) normalises the columns of the elevation matrix; sigma_L is the std, in lattice
//      units, of splat + blur + slice: the [1 2 1]/4 blur along the d+1 lattice directions gives the
//      covariance (d+1)^2/2 on the hyperplane, splat and slice add (d+1)^2/12 each in the paper's estimate,
//      exact for d = 1.)
//   2. Elevate:  x = E s in R^{d+1}, on the hyperplane sum(x) = 0; E's column j is (1,..,1, -(j+1), 0,..,0)
//      with j+1 leading ones, divided by sqrt((j+1)(j+2)) (folded into step 1): an isometry R^d -> H_d.
//   3. Enclosing simplex: the nearest "remainder-0" point (all coordinates multiples of d+1), the rank of each
//      coordinate's differential x_k - rem0_k, shifted by the remainder sum; vertex r of the simplex is
//      rem0 + the canonical vertex r permuted by the ranks; its barycentric weight is bary[r].
//   4. Keys: the first d coordinates of a vertex (the last one is minus their sum); hashed into a table.
//   5. Blur: along each of the d+1 lattice directions u_j = (d+1) e_j - 1 (both signs): v <- v/2 + (v(+u) + v(-u))/4,
//      missing neighbours count as 0. Order j = 0..d (forward) or d..0 (the transpose, for gradients).
//   6. Slice: out_i = sum_r bary_r(i) * v(vertex_r(i)) / c_d.
// Calibration c_d: for a normalised blur, splat-blur-slice integrates to the lattice cell volume
// (d+1)^(d-1/2) over the hyperplane, while the Gaussian of std sigma_L integrates to (2 pi)^(d/2) sigma_L^d;
// so the lattice kernel is about c_d * exp(-|df|^2/2) with c_d = 1 / (sqrt(d+1) * (4 pi / 3)^(d/2)).
// Dividing by c_d makes the unnormalised output approximate sum_j exp(-|f_i - f_j|^2/2) v_j (self term 1).
#pragma once

#include <c10/macros/Macros.h>

#include "fast_exp.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tscd {
namespace perm {

constexpr int kMaxDim = 8;                 // at most 8 feature dimensions (we use 2 and 5)
constexpr double kNormEps = 1e-20;         // normalised variant: a denominator below this gives 0
// The lattice's range: a feature with |f| > kMaxFeature (or NaN, +-inf) is "invalid". Its point is embedded at
// the origin (so every key and index stays in range: |elevated coordinate| <= 85 kMaxFeature < 2^31 for d <= 8)
// and gets NaN barycentric weights, so every output that reads one of its vertices is NaN. The Python wrappers
// (tscd/kernels/permutohedral.py) make the whole image's output NaN in that case.
constexpr double kMaxFeature = 1048576.0;  // 2^20 standard deviations

// sigma_L / sqrt((j+1)(j+2)): the factor of feature j before elevation.
C10_HOST_DEVICE inline double feature_scale(int j, int d) {
  return std::sqrt(2.0 / 3.0) * (d + 1) / std::sqrt(double(j + 1) * double(j + 2));
}

// c_d (see the header comment): the lattice returns about c_d times the exact Gaussian sum.
inline double lattice_gain(int d) { return 1.0 / (std::sqrt(double(d + 1)) * std::pow(4.0 * M_PI / 3.0, 0.5 * d)); }

// True for a feature value the lattice can embed: finite and |v| <= kMaxFeature (false for NaN).
template <typename acc_t>
C10_HOST_DEVICE inline bool feature_in_range(acc_t v) {
  return v <= acc_t(kMaxFeature) && v >= -acc_t(kMaxFeature);
}

// The d+1 vertices (keys, d ints each) and barycentric weights of the simplex that holds feature vector
// f[0..d-1] (strided by f_stride). key: (d+1) x d ints, row r = vertex r; bary: d+1 weights (sum to 1).
// Returns false for an invalid point (a feature out of range, see kMaxFeature): its keys are those of the origin,
// its weights NaN. Every key and rank stays in range for any input.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline bool embed_point(const scalar_t* f, int64_t f_stride, int d, const acc_t* scale, int* key,
                                        acc_t* bary) {
  const int d1 = d + 1;
  bool valid = true;
  for (int k = 0; k < d; ++k) valid = valid && feature_in_range(static_cast<acc_t>(f[k * f_stride]));
  acc_t x[kMaxDim + 1];
  // 2. elevate: x_k = sum_{j >= k} s_j - k s_{k-1}
  acc_t sm = 0;
  for (int k = d; k >= 1; --k) {
    const acc_t s = valid ? static_cast<acc_t>(f[(k - 1) * f_stride]) * scale[k - 1] : acc_t(0);
    x[k] = sm - acc_t(k) * s;
    sm += s;
  }
  x[0] = sm;
  // 3. nearest remainder-0 point, coordinate by coordinate
  int rem0[kMaxDim + 1];
  int rank[kMaxDim + 1];
  int sum = 0;
  const acc_t inv = acc_t(1) / acc_t(d1);
  for (int k = 0; k <= d; ++k) {
    const acc_t v = x[k] * inv;
    const int up = static_cast<int>(std::ceil(v)) * d1;
    const int down = static_cast<int>(std::floor(v)) * d1;
    rem0[k] = (acc_t(up) - x[k] < x[k] - acc_t(down)) ? up : down;
    sum += rem0[k];
    rank[k] = 0;
  }
  sum /= d1;  // the remainder-0 point is off the hyperplane by sum * (d+1) per unit
  // rank: how many coordinates have a larger differential (ties broken by index)
  acc_t diff[kMaxDim + 1];
  for (int k = 0; k <= d; ++k) diff[k] = x[k] - acc_t(rem0[k]);
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int less = diff[i] < diff[j] ? 1 : 0;  // branch-free: the outcome is unpredictable
      rank[i] += less;
      rank[j] += 1 - less;
    }
  }
  // move back onto the hyperplane: the `sum` coordinates with the smallest differentials step by -(d+1)
  // (or the largest by +(d+1)), which rotates the ranks
  for (int k = 0; k <= d; ++k) {
    rank[k] += sum;
    if (rank[k] < 0) {
      rank[k] += d1;
      rem0[k] += d1;
    } else if (rank[k] > d) {
      rank[k] -= d1;
      rem0[k] -= d1;
    }
    // exact arithmetic keeps |sum| <= d+1, so one step suffices; rounding at the far end of the range could
    // leave a rank outside [0, d], which must never index b[] below
    rank[k] = rank[k] < 0 ? 0 : (rank[k] > d ? d : rank[k]);
  }
  // barycentric weights
  acc_t b[kMaxDim + 2];
  for (int r = 0; r <= d + 1; ++r) b[r] = 0;
  for (int k = 0; k <= d; ++k) {
    const acc_t delta = (x[k] - acc_t(rem0[k])) * inv;
    b[d - rank[k]] += delta;
    b[d + 1 - rank[k]] -= delta;
  }
  b[0] += acc_t(1) + b[d + 1];
  // vertex r = rem0 + canonical vertex r: coordinate of rank q gets r if q <= d - r, else r - (d+1)
  const acc_t nan = static_cast<acc_t>(NAN);
  for (int r = 0; r <= d; ++r) {
    bary[r] = valid ? b[r] : nan;
    for (int k = 0; k < d; ++k) key[r * d + k] = rem0[k] + r - (rank[k] > d - r ? d1 : 0);
  }
  return valid;
}

C10_HOST_DEVICE inline uint64_t hash_key(const int* key, int d) {
  uint64_t h = 0;
  for (int k = 0; k < d; ++k) h = (h + static_cast<uint32_t>(key[k])) * 2654435761ULL;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 32;
  return h;
}

// The key of the neighbour of `key` along lattice direction j (0..d), sign +1 or -1: key + sign * ((d+1) e_j - 1)
// restricted to the first d coordinates (for j == d only the -1 part remains).
C10_HOST_DEVICE inline void neighbour_key(const int* key, int d, int j, int sign, int* out) {
  for (int k = 0; k < d; ++k) out[k] = key[k] - sign;
  if (j < d) out[j] += sign * (d + 1);
}

C10_HOST_DEVICE inline bool same_key(const int* a, const int* b, int d) {
  for (int k = 0; k < d; ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// One blur step of a value v with its two neighbours' values a, c along one lattice direction.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t blur_value(scalar_t v, scalar_t a, scalar_t c) {
  return scalar_t(0.5) * v + scalar_t(0.25) * (a + c);
}

// One blur step at vertex m: v/2 + (v(n1) + v(n2))/4 with missing neighbours (-1) as 0.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t blur_at(const scalar_t* src, int64_t m, int64_t n1, int64_t n2) {
  const scalar_t a = n1 >= 0 ? src[n1] : scalar_t(0);
  const scalar_t c = n2 >= 0 ? src[n2] : scalar_t(0);
  return blur_value(src[m], a, c);
}

// num / den for the normalised variant; a denominator <= kNormEps gives 0 (num * 0: NaN stays NaN), a NaN
// denominator gives NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalise(acc_t num, acc_t den) {
  return den <= acc_t(kNormEps) ? num * acc_t(0) : num / den;
}

// Post-processing of a sliced value: out = (lat - self * v) / den for the normalised variant, lat - self * v
// otherwise (self = 1 when the self term is excluded; lat is already divided by c_d).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t finish(acc_t lat, acc_t v, acc_t den, bool normalize, bool include_self) {
  const acc_t num = include_self ? lat : lat - v;
  if (!normalize) return num;
  return normalise(num, den);
}

// Mean-field dense CRF (docs/method.md 6), per point: the pairwise message of kernel k adds
// w_k * n_k(i) * (lattice output / c_d) to the logits (-U plus the messages), then Q = softmax(logits).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t crf_message(acc_t logit, acc_t lat, acc_t inv_gain, acc_t norm, acc_t weight) {
  return logit + weight * ((lat * inv_gain) * norm);
}

// n_k = (K_k 1)^-1/2 from the lattice's sliced "ones" (already divided by c_d), floored like the reference.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t crf_norm(acc_t k1) {
  const acc_t v = k1 > acc_t(1e-20) ? k1 : acc_t(1e-20);
  return acc_t(1) / std::sqrt(v);
}

// exp(x) for x <= 0 (the mean field's softmax after subtracting the max): fast_exp.h's vectorisable expf.
C10_HOST_DEVICE inline float exp_nonpositive(float x) { return fast_expf_nonpositive(x); }
C10_HOST_DEVICE inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace perm
}  // namespace tscd
