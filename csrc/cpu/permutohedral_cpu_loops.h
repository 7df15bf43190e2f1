// permutohedral on the CPU: the point and vertex loops (see permutohedral_cpu.cpp). Included once per instruction
// set by isa_each.h, inside `namespace TSCD_ISA` under a matching `#pragma GCC target`; the caller picks a copy per
// op call (with_isa). Expects the includes and definitions of permutohedral_cpu.cpp above its include of isa_each.h
// (kMaxDim, kCrfMaxKP, CrfKernel, kPadLogit).
namespace TSCD_ISA {

// Keys (row i - k0 of keys) and barycentric weights of the points i0..i1-1 (compiled per ISA: rounding is one
// instruction from SSE4.1).
template <typename scalar_t>
TSCD_NOINLINE void embed_points(const scalar_t* feat, int64_t N, int d, const scalar_t* scale, int* keys, scalar_t* w,
                                int64_t i0, int64_t i1, int64_t k0) {
  const int d1 = d + 1;
  // the usual dimensions (2: positions, 5: positions and colours) with d known at compile time: the per-coordinate
  // loops of embed_point unroll and its small arrays stay in registers
  auto run = [&](auto dd) {
    const int dc = decltype(dd)::value > 0 ? decltype(dd)::value : d;
    for (int64_t i = i0; i < i1; ++i) {
      perm::embed_point<scalar_t, scalar_t>(feat + i, N, dc, scale, keys + (i - k0) * d1 * dc, w + i * d1);
    }
  };
  switch (d) {
    case 2: run(std::integral_constant<int, 2>()); break;
    case 5: run(std::integral_constant<int, 5>()); break;
    default: run(std::integral_constant<int, 0>()); break;
  }
}

constexpr int64_t kAhead = 8;  // prefetch distance (vertices) of the blur's neighbour gathers

// Prefetch the cache lines of a row of W values (a gather a few iterations ahead).
template <typename T>
TSCD_ALWAYS_INLINE void prefetch_row(const T* p, int64_t W) {
  __builtin_prefetch(p);
  __builtin_prefetch(p + W - 1);
}

// The splat of the W (= KP, or w at run time) channels at q / V (row stride S), restricted to the vertices
// [v0, v1): V[v0..v1) = 0, then for every point i in [i0, i1) in order, V[vtx] += w * (q[i] * nrm[i]) where
// vtx is in the range. Each vertex thus sums its points in point order, whatever the split (bit-identical).
template <typename T, int KP>
TSCD_NOINLINE void crf_splat(const int32_t* vtx, const T* w, int d1, const T* q, const T* nrm, int64_t S, int64_t width,
                             T* V, int64_t v0, int64_t v1, int64_t i0, int64_t i1) {
  const int64_t W = KP > 0 ? KP : width;
  for (int64_t m = v0; m < v1; ++m) {
    T* y = V + m * S;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) y[c] = T(0);
  }
  const uint64_t span = static_cast<uint64_t>(v1 - v0);
  for (int64_t i = i0; i < i1; ++i) {
    const T* qi = q + i * S;
    const T n = nrm[i];
    for (int r = 0; r < d1; ++r) {
      const int64_t v = vtx[i * d1 + r];
      if (static_cast<uint64_t>(v - v0) >= span) continue;
      T* y = V + v * S;
      const T wr = w[i * d1 + r];
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) y[c] += wr * (qi[c] * n);
    }
  }
}

// One blur direction: dst[m] = blur(src[m], src[nb[2m]], src[nb[2m+1]]) (a missing neighbour is the zero row).
template <typename T, int KP>
TSCD_NOINLINE void crf_blur(const T* src, T* dst, const int32_t* nb, int64_t S, int64_t width, int64_t m0, int64_t m1) {
  const int64_t W = KP > 0 ? KP : width;
  for (int64_t m = m0; m < m1; ++m) {
    if (m + kAhead < m1) {
      prefetch_row(src + static_cast<int64_t>(nb[2 * (m + kAhead)]) * S, W);
      prefetch_row(src + static_cast<int64_t>(nb[2 * (m + kAhead) + 1]) * S, W);
    }
    const T* a = src + static_cast<int64_t>(nb[2 * m]) * S;
    const T* b = src + static_cast<int64_t>(nb[2 * m + 1]) * S;
    const T* x = src + m * S;
    T* y = dst + m * S;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) y[c] = perm::blur_value(x[c], a[c], b[c]);
  }
}

// l[c] += weight * n * (sum_r w_r V[vtx_r][c]) / c_d for c < W: the slice of one kernel's lattice at one point and
// its message. D1 > 0: the d+1 vertices known at compile time (the r loop unrolls inside the SIMD loop over channels,
// and the sum stays in registers); D1 = 0: d1 at run time.
template <typename T, int D1>
TSCD_ALWAYS_INLINE void crf_slice_message(const CrfKernel<T>& kk, int64_t i, int64_t S, int64_t W, T* l) {
  const int d1 = D1 > 0 ? D1 : kk.d1;
  const int32_t* vtx = kk.vtx + i * d1;
  const T* w = kk.w + i * d1;
  const T n = kk.nrm[i];
  if constexpr (D1 > 0) {
    const T* x[D1];
    T wr[D1];
    for (int r = 0; r < D1; ++r) {
      x[r] = kk.V + static_cast<int64_t>(vtx[r]) * S;
      wr[r] = w[r];
    }
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      T acc = wr[0] * x[0][c];
      for (int r = 1; r < D1; ++r) acc += wr[r] * x[r][c];
      l[c] = perm::crf_message(l[c], acc, kk.inv_gain, n, kk.weight);
    }
  } else {
    T acc[kCrfMaxKP];
    for (int64_t c0 = 0; c0 < W; c0 += kCrfMaxKP) {
      const int64_t cw = std::min<int64_t>(kCrfMaxKP, W - c0);
      for (int64_t c = 0; c < cw; ++c) acc[c] = T(0);
      for (int r = 0; r < d1; ++r) {
        const T* x = kk.V + static_cast<int64_t>(vtx[r]) * S + c0;
        const T wr = w[r];
#pragma omp simd
        for (int64_t c = 0; c < cw; ++c) acc[c] += wr * x[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < cw; ++c) l[c0 + c] = perm::crf_message(l[c0 + c], acc[c], kk.inv_gain, n, kk.weight);
    }
  }
}

// The softmax's loops run over the W channels (a multiple of 8) in blocks of kLanes = 16 and a last block of 8, so
// that no scalar remainder is left; lane[c] holds the partial max / sum of the channels c (mod kLanes).
constexpr int kLanes = 16;

// The max and the sum of the kLanes lanes, pairwise.
template <typename T>
TSCD_ALWAYS_INLINE T lane_max(const T* v) {
  T a[8];
  for (int c = 0; c < 8; ++c) a[c] = v[c + 8] > v[c] ? v[c + 8] : v[c];
  for (int c = 0; c < 4; ++c) a[c] = a[c + 4] > a[c] ? a[c + 4] : a[c];
  const T b0 = a[2] > a[0] ? a[2] : a[0], b1 = a[3] > a[1] ? a[3] : a[1];
  return b1 > b0 ? b1 : b0;
}
template <typename T>
TSCD_ALWAYS_INLINE T lane_sum(const T* v) {
  T a[8];
  for (int c = 0; c < 8; ++c) a[c] = v[c] + v[c + 8];
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// One block of L channels: lane = max(lane, l); q = exp(l - mx), lane += q.
template <typename T, int L>
TSCD_ALWAYS_INLINE void max_lanes(const T* l, T* lane) {
#pragma omp simd
  for (int c = 0; c < L; ++c) lane[c] = l[c] > lane[c] ? l[c] : lane[c];
}
template <typename T, int L>
TSCD_ALWAYS_INLINE void exp_lanes(const T* l, T mx, T* q, T* lane) {
#pragma omp simd
  for (int c = 0; c < L; ++c) {
    const T e = perm::exp_nonpositive(l[c] - mx);
    q[c] = e;
    lane[c] += e;
  }
}

// For the points i0..i1-1: l = negu[i] + sum_k weight_k * n_k[i] * slice_k(V_k)[i] / c_d (in kernel order), and
// q[i] = softmax(l) over the S channels (padding channels: negu = kPadLogit, q = 0). scratch: S values (KP = 0).
template <typename T, int KP>
TSCD_NOINLINE void crf_update(const CrfKernel<T>* ks, int nk, const T* negu, T* q, int64_t S, T* scratch, int64_t i0,
                              int64_t i1) {
  const int64_t W = KP > 0 ? KP : S;
  T lbuf[KP > 0 ? KP : 1];
  T* l = KP > 0 ? lbuf : scratch;
  for (int64_t i = i0; i < i1; ++i) {
    const T* u = negu + i * S;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) l[c] = u[c];
    for (int k = 0; k < nk; ++k) {
      switch (ks[k].d1) {  // the lattices of the usual kernels (d = 2: positions, d = 5: positions and colours)
        case 3: crf_slice_message<T, 3>(ks[k], i, S, W, l); break;
        case 6: crf_slice_message<T, 6>(ks[k], i, S, W, l); break;
        default: crf_slice_message<T, 0>(ks[k], i, S, W, l); break;
      }
    }
    // softmax over all W channels: a padding channel's logit is kPadLogit (its messages are 0), so it changes
    // neither the max nor the sum (its exp underflows to 0)
    T lane[kLanes];
    for (int c = 0; c < kLanes; ++c) lane[c] = kPadLogit<T>;
    int64_t c0 = 0;
    for (; c0 + kLanes <= W; c0 += kLanes) max_lanes<T, kLanes>(l + c0, lane);
    if (c0 < W) max_lanes<T, 8>(l + c0, lane);
    const T mx = lane_max(lane);
    T* qi = q + i * S;
    for (int c = 0; c < kLanes; ++c) lane[c] = T(0);
    for (c0 = 0; c0 + kLanes <= W; c0 += kLanes) exp_lanes<T, kLanes>(l + c0, mx, qi + c0, lane);
    if (c0 < W) exp_lanes<T, 8>(l + c0, mx, qi + c0, lane);
    const T sum = lane_sum(lane);
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) qi[c] *= inv;
  }
}

// This instruction set's loops, for the callers' dispatch (permutohedral_cpu.cpp: with_isa).
struct Isa {
  template <typename scalar_t, typename... Args>
  static void embed_points(Args&&... args) {
    TSCD_ISA::embed_points<scalar_t>(std::forward<Args>(args)...);
  }
  template <typename T, int KP, typename... Args>
  static void crf_splat(Args&&... args) {
    TSCD_ISA::crf_splat<T, KP>(std::forward<Args>(args)...);
  }
  template <typename T, int KP, typename... Args>
  static void crf_blur(Args&&... args) {
    TSCD_ISA::crf_blur<T, KP>(std::forward<Args>(args)...);
  }
  template <typename T, int KP, typename... Args>
  static void crf_update(Args&&... args) {
    TSCD_ISA::crf_update<T, KP>(std::forward<Args>(args)...);
  }
};

}  // namespace TSCD_ISA
