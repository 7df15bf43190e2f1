// correlation on the CPU: the tile loops of one pass (see correlation_cpu.cpp). Included once per instruction set by
// isa_each.h, inside `namespace TSCD_ISA` under a matching `#pragma GCC target`, so the same source is vectorised
// for AVX-512, AVX2+FMA and the baseline; the caller picks a copy per op call (with_isa). Expects kRows, kChunk and
// the includes of correlation_cpu.cpp, and TSCD_ISA_FLOATS (floats per vector register of the instruction set).
namespace TSCD_ISA {

// inner points per register block: kV (one vector) in the gradient products, kDotV in the dot products (two
// vectors on AVX-512: 16 accumulators of its 32 registers). kRows x kV accumulators plus the operands must fit the
// registers, or the inner loops spill.
constexpr int kV = TSCD_ISA_FLOATS;
constexpr int kDotV = TSCD_ISA_FLOATS == 16 ? 2 * kV : kV;

// The loops over one image. Outer (view-1) points o (n_out, *) row-major, inner (view-2) points transposed
// (C, n_in); the offset c is indexed by the outer point.
template <typename scalar_t>
struct Pass {
  const scalar_t* out_s;  // (n_out, Cs)
  const scalar_t* out_t;  // (n_out, Ct)
  const scalar_t* in_sT;  // (Cs, n_in)
  const scalar_t* in_tT;  // (Ct, n_in)
  const scalar_t* offset;
  int64_t n_out, n_in, Cs, Ct;
  bool clamp;

  // pk[c * kRows + r] = out[o0 + r][c] for r < rows, 0 for the padding rows: one block of outer features, packed
  // so that the dot products read kRows consecutive scalars per channel (memory-operand broadcasts, no branches).
  static void pack(const scalar_t* out, int64_t C, int64_t o0, int rows, scalar_t* pk) {
    for (int64_t c = 0; c < C; ++c) {
      for (int r = 0; r < kRows; ++r) pk[c * kRows + r] = r < rows ? out[(o0 + r) * C + c] : scalar_t(0);
    }
  }

  // acc[r][j] for j in [j, nj) in blocks of W inner points, W in registers (kRows x W accumulators), so each inner
  // feature read feeds kRows FMAs; returns where it stopped (the first j with j + W > nj).
  template <int W>
  static int dots_block(const scalar_t* pk, const scalar_t* inT, int64_t C, int64_t n_in, int64_t j0, int j, int nj,
                        scalar_t (*acc)[kChunk]) {
    for (; j + W <= nj; j += W) {
      scalar_t s[kRows][W] = {};
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* __restrict col = inT + c * n_in + j0 + j;
        const scalar_t* __restrict a = pk + c * kRows;
        for (int r = 0; r < kRows; ++r) {
#pragma omp simd
          for (int v = 0; v < W; ++v) s[r][v] += a[r] * col[v];
        }
      }
      for (int r = 0; r < kRows; ++r) {
        for (int v = 0; v < W; ++v) acc[r][j + v] = s[r][v];
      }
    }
    return j;
  }

  // acc[r][j] = sum_c pk[c][r] * inT[c][j0 + j] for j < nj (all kRows rows; the padding rows give 0 where the inner
  // features are finite): blocks of kDotV inner points (two vectors where the registers allow), then kV, then one
  // at a time.
  static void dots(const scalar_t* pk, const scalar_t* inT, int64_t C, int64_t n_in, int64_t j0, int nj,
                   scalar_t (*acc)[kChunk]) {
    int j = 0;
    if (kDotV != kV) j = dots_block<kDotV>(pk, inT, C, n_in, j0, j, nj, acc);
    j = dots_block<kV>(pk, inT, C, n_in, j0, j, nj, acc);
    for (; j < nj; ++j) {
      for (int r = 0; r < kRows; ++r) {
        scalar_t s = 0;
        for (int64_t c = 0; c < C; ++c) s += pk[c * kRows + r] * inT[c * n_in + j0 + j];
        acc[r][j] = s;
      }
    }
  }

  // The packed outer features of the block at o0: student (Cs, kRows) then teacher (Ct, kRows), in pk.
  void pack_block(int64_t o0, int rows, scalar_t* pk) const {
    pack(out_s, Cs, o0, rows, pk);
    pack(out_t, Ct, o0, rows, pk + Cs * kRows);
  }

  // g[r][j] = out_s[o0 + r] . in_s[j0 + j], f[r][j] = out_t[o0 + r] . in_t[j0 + j] + c (r < rows, j < nj), from
  // the block's packed features pk (pack_block); rows >= `rows` hold garbage-free products of zero features.
  void tile(const scalar_t* pk, int64_t o0, int rows, int64_t j0, int nj, scalar_t (*g)[kChunk],
            scalar_t (*f)[kChunk]) const {
    dots(pk, in_sT, Cs, n_in, j0, nj, g);
    dots(pk + Cs * kRows, in_tT, Ct, n_in, j0, nj, f);
    for (int r = 0; r < rows; ++r) {
      scalar_t* fr = f[r];
      const scalar_t off = offset[o0 + r];
#pragma omp simd
      for (int j = 0; j < nj; ++j) fr[j] += off;
    }
  }

  // The per-pair math of one tile row, with the clamp a compile-time constant so that the selects vectorise on every
  // instruction set (with a run-time flag GCC kept the AVX2 loops scalar).
  // sum_j P(g[j]) * f[j]  (f = F + c)
  template <bool kClamp>
  static scalar_t row_value(const scalar_t* __restrict g, const scalar_t* __restrict f, int nj) {
    scalar_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < nj; ++j) s += correlation::pair_value<scalar_t>(g[j], f[j], kClamp);
    return s;
  }

  // d[j] <- dLoss/dG, e[j] <- dLoss/dF (on entry d holds G, e holds F + c)
  template <bool kClamp>
  static void grads_row(scalar_t* __restrict d, scalar_t* __restrict e, int nj, scalar_t grad) {
#pragma omp simd
    for (int j = 0; j < nj; ++j) {
      scalar_t dd, ee;
      correlation::pair_grads<scalar_t>(d[j], e[j], kClamp, grad, &dd, &ee);
      d[j] = dd;
      e[j] = ee;
    }
  }

  // sum over the block's pairs of P(G) * (F + c), accumulated in double across tiles; pk: scratch for the packed
  // block, kRows * (Cs + Ct) values
  double forward(int64_t o0, int rows, scalar_t* pk) const {
    scalar_t g[kRows][kChunk], f[kRows][kChunk];
    pack_block(o0, rows, pk);
    double total = 0;
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      tile(pk, o0, rows, j0, nj, g, f);
      for (int r = 0; r < rows; ++r) {
        total += static_cast<double>(clamp ? row_value<true>(g[r], f[r], nj) : row_value<false>(g[r], f[r], nj));
      }
    }
    return total;
  }

  // Both products of one gradient tile w (rows x nj, rows >= `rows` zero) in one sweep over its channels:
  //   sum_v rows_acc[r][c][v] += sum_j w[r][j] * inT[c][j0 + j]     (the outer points' gradient, kV partials)
  //   colsT[c][j0 + j]        += sum_r out[o0 + r][c] * w[r][j]      (the inner points' gradient, transposed)
  // Each w vector loaded for one channel feeds both (2 FMAs per load); kRows row accumulators per channel, kept
  // as vectors (rows_acc, (rows, C, kV)) so the horizontal sums happen once per panel, not once per tile.
  static void accumulate_both(const scalar_t (*w)[kChunk], const scalar_t* inT, const scalar_t* pk, int64_t C,
                              int64_t n_in, int rows, int64_t j0, int nj, scalar_t* rows_acc, scalar_t* colsT) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* __restrict col = inT + c * n_in + j0;
      scalar_t* __restrict dst = colsT + c * n_in + j0;
      const scalar_t* __restrict a = pk + c * kRows;  // the block's packed outer features (zero padding rows)
      scalar_t s[kRows][kV] = {};
      int j = 0;
      for (; j + kV <= nj; j += kV) {
        // pointers, not `j + v` indices: the build's -fwrapv would make those look non-contiguous (gathers)
        const scalar_t* __restrict cj = col + j;
        scalar_t* __restrict dj = dst + j;
        const scalar_t* wj[kRows];
        for (int r = 0; r < kRows; ++r) wj[r] = w[r] + j;
#pragma omp simd
        for (int v = 0; v < kV; ++v) {
          const scalar_t x = cj[v];
          scalar_t y = dj[v];
          for (int r = 0; r < kRows; ++r) {
            const scalar_t wv = wj[r][v];
            s[r][v] += wv * x;
            y += a[r] * wv;
          }
          dj[v] = y;
        }
      }
      for (; j < nj; ++j) {  // at most kV - 1 inner points
        scalar_t y = dst[j];
        for (int r = 0; r < kRows; ++r) {
          s[r][0] += w[r][j] * col[j];
          y += a[r] * w[r][j];
        }
        dst[j] = y;
      }
      for (int r = 0; r < rows; ++r) {
        scalar_t* acc = rows_acc + (r * C + c) * kV;
#pragma omp simd
        for (int v = 0; v < kV; ++v) acc[v] += s[r][v];
      }
    }
  }

  // out[o][c] += sum_v acc[(o * C + c) * kV + v] for o < n: the horizontal sums of accumulate_both's partials
  static void reduce_rows(const scalar_t* acc, int64_t n, int64_t C, scalar_t* out) {
    for (int64_t k = 0; k < n * C; ++k) {
      scalar_t t = 0;
      for (int v = 0; v < kV; ++v) t += acc[k * kV + v];
      out[k] += t;
    }
  }

  // The whole backward of a panel of outer (view-1) points [p0, p0 + prows) against every inner (view-2) point,
  // chunk by chunk: each (kRows x kChunk) tile of G and F is computed once and feeds both sides' gradients, and
  // a chunk's inner features and gradients stay in cache while every kRows block of the panel visits them.
  // Outer side, owned by the panel: ds (n_out, Cs), dt (n_out, Ct) (if with_t), dc (n_out) (if with_c). Inner
  // side, accumulated into the caller's (per-part) transposed buffers ds_inT (Cs, n_in), dt_inT (Ct, n_in).
  // With `total` (the fused forward+backward), the panel's sum of P(G) * (F + c) (the forward's value) is added to
  // *total from the same tiles.
  void backward(int64_t p0, int64_t prows, scalar_t grad, bool with_t, bool with_c, scalar_t* ds, scalar_t* dt,
                scalar_t* dc, scalar_t* ds_inT, scalar_t* dt_inT, double* total = nullptr) const {
    scalar_t d[kRows][kChunk], e[kRows][kChunk];
    std::vector<scalar_t> ds_acc(prows * Cs * kV, scalar_t(0)), dt_acc(with_t ? prows * Ct * kV : 0, scalar_t(0));
    const int64_t blocks = (prows + kRows - 1) / kRows, pk_size = kRows * (Cs + Ct);
    std::vector<scalar_t> pk(blocks * pk_size);  // every block's packed outer features, for all chunks
    for (int64_t k = 0; k < blocks; ++k) {
      pack_block(p0 + k * kRows, static_cast<int>(std::min<int64_t>(kRows, prows - k * kRows)), pk.data() + k * pk_size);
    }
    const bool cl = clamp;
    for (int64_t j0 = 0; j0 < n_in; j0 += kChunk) {
      const int nj = static_cast<int>(std::min<int64_t>(kChunk, n_in - j0));
      for (int64_t o0 = p0; o0 < p0 + prows; o0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, p0 + prows - o0));
        tile(pk.data() + (o0 - p0) / kRows * pk_size, o0, rows, j0, nj, d, e);  // d <- G, e <- F + c
        for (int r = 0; r < rows; ++r) {
          scalar_t* dr = d[r];
          scalar_t* er = e[r];
          if (total != nullptr) *total += static_cast<double>(cl ? row_value<true>(dr, er, nj) : row_value<false>(dr, er, nj));
          if (cl) {
            grads_row<true>(dr, er, nj, grad);
          } else {
            grads_row<false>(dr, er, nj, grad);
          }
          if (with_c) {
            scalar_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < nj; ++j) s += er[j];
            dc[o0 + r] += s;
          }
        }
        for (int r = rows; r < kRows; ++r) {  // padding rows: exact zeros (a NaN inner point must not leak in)
          std::fill(d[r], d[r] + nj, scalar_t(0));
          std::fill(e[r], e[r] + nj, scalar_t(0));
        }
        const scalar_t* pk_block = pk.data() + (o0 - p0) / kRows * pk_size;
        accumulate_both(d, in_sT, pk_block, Cs, n_in, rows, j0, nj, ds_acc.data() + (o0 - p0) * Cs * kV, ds_inT);
        if (with_t) {
          accumulate_both(e, in_tT, pk_block + Cs * kRows, Ct, n_in, rows, j0, nj,
                          dt_acc.data() + (o0 - p0) * Ct * kV, dt_inT);
        }
      }
    }
    reduce_rows(ds_acc.data(), prows, Cs, ds + p0 * Cs);
    if (with_t) reduce_rows(dt_acc.data(), prows, Ct, dt + p0 * Ct);
  }
};

// This instruction set as a tag for the callers' dispatch (correlation_cpu.cpp: with_isa).
struct Isa {
  template <typename scalar_t>
  using PassFor = Pass<scalar_t>;
};

}  // namespace TSCD_ISA
