// correlation on the CPU: the tile loops of one pass (see correlation_cpu.cpp). Included once per
// instruction set, each time inside `namespace TSCD_CORRELATION_ISA` under a matching `#pragma GCC target`,
// so the same source is vectorised for AVX-512, AVX2+FMA and the baseline; the caller picks at run time.
// Expects kRows, kChunk, kV and the includes of correlation_cpu.cpp.
namespace TSCD_CORRELATION_ISA {

// One pass over one image. Outer points o (n_out, *) row-major, inner points transposed (C, n_in).
// kOffsetInner: the offset c is indexed by the inner point (column pass) instead of the outer one.
template <typename scalar_t, bool kOffsetInner>
struct Pass {
  const scalar_t* out_s;  // (n_out, Cs)
  const scalar_t* out_t;  // (n_out, Ct)
  const scalar_t* in_sT;  // (Cs, n_in)
  const scalar_t* in_tT;  // (Ct, n_in)
  const scalar_t* offset;
  int64_t n_out, n_in, Cs, Ct;
  bool clamp;

  // acc[r][j] = sum_c out[o0 + r][c] * inT[c][j0 + j] for r < rows, j < nj; kV inner points at a time in
  // registers (kRows x kV accumulators), so each inner feature read feeds kRows FMAs.
  static void dots(const scalar_t* out, const scalar_t* inT, int64_t C, int64_t n_in, int64_t o0, int rows,
                   int64_t j0, int nj, scalar_t (*acc)[kChunk]) {
    scalar_t a[kRows];
    int j = 0;
    for (; j + kV <= nj; j += kV) {
      scalar_t s[kRows][kV] = {};
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* col = inT + c * n_in + j0 + j;
        for (int r = 0; r < kRows; ++r) a[r] = r < rows ? out[(o0 + r) * C + c] : scalar_t(0);
        for (int r = 0; r < kRows; ++r) {
#pragma omp simd
          for (int v = 0; v < kV; ++v) s[r][v] += a[r] * col[v];
        }
      }
      for (int r = 0; r < kRows; ++r) {
        for (int v = 0; v < kV; ++v) acc[r][j + v] = s[r][v];
      }
    }
    for (; j < nj; ++j) {
      for (int r = 0; r < kRows; ++r) {
        scalar_t s = 0;
        if (r < rows) {
          for (int64_t c = 0; c < C; ++c) s += out[(o0 + r) * C + c] * inT[c * n_in + j0 + j];
        }
        acc[r][j] = s;
      }
    }
  }

  // g[r][j] = out_s[o0 + r] . in_s[j0 + j], f[r][j] = out_t[o0 + r] . in_t[j0 + j] + c (r < rows, j < nj)
  void tile(int64_t o0, int rows, int64_t j0, int nj, scalar_t (*g)[kChunk], scalar_t (*f)[kChunk]) const {
    dots(out_s, in_sT, Cs, n_in, o0, rows, j0, nj, g);
    dots(out_t, in_tT, Ct, n_in, o0, rows, j0, nj, f);
    for (int r = 0; r < rows; ++r) {
      scalar_t* fr = f[r];
      if (kOffsetInner) {
        const scalar_t* off = offset + j0;
#pragma omp simd
        for (int j = 0; j < nj; ++j) fr[j] += off[j];
      } else {
        const scalar_t off = offset[o0 + r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) fr[j] += off;
      }
    }
  }

  // out[o0 + r][c] += sum_j w[r][j] * inT[c][j0 + j]: a (rows x nj) x (nj x C) product as vectorised dot products
  static void accumulate(const scalar_t (*w)[kChunk], const scalar_t* inT, int64_t C, int64_t n_in, int64_t o0,
                         int rows, int64_t j0, int nj, scalar_t* out) {
    for (int r = 0; r < rows; ++r) {
      const scalar_t* wr = w[r];
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* col = inT + c * n_in + j0;
        scalar_t t = 0;
#pragma omp simd reduction(+ : t)
        for (int j = 0; j < nj; ++j) t += wr[j] * col[j];
        out[(o0 + r) * C + c] += t;
      }
    }
  }

  // sum over the block's pairs of P(G) * (F + c), accumulated in double across tiles
  double forward(int64_t o0, int rows) const {
    scalar_t g[kRows][kChunk], f[kRows][kChunk];
    double total = 0;
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      tile(o0, rows, j0, nj, g, f);
      for (int r = 0; r < rows; ++r) {
        scalar_t s = 0;
        const bool cl = clamp;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < nj; ++j) s += correlation::pair_value<scalar_t>(g[r][j], f[r][j], cl);
        total += static_cast<double>(s);
      }
    }
    return total;
  }

  // gradients of the block's outer points: ds (rows, Cs), dt (rows, Ct) (if with_t), dc (rows) (if with_c)
  void backward(int64_t o0, int rows, scalar_t grad, bool with_t, bool with_c, scalar_t* ds, scalar_t* dt,
                scalar_t* dc) const {
    scalar_t d[kRows][kChunk], e[kRows][kChunk];
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      tile(o0, rows, j0, nj, d, e);  // d <- G, e <- F + c
      const bool cl = clamp;
      for (int r = 0; r < rows; ++r) {
        scalar_t* dr = d[r];
        scalar_t* er = e[r];
#pragma omp simd
        for (int j = 0; j < nj; ++j) {
          scalar_t dd, ee;
          correlation::pair_grads<scalar_t>(dr[j], er[j], cl, grad, &dd, &ee);
          dr[j] = dd;
          er[j] = ee;
        }
        if (with_c) {
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int j = 0; j < nj; ++j) s += er[j];
          dc[o0 + r] += s;
        }
      }
      accumulate(d, in_sT, Cs, n_in, o0, rows, j0, nj, ds);
      if (with_t) accumulate(e, in_tT, Ct, n_in, o0, rows, j0, nj, dt);
    }
  }
};

}  // namespace TSCD_CORRELATION_ISA
