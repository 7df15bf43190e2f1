// refine on the CPU: the row loops (see refine_cpu.cpp). Included once per instruction set by isa_each.h, inside
// `namespace TSCD_ISA` under a matching `#pragma GCC target`; the caller picks a copy per op call (with_isa).
// Expects the includes and definitions of refine_cpu.cpp above its include of isa_each.h (kV, kChunk, kMaxN,
// Layout, Slots, make_slots, fill_pads).
namespace TSCD_ISA {

// ------------------------------------------------------------------------------------------------
// Weights
// ------------------------------------------------------------------------------------------------

// One softmax numerator row: z[x] <- exp(z[x] - mx[x]), and sum[x] += it (kV pixels).
template <typename T>
TSCD_ALWAYS_INLINE void exp_shifted(T* z, const T* mx, T* sum) {
#pragma omp simd
  for (int x = 0; x < kV; ++x) z[x] = refine::softmax_term(z[x], mx[x], sum[x]);
}

// The n weights of row y (all W pixels, kV at a time), the steps of refine::pixel_weights.
template <typename T>
TSCD_NOINLINE void weights_row(const T* imgp, const T* dd, const T* dr, const T* prior, const Params& p,
                               const Layout& L, int y, T* w, T* scratch) {
  const int n = p.num_dil * refine::kOffsets, W = p.W, P = L.P;
  const int64_t plane = L.plane, yo = (int64_t)y * L.Wp + P;
  Slots s;
  make_slots(p, L, y, s);
  bool down_ok[kMaxN];
  for (int k = 0; k < n; ++k) down_ok[k] = refine::variation_down_ok(y, s.sy[k], p.H);
  const T scale = static_cast<T>(p.rgb_scale), aux = static_cast<T>(p.aux_weight);
  const bool varm = p.mode == refine::kModeVarm;
  T* A = scratch;            // (n, kV): logits, then exponentials
  T* Vt = scratch + n * kV;  // (n, kV)
  for (int x0 = 0; x0 < W; x0 += kV) {
    T cen[3][kV], mean[3][kV], var[3][kV], isg[3][kV];
    for (int c = 0; c < 3; ++c) {
      const T* r = imgp + c * plane + yo + x0;
#pragma omp simd
      for (int x = 0; x < kV; ++x) {
        cen[c][x] = r[x];
        mean[c][x] = 0;
        var[c][x] = 0;
      }
    }
    for (int k = 0; k < n; ++k) {
      for (int c = 0; c < 3; ++c) {
        const T* r = imgp + c * plane + s.row[k] + P + s.sx[k] + x0;
#pragma omp simd
        for (int x = 0; x < kV; ++x) mean[c][x] += r[x];
      }
    }
    for (int c = 0; c < 3; ++c) {
#pragma omp simd
      for (int x = 0; x < kV; ++x) mean[c][x] /= T(n);
    }
    for (int k = 0; k < n; ++k) {
      for (int c = 0; c < 3; ++c) {
        const T* r = imgp + c * plane + s.row[k] + P + s.sx[k] + x0;
#pragma omp simd
        for (int x = 0; x < kV; ++x) var[c][x] = refine::add_sq_dev(var[c][x], r[x], mean[c][x]);
      }
    }
    for (int c = 0; c < 3; ++c) {
#pragma omp simd
      for (int x = 0; x < kV; ++x) isg[c][x] = refine::inv_sigma(var[c][x], n);
    }
    T max_a[kV], max_v[kV], sum_a[kV], sum_v[kV];
#pragma omp simd
    for (int x = 0; x < kV; ++x) {
      max_a[x] = -INFINITY;
      max_v[x] = -INFINITY;
      sum_a[x] = 0;
      sum_v[x] = 0;
    }
    for (int k = 0; k < n; ++k) {
      const int64_t off = s.row[k] + P + s.sx[k] + x0;
      const T *r0 = imgp + off, *r1 = imgp + plane + off, *r2 = imgp + 2 * plane + off;
      T* a_k = A + k * kV;
#pragma omp simd
      for (int x = 0; x < kV; ++x) {
        T a = 0;
        a += refine::appearance_sq(cen[0][x], r0[x], isg[0][x], scale);
        a += refine::appearance_sq(cen[1][x], r1[x], isg[1][x], scale);
        a += refine::appearance_sq(cen[2][x], r2[x], isg[2][x], scale);
        a = refine::appearance_logit(a);
        a_k[x] = a;
        max_a[x] = refine::running_max(max_a[x], a);
      }
      if (varm) {
        const T* dn = dd + off;
        const T* rt = dr + off;
        const bool dok = down_ok[k];
        T* v_k = Vt + k * kV;
#pragma omp simd
        for (int x = 0; x < kV; ++x) {
          // the rest of variation_right_ok (0 <= x + sx < W - 1) is in dr: zero pads and a zero last column
          const T v = refine::slot_variation<T>(dok, dn[x], x0 + x + 1 < W, rt[x]);
          v_k[x] = v;
          max_v[x] = refine::running_max(max_v[x], v);
        }
      }
    }
    for (int k = 0; k < n; ++k) {
      exp_shifted<T>(A + k * kV, max_a, sum_a);
      if (varm) exp_shifted<T>(Vt + k * kV, max_v, sum_v);
    }
#pragma omp simd
    for (int x = 0; x < kV; ++x) {  // the sums become their inverses
      sum_a[x] = T(1) / sum_a[x];
      sum_v[x] = T(1) / sum_v[x];
    }
    for (int k = 0; k < n; ++k) {
      const T* a_k = A + k * kV;
      const T* v_k = Vt + k * kV;
      T* wr = w + k * plane + yo + x0;
      if (varm) {
#pragma omp simd
        for (int x = 0; x < kV; ++x) {
          wr[x] = refine::slot_weight(refine::softmax_value(a_k[x], sum_a[x]), aux,
                                      refine::softmax_value(v_k[x], sum_v[x]));
        }
      } else {
        const T pk = prior[k];
#pragma omp simd
        for (int x = 0; x < kV; ++x) wr[x] = refine::slot_weight(refine::softmax_value(a_k[x], sum_a[x]), aux, pk);
      }
    }
  }
  for (int k = 0; k < n; ++k) fill_pads(w + k * plane + (int64_t)y * L.Wp, L, false);  // zeros: the transpose
}

// ------------------------------------------------------------------------------------------------
// Propagation
// ------------------------------------------------------------------------------------------------

// The register tile of the propagation steps: KC channels x kV pixels of one row.
template <typename T, int KC>
TSCD_ALWAYS_INLINE void zero_tile(T (&acc)[KC][kV]) {
  for (int t = 0; t < KC; ++t) {
#pragma omp simd
    for (int x = 0; x < kV; ++x) acc[t][x] = 0;
  }
}

// acc[t][x] += w[x] * v[t * plane + x]: one neighbour's weighted maps (channels `plane` apart)
template <typename T, int KC>
TSCD_ALWAYS_INLINE void add_tap_tile(T (&acc)[KC][kV], const T* w, const T* v, int64_t plane) {
  for (int t = 0; t < KC; ++t) {
#pragma omp simd
    for (int x = 0; x < kV; ++x) acc[t][x] = refine::add_tap(acc[t][x], w[x], v[t * plane + x]);
  }
}

// dst[t * plane + x] = acc[t][x]
template <typename T, int KC>
TSCD_ALWAYS_INLINE void store_tile(const T (&acc)[KC][kV], T* dst, int64_t plane) {
  for (int t = 0; t < KC; ++t) {
#pragma omp simd
    for (int x = 0; x < kV; ++x) dst[t * plane + x] = acc[t][x];
  }
}

// One step of row y for KC channels: dst(t, y, x) = sum_k w_k(y, x) * src(t, row_k, x + sx_k).
template <typename T, int KC>
TSCD_NOINLINE void step_row(const T* src, T* dst, const T* w, const Slots& s, int n, const Layout& L, int y) {
  const int64_t plane = L.plane, yo = (int64_t)y * L.Wp + L.P;
  for (int x0 = 0; x0 < L.W; x0 += kV) {
    T acc[KC][kV];
    zero_tile<T, KC>(acc);
    for (int k = 0; k < n; ++k) {
      const T* wr = w + k * plane + yo + x0;
      const T* sr = src + s.row[k] + L.P + s.sx[k] + x0;
      add_tap_tile<T, KC>(acc, wr, sr, plane);
    }
    store_tile<T, KC>(acc, dst + yo + x0, plane);
  }
  for (int t = 0; t < KC; ++t) fill_pads(dst + t * plane + (int64_t)y * L.Wp, L, true);
}

// The transposed step for output row qy and KC channels (a gather): dst(t, qy, qx) = sum_k sum_{y : clamp(y +
// sy_k) = qy} w_k(y, qx - sx_k) * g(t, y, qx - sx_k), with zero pads in w and g; then the pixels whose column
// clamp(x + sx_k) was clamped onto column 0 or W - 1 are added there.
template <typename T, int KC>
TSCD_NOINLINE void step_transpose_row(const T* g, T* dst, const T* w, const Params& p, const Layout& L, int qy) {
  const int n = p.num_dil * refine::kOffsets, W = L.W, P = L.P;
  const int64_t plane = L.plane, Wp = L.Wp, qo = (int64_t)qy * Wp + P;
  int lo[kMaxN], hi[kMaxN], sx[kMaxN];
  for (int k = 0; k < n; ++k) {
    refine::source_rows(qy, refine::shift_y(p, k), p.H, &lo[k], &hi[k]);
    sx[k] = refine::clampi(refine::shift_x(p, k), -P, P);
  }
  for (int x0 = 0; x0 < W; x0 += kV) {
    T acc[KC][kV];
    zero_tile<T, KC>(acc);
    for (int k = 0; k < n; ++k) {
      for (int y = lo[k]; y <= hi[k]; ++y) {
        const int64_t off = (int64_t)y * Wp + P - sx[k] + x0;
        const T* wr = w + k * plane + off;
        const T* gr = g + off;
        add_tap_tile<T, KC>(acc, wr, gr, plane);
      }
    }
    store_tile<T, KC>(acc, dst + qo + x0, plane);
  }
  // border columns, 16 lanes at a time (lanes past the run are discarded; reads may pass the row's end by
  // < 16 elements, which the buffers' tail slack covers)
  T left[KC][kV], right[KC][kV];
  for (int t = 0; t < KC; ++t) {
#pragma omp simd
    for (int x = 0; x < kV; ++x) {
      left[t][x] = 0;
      right[t][x] = 0;
    }
  }
  for (int k = 0; k < n; ++k) {
    if (sx[k] == 0) continue;
    // sx < 0: columns [0, -sx) clamp onto column 0; sx > 0: columns [W - sx, W) onto column W - 1
    const int x_lo = sx[k] < 0 ? 0 : W - sx[k], x_hi = sx[k] < 0 ? -sx[k] : W;
    T(*sum)[kV] = sx[k] < 0 ? left : right;
    for (int y = lo[k]; y <= hi[k]; ++y) {
      const T* wr = w + k * plane + (int64_t)y * Wp + P;
      const T* gr = g + (int64_t)y * Wp + P;
      for (int xx = x_lo; xx < x_hi; xx += kV) {
        for (int t = 0; t < KC; ++t) {
#pragma omp simd
          for (int x = 0; x < kV; ++x) {
            sum[t][x] += xx + x < x_hi ? refine::tap(wr[xx + x], gr[t * plane + xx + x]) : T(0);
          }
        }
      }
    }
  }
  for (int t = 0; t < KC; ++t) {
    T l = 0, r = 0;
    for (int x = 0; x < kV; ++x) {
      l += left[t][x];
      r += right[t][x];
    }
    dst[t * plane + qo] += l;
    dst[t * plane + qo + W - 1] += r;
  }
  for (int t = 0; t < KC; ++t) fill_pads(dst + t * plane + (int64_t)qy * Wp, L, false);
}

// step_row (transpose: step_transpose_row) of row y for its kc <= KC channels, with kc as a compile-time tile width.
template <typename T, int KC>
void row_dispatch(bool transpose, const T* src, T* dst, const T* w, const Slots* s, const Params& p, const Layout& L,
                  int y, int kc) {
  if (kc == KC) {
    if (transpose) {
      step_transpose_row<T, KC>(src, dst, w, p, L, y);
    } else {
      step_row<T, KC>(src, dst, w, *s, p.num_dil * refine::kOffsets, L, y);
    }
  } else if constexpr (KC > 1) {
    row_dispatch<T, KC - 1>(transpose, src, dst, w, s, p, L, y, kc);
  }
}

// This instruction set's row functions, for the callers' dispatch (refine_cpu.cpp: with_isa).
struct Isa {
  template <typename T, typename... Args>
  static void weights_row(Args&&... args) {
    TSCD_ISA::weights_row<T>(std::forward<Args>(args)...);
  }
  // step_row (transpose: step_transpose_row) of one row for kc <= kChunk channels.
  template <typename T, typename... Args>
  static void step_row(Args&&... args) {
    row_dispatch<T, kChunk>(std::forward<Args>(args)...);
  }
};

}  // namespace TSCD_ISA
